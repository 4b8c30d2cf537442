"""A step's sequences on the host, pure Python: ``StepBatch`` (what the engine schedules)
and, for a packed step (prefill chunks, mixed steps; a decode-only step goes through
``decode_step`` instead), ``PackedPlan``: the token ids and positions in one unpadded row,
the rows to sample, the attention lists (KV slots, block-table rows, sequence lengths) and
the LoRA segments, which ``StepBuffers.fill_packed`` takes to the device in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nolaserve.adapters.ops.batch import SegmentPlan

from .attention_plan import AttentionPlan, check_tables, length_groups, plan_attention
from .table_rows import TableRows


@dataclass
class StepBatch:
    """One step's scheduled sequences as plain lists, entry ``i`` describing sequence ``i``.

    ``token_ids[i]``: the new tokens to compute (prompt chunk or last sampled token);
    ``start_pos[i]``: tokens already in the KV cache before this step;
    ``block_table[i]``: KV block ids covering positions ``[0, start_pos + len(token_ids))``:
    the sequence's own list, which the runner keeps on the device across steps
    (``TableRows``), so it may only grow while the sequence holds its blocks and must be a
    new list once they are freed (``BlockManager.free``);
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


@dataclass(frozen=True, eq=False)
class PackedPlan:
    """A packed step on the host: the int lists that ``StepBuffers.fill_packed`` copies
    (by name, in order) and the layout the torch paths read."""

    lists: dict[str, list[int]]
    attention: AttentionPlan
    lora: SegmentPlan | None  # None when no token of the step has an adapter
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


def plan_packed(batch: StepBatch, tables: TableRows, block_size: int, num_blocks: int,
                with_lora: bool) -> PackedPlan:
    """Pack a validated ``batch`` (``StepBatch.validate``, adapter slots checked) in
    ``packed_order``, its block tables placed in ``tables`` (rows kept across steps).
    ``with_lora``: plan LoRA segments (False for a base-model-only runner). Raises
    ``ValueError`` when a block table does not cover its positions."""
    order = packed_order(batch, block_size)
    q_lens = [len(batch.token_ids[i]) for i in order]
    starts = [batch.start_pos[i] for i in order]
    seq_tables = [batch.block_table[i] for i in order]
    ctx_lens = [s + q for s, q in zip(starts, q_lens)]
    check_tables(block_size, num_blocks, ctx_lens, seq_tables)
    rows, index, values = tables.place(seq_tables, [-(-c // block_size) for c in ctx_lens])
    attention = plan_attention(block_size, q_lens, starts, seq_tables, rows)
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
    slots = frozenset(batch.adapter_slot) - {-1}
    lora = SegmentPlan.of(token_slot) if with_lora and slots else None
    lists = {"input_ids": ids, "positions": positions, "token_slot": token_slot,
             "logits_rows": keep, **attention.lists, "table_writes": index + values}
    if lora is not None:
        lists.update({f"lora.{k}": v for k, v in lora.lists().items() if k != "token_slot"})
    return PackedPlan(lists, attention, lora, slots)
