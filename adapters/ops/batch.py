"""``LoraBatch``: which adapter slot each token of one engine step uses.

Built once per step from the token -> adapter slot tensor and shared by every layer's
``add_lora`` call, so the sort, the scan for out-of-range slots and the host syncs
happen once per step, not once per linear. ``from_token_slot`` syncs six times (the
min and the max, the count of ``-1`` tokens, the identity-order test, the segment slots
and their lengths); the kernels then launch without another.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True, eq=False)
class LoraBatch:
    """Tokens grouped by adapter slot; ``-1`` means "no adapter" and adds nothing.

    Invariants (established by ``from_token_slot``):
    ``sorted_tokens`` lists the tokens with a slot, stably sorted by slot;
    segment ``i`` is ``sorted_tokens[seg_starts[i]:seg_starts[i + 1]]``, all with slot
    ``seg_slots[i]``; the segments are in ascending slot order, so
    ``len(seg_slots)`` is the number of distinct slots in the batch.
    """

    token_slot: torch.Tensor  # [T] int64, values in [-1, max_slot]
    sorted_tokens: torch.Tensor  # [T_a] int64 token indices, T_a = tokens with a slot
    sorted_slots: torch.Tensor  # [T_a] int64, token_slot[sorted_tokens], non-decreasing
    seg_slots: tuple[int, ...]  # [N] slot of each segment, strictly increasing
    seg_slot_index: torch.Tensor  # [N] int64, seg_slots on token_slot's device
    seg_starts: tuple[int, ...]  # [N + 1] offsets into sorted_tokens, seg_starts[-1] = T_a
    max_slot: int  # -1 when no token has a slot
    identity_order: bool  # every token has a slot and sorted_tokens == arange(T)
    # first slot when the active tokens hold consecutive slots, one token each (a decode
    # step over distinct adapters): the factors are then a view, not a gather; else -1
    consecutive_from: int = -1

    @classmethod
    def from_token_slot(cls, token_slot: torch.Tensor) -> LoraBatch:
        """Validate ``token_slot`` ([T] integer, values >= -1) and derive the segments.

        The upper bound (``< S``) depends on the weights, so ``add_lora`` checks it
        against ``max_slot`` on every call, at the cost of one integer comparison.
        """
        if not isinstance(token_slot, torch.Tensor):
            raise ValueError(f"token_slot must be a torch.Tensor, got {type(token_slot).__name__}")
        if token_slot.dim() != 1:
            raise ValueError(f"token_slot must be 1-D [T], got shape {list(token_slot.shape)}")
        if token_slot.dtype not in _INT_DTYPES:
            raise ValueError(f"token_slot must have an integer dtype, got {token_slot.dtype}")
        slots = token_slot.long()
        if slots.numel() == 0:
            return cls._without_adapters(slots)
        lo, hi = torch.aminmax(slots)
        lo, hi = int(lo), int(hi)
        if lo < -1:
            raise ValueError(
                f"token_slot values must be >= -1 (-1 = no adapter), got {lo} "
                f"at token {int((slots < -1).nonzero()[0, 0])}"
            )
        if hi < 0:
            return cls._without_adapters(slots)

        sorted_slots, order = torch.sort(slots, stable=True)
        num_none = int((sorted_slots < 0).sum()) if lo < 0 else 0
        sorted_slots, order = sorted_slots[num_none:], order[num_none:]
        uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        # Stable sort of an already non-decreasing slot vector is the identity.
        identity = num_none == 0 and bool((slots[1:] >= slots[:-1]).all())
        seg_slots = tuple(uniq.tolist())
        consecutive = len(seg_slots) == len(sorted_slots) == seg_slots[-1] - seg_slots[0] + 1
        return cls(
            token_slot=slots,
            sorted_tokens=order,
            sorted_slots=sorted_slots,
            seg_slots=seg_slots,
            seg_slot_index=uniq,
            seg_starts=(0, *itertools.accumulate(counts.tolist())),
            max_slot=hi,
            identity_order=identity,
            consecutive_from=seg_slots[0] if consecutive else -1,
        )

    @classmethod
    def _without_adapters(cls, slots: torch.Tensor) -> LoraBatch:
        empty = slots.new_empty(0)
        return cls(slots, empty, empty, (), empty, (0,), max_slot=-1, identity_order=False)

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    @property
    def num_active(self) -> int:
        """Tokens with a slot (``>= 0``)."""
        return self.seg_starts[-1]

    @property
    def num_segments(self) -> int:
        """Distinct slots in the batch."""
        return len(self.seg_slots)

    @property
    def has_adapters(self) -> bool:
        """False when every token is ``-1``: ``add_lora`` then returns ``y`` untouched."""
        return self.max_slot >= 0
