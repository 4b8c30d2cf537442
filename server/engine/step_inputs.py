"""One packed step's inputs (prefill chunks, mixed steps; a decode-only step goes through
``decode_step`` instead), built once on the host from plain lists and copied to the
device in one go: packed token ids and positions, the rows to sample, the attention
metadata (KV slots, block tables, sequence lengths) and the LoRA segments. Every layer
reads them; none converts or validates anything per call. The torch attention path makes
its masks on the device from these tensors, and the LoRA backends keep a few host tuples
(segments) from the plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nolaserve.adapters.ops.batch import LoraBatch, SegmentPlan

from .attention import AttentionMetadata
from .attention_plan import length_groups, plan_attention
from .kv_cache import KVCache


@dataclass
class StepBatch:
    """One step's scheduled sequences as plain lists, entry ``i`` describing sequence ``i``.

    ``token_ids[i]``: the new tokens to compute (prompt chunk or last sampled token);
    ``start_pos[i]``: tokens already in the KV cache before this step;
    ``block_table[i]``: KV block ids covering positions ``[0, start_pos + len(token_ids))``;
    ``adapter_slot[i]``: slot-pool slot, ``-1`` for the base model;
    ``sample[i]``: produce logits at the sequence's last new token;
    ``all_logits[i]``: produce logits at every new token (prompt logprobs), the last one
    being the sampled row when ``sample[i]``.
    """

    token_ids: list[list[int]] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    block_table: list[list[int]] = field(default_factory=list)
    adapter_slot: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    all_logits: list[bool] = field(default_factory=list)

    @classmethod
    def from_seqs(cls, seqs: list[tuple[list[int], int, list[int], int, bool]]) -> StepBatch:
        """From ``(token_ids, start_pos, block_table, adapter_slot, sample)`` tuples."""
        batch = cls()
        for seq in seqs:
            batch.add(*seq)
        return batch

    def add(self, token_ids: list[int], start_pos: int, block_table: list[int],
            adapter_slot: int = -1, sample: bool = True, all_logits: bool = False) -> None:
        """Append one sequence."""
        self.token_ids.append(token_ids)
        self.start_pos.append(start_pos)
        self.block_table.append(block_table)
        self.adapter_slot.append(adapter_slot)
        self.sample.append(sample)
        self.all_logits.append(all_logits)

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def validate(self) -> None:
        """Raise ``ValueError`` on ragged fields, empty token lists or negative positions."""
        n = self.num_seqs
        lengths = {len(self.start_pos), len(self.block_table), len(self.adapter_slot),
                   len(self.sample), len(self.all_logits)}
        if lengths != {n}:
            raise ValueError(f"StepBatch fields have different lengths: {lengths | {n}}")
        if any(not t for t in self.token_ids) or any(s < 0 for s in self.start_pos):
            raise ValueError("every sequence needs >= 1 new token and start_pos >= 0")


class HostStaging:
    """Copies a step's integer lists to ``device`` as one int64 tensor: on CUDA through
    one of two reusable pinned buffers, taken in turn, and one non-blocking copy; on CPU
    the host tensor is used as is. Returns a view per list.

    A buffer is rewritten two steps after its copy was queued; the wait for that copy
    (its event) has long been over by then, so the step does not stall on it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def to_device(self, lists: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        flat = torch.tensor(list(itertools.chain.from_iterable(lists.values())),
                            dtype=torch.long)
        if self.device.type == "cuda":
            flat = self._copy_pinned(flat)
        views, offset = {}, 0
        for name, values in lists.items():
            views[name] = flat[offset:offset + len(values)]
            offset += len(values)
        return views

    def _copy_pinned(self, flat: torch.Tensor) -> torch.Tensor:
        n, i = flat.numel(), self._turn
        self._turn = 1 - i
        if self._copied[i] is not None:
            self._copied[i].synchronize()  # this buffer's copy, two steps ago, is done
        pinned = self._pinned[i]
        if pinned is None or pinned.numel() < n:
            pinned = self._pinned[i] = torch.empty(max(n, 4096), dtype=torch.long,
                                                   pin_memory=True)
        host = pinned[:n]
        host.copy_(flat)
        out = host.to(self.device, non_blocking=True)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        return out


@dataclass(frozen=True, eq=False)
class StepInputs:
    """What the model forward and every layer read for one step (on the device)."""

    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    logits_rows: torch.Tensor  # [num_rows] packed rows whose logits the step returns
    attn: AttentionMetadata
    lora: LoraBatch | None  # None when no token of the step has an adapter
    slots: frozenset[int]  # adapter slots of the step (-1 not included)


def packed_order(batch: StepBatch, block_size: int) -> list[int]:
    """Sequence order in the packed row: decode sequences (1 new token) first, grouped by
    length (``length_groups``), then prefill chunks; each group by adapter slot, so LoRA
    segments and attention groups are contiguous."""
    q_lens = [len(t) for t in batch.token_ids]
    decode = [i for i, q in enumerate(q_lens) if q == 1]
    groups = length_groups([-(-(batch.start_pos[i] + 1) // block_size) for i in decode])
    group = dict(zip(decode, groups))
    return sorted(range(batch.num_seqs),
                  key=lambda i: (q_lens[i] > 1, group.get(i, 0), batch.adapter_slot[i]))


def build_step_inputs(batch: StepBatch, cache: KVCache, staging: HostStaging,
                      kernel: Callable | None, with_lora: bool) -> StepInputs:
    """Pack a validated ``batch`` (``StepBatch.validate``, adapter slots checked) into the
    step's device inputs with one copy. ``kernel``: the Triton attention or None (torch
    path); ``with_lora``: plan LoRA segments (False for a base-model-only runner)."""
    order = packed_order(batch, cache.block_size)
    ids: list[int] = []
    positions: list[int] = []
    token_slot: list[int] = []
    first_row, last_row = [0] * batch.num_seqs, [0] * batch.num_seqs
    for i in order:
        first_row[i] = len(ids)
        s, q = batch.start_pos[i], len(batch.token_ids[i])
        ids += batch.token_ids[i]
        positions += range(s, s + q)
        token_slot += [batch.adapter_slot[i]] * q
        last_row[i] = len(ids) - 1
    keep = [r for i in range(batch.num_seqs)
            for r in (range(first_row[i], last_row[i] + 1) if batch.all_logits[i]
                      else [last_row[i]] if batch.sample[i] else [])]
    plan = plan_attention(cache.block_size, cache.num_blocks,
                          [len(batch.token_ids[i]) for i in order],
                          [batch.start_pos[i] for i in order],
                          [batch.block_table[i] for i in order])
    slots = frozenset(batch.adapter_slot) - {-1}
    lora_plan = SegmentPlan.of(token_slot) if with_lora and slots else None
    lists = {"ids": ids, "positions": positions, "keep": keep, **plan.lists}
    if lora_plan is not None:
        lists.update({f"lora.{k}": v for k, v in lora_plan.lists().items()})
    dev = staging.to_device(lists)
    pos = dev["positions"]
    lora = None if lora_plan is None else LoraBatch.from_plan(
        lora_plan, {k[5:]: v for k, v in dev.items() if k.startswith("lora.")})
    attn = AttentionMetadata.from_plan(plan, cache, dev, pos, kernel)
    return StepInputs(dev["ids"].view(1, -1), pos.view(1, -1), dev["keep"], attn, lora, slots)
