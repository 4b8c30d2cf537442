"""``LoraBatch``: which adapter slot each token of one engine step uses.

Built once per step and shared by every layer's ``add_lora`` call. The segments (tokens
grouped by slot) are planned on the host from the step's Python list of slots
(``SegmentPlan``, pure Python, no tensor) and reach the device with the rest of the step's
inputs in one copy (``server.engine.step_inputs``); the kernels then launch without a
host sync. ``from_token_slot`` is the same for a caller holding a tensor: one copy to the
host, one back. ``SlotRuns`` is the graph-capturable form: the tokens grouped by slot on the
device from the token -> slot tensor alone (``slot_runs``), no host list.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# the host lists of a plan that become device tensors, in packing order
PLAN_FIELDS = ("token_slot", "sorted_tokens", "sorted_slots", "seg_slots", "seg_starts")


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """The host side of a ``LoraBatch``: plain lists, derived from ``token_slot`` alone.

    ``sorted_tokens`` lists the tokens with a slot, stably sorted by slot; segment ``i`` is
    ``sorted_tokens[seg_starts[i]:seg_starts[i + 1]]``, all on slot ``seg_slots[i]``, in
    ascending slot order.
    """

    token_slot: list[int]  # [T], values in [-1, max_slot]
    sorted_tokens: list[int]  # [T_a]
    sorted_slots: list[int]  # [T_a], non-decreasing
    seg_slots: list[int]  # [N], strictly increasing
    seg_starts: list[int]  # [N + 1], seg_starts[-1] = T_a
    max_slot: int
    identity_order: bool
    consecutive_from: int

    @classmethod
    def of(cls, token_slot: list[int]) -> SegmentPlan:
        """Plan ``token_slot`` (``-1`` = no adapter). Raises ``ValueError`` below ``-1``."""
        lo = min(token_slot, default=-1)
        if lo < -1:
            raise ValueError(
                f"token_slot values must be >= -1 (-1 = no adapter), got {lo} "
                f"at token {token_slot.index(lo)}")
        sorted_tokens = sorted((t for t, s in enumerate(token_slot) if s >= 0),
                               key=token_slot.__getitem__)
        sorted_slots = [token_slot[t] for t in sorted_tokens]
        seg_slots, counts = [], []
        for slot, group in itertools.groupby(sorted_slots):
            seg_slots.append(slot)
            counts.append(sum(1 for _ in group))
        n_active = len(sorted_tokens)
        identity = n_active == len(token_slot) > 0 and sorted_tokens[-1] == n_active - 1 and \
            all(a <= b for a, b in zip(token_slot, token_slot[1:]))
        consecutive = bool(seg_slots) and \
            len(seg_slots) == n_active == seg_slots[-1] - seg_slots[0] + 1
        return cls(list(token_slot), sorted_tokens, sorted_slots, seg_slots,
                   [0, *itertools.accumulate(counts)], max(token_slot, default=-1), identity,
                   seg_slots[0] if consecutive else -1)

    def lists(self) -> dict[str, list[int]]:
        """The lists that go to the device, by ``PLAN_FIELDS`` name."""
        return {name: getattr(self, name) for name in PLAN_FIELDS}


@dataclass(frozen=True, eq=False)
class LoraBatch:
    """Tokens grouped by adapter slot; ``-1`` means "no adapter" and adds nothing.

    The tensors are ``SegmentPlan``'s lists on the device (int64); the tuples stay on the
    host for the Python loops and grid shapes of the backends.
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
    consecutive_from: int
    seg_start_index: torch.Tensor  # [N + 1] int64, seg_starts on the device

    @classmethod
    def from_plan(cls, plan: SegmentPlan, tensors: dict[str, torch.Tensor]) -> LoraBatch:
        """The batch of ``plan`` whose lists are already on the device as ``tensors``
        (keys ``PLAN_FIELDS``, int64)."""
        return cls(tensors["token_slot"], tensors["sorted_tokens"], tensors["sorted_slots"],
                   tuple(plan.seg_slots), tensors["seg_slots"], tuple(plan.seg_starts),
                   plan.max_slot, plan.identity_order, plan.consecutive_from,
                   tensors["seg_starts"])

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
        plan = SegmentPlan.of(token_slot.tolist())
        device = token_slot.device
        return cls.from_plan(plan, {k: torch.tensor(v, dtype=torch.long).to(device)
                                    for k, v in plan.lists().items()})

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

    @functools.cached_property
    def tiles(self) -> tuple[int, int, int]:
        """``(BLOCK_T, token tiles of the longest segment, busy tiles of all segments)``
        for the SGMV grids; computed once per batch, not once per launch."""
        lengths = [b - a for a, b in zip(self.seg_starts, self.seg_starts[1:])]
        longest = max(lengths, default=0)
        block_t = 16 if longest <= 16 else (32 if longest <= 32 else 64)
        return block_t, -(-longest // block_t), sum(-(-n // block_t) for n in lengths)

    @functools.cached_property
    def runs(self) -> SlotRuns:
        """The tokens with a slot as ``SlotRuns`` (``sorted_tokens`` and each run's end): one
        ``searchsorted`` per step, shared by every layer's split-K SGMV launches."""
        return SlotRuns.grouped(self.sorted_tokens, self.sorted_slots)

    @property
    def has_adapters(self) -> bool:
        """False when every token is ``-1``: ``add_lora`` then returns ``y`` untouched."""
        return self.max_slot >= 0


@dataclass(frozen=True)
class SlotRuns:
    """``token_slot`` grouped by slot on the device, all ``[T]`` (graph-capturable)."""

    order: torch.Tensor  # token indices, stably sorted by slot (-1 tokens first)
    slots: torch.Tensor  # token_slot[order], non-decreasing
    ends: torch.Tensor  # ends[i]: one past the last sorted position of slots[i]'s run

    @classmethod
    def of(cls, token_slot: torch.Tensor) -> SlotRuns:
        slots, order = torch.sort(token_slot, stable=True)
        return cls.grouped(order, slots)

    @classmethod
    def grouped(cls, order: torch.Tensor, slots: torch.Tensor) -> SlotRuns:
        """The runs of tokens ``order`` already sorted by their ``slots``."""
        return cls(order, slots, torch.searchsorted(slots, slots, right=True))


def slot_runs(token_slot: torch.Tensor) -> SlotRuns:
    """The step's ``SlotRuns``: a stable sort and a searchsorted on ``token_slot``'s device,
    no host sync. Compute once per step and pass to every ``*_rows`` call."""
    return SlotRuns.of(token_slot)
