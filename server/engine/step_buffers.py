"""``StepBuffers``: the one object through which a step's inputs reach the model's layers,
owned by the runner. Attention and every wrapped linear read only from it.

Two kinds of step fill it:

- a decode step of ``n`` sequences (one new token each) fills fixed-size tensors at
  fixed addresses, padded to a bucket of ``rows >= n`` (``decode_buckets``): what a CUDA
  graph captured for the bucket reads on every replay. Rows ``[n, rows)`` are padding that
  reads and writes only the cache's scratch block (``KVCache.scratch_block``, held by no
  sequence), has no adapter and is never sampled;
- any other step (prefill chunks, mixed) fills the same names with views of a packed copy
  sized to the step (``step_inputs.PackedPlan``), and runs eagerly.

Either way the host writes one int64 buffer (pinned on CUDA) and the device gets it in one
copy. Block tables live in a persistent ``[max_rows + 1, max_blocks]`` tensor whose rows
are kept per sequence across steps (``TableRows``): a step copies only the block ids the
device does not have yet, scattered in by one ``index_copy_``. The last row is the scratch
row (every entry the scratch block) that padding rows read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nolaserve.adapters.ops import FactorsBackend, LoraBatch, SlotRuns

from .kv_cache import KVCache
from .step_inputs import PackedPlan
from .table_rows import TableRows

SMALL_BUCKETS = (1, 2, 4, 8, 16)
BUCKET_STEP = 16  # buckets above the small ones are multiples of this


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a decode step is padded to: 1, 2, 4, 8, 16, then steps of 16, the last
    ``max_num_seqs`` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {b for b in SMALL_BUCKETS if b < max_num_seqs}
    sizes.update(range(2 * BUCKET_STEP, max_num_seqs, BUCKET_STEP))
    return sorted(sizes | {max_num_seqs})


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``n`` rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest decode bucket ({buckets[-1]})")


def width_of(num_blocks: int, max_blocks: int) -> int:
    """The block-table columns a packed step hands the Triton kernel when its longest
    context spans ``num_blocks``: the next power of two (few distinct split counts, so
    few compiled merges), at most ``max_blocks``."""
    return min(max_blocks, 1 << max(0, num_blocks - 1).bit_length())


@dataclass(frozen=True)
class DecodeShape:
    """What is fixed for one captured graph: ``rows`` (the bucket), ``width`` (KV blocks the
    torch attention gathers per row: the longest context's, exactly, as on CPU a padded
    column costs as much as a real one; 0 with the Triton kernel, which reads the
    lengths) and ``lora`` (the wrapped linears that add their deltas: all of them in a
    graph)."""

    rows: int
    width: int
    lora: frozenset[str]


def pinned(n: int) -> torch.Tensor:
    """A pinned host int64 tensor of ``n`` entries, for one non-blocking copy to the device.
    Taking a fresh one each step never races or waits for an earlier copy: torch's caching
    host allocator records each copy's event on the block and hands a freed block out
    again only once those have completed (else it makes a new one)."""
    return torch.empty(n, dtype=torch.long, pin_memory=True)


class StepBuffers:
    """A step's tensors (see the module docstring), set by ``fill_decode`` or ``fill_packed``:

    ``input_ids``, ``positions``, ``kv_slot`` (where each new token's key and value go),
    ``token_slot`` (adapter slot, -1 none) and ``token_rows`` (the block-table row of the
    token's sequence): one entry per token row of the forward. ``seq_lens``: context length
    of each sequence after this step. ``block_tables``: ``[max_rows + 1, max_blocks]``.

    And the step's host-side state: ``shape`` (a decode step's ``DecodeShape``, else None),
    ``plan`` (a packed step's ``PackedPlan``, else None), ``logits_rows`` (packed: the rows
    whose logits the step returns), ``lora_modules`` (the wrapped linears that add deltas),
    ``runs`` (a decode step's ``slot_runs``, set in its forward), ``lora`` and the LoRA
    backend (a packed step with adapters), ``attn_units`` (the torch
    attention's gathers of a packed step) and ``shared`` (outputs of shared-input groups)."""

    DECODE_FIELDS = ("input_ids", "positions", "kv_slot", "token_slot", "seq_lens",
                     "token_rows")

    def __init__(self, max_rows: int, max_blocks: int, cache: KVCache,
                 kernel: Callable | None) -> None:
        self.max_rows, self.max_blocks, self.kernel = max_rows, max_blocks, kernel
        self.device = cache.k.device
        self.tables = TableRows(max_rows, max_blocks)
        self.scratch_row = max_rows
        self.block_tables = torch.zeros(max_rows + 1, max_blocks, dtype=torch.long,
                                        device=self.device)
        self._fixed = len(self.DECODE_FIELDS) * max_rows
        # the decode fields at fixed addresses, then room for a step's block-table writes
        self._decode = torch.zeros(self._fixed + 2 * max_rows * max_blocks, dtype=torch.long,
                                   device=self.device)
        self.set_cache(cache)
        self.clear()

    def set_cache(self, cache: KVCache) -> None:
        """Serve ``cache`` (a new one after resizing): the scratch row names its scratch
        block and no table row is trusted any longer."""
        self.cache, self.block_size = cache, cache.block_size
        self.scratch_block = cache.scratch_block
        self.block_tables[self.scratch_row] = cache.scratch_block
        self.tables.reset()

    def clear(self) -> None:
        """Drop the step's host-side state (between steps)."""
        self.shape: DecodeShape | None = None
        self.plan: PackedPlan | None = None
        self.logits_rows: torch.Tensor | None = None
        self.lora_modules: frozenset[str] = frozenset()
        self.lora: LoraBatch | None = None
        self.runs: SlotRuns | None = None
        self.lora_backend: FactorsBackend | None = None
        self.attn_units: tuple = ()
        self.shared: dict = {}

    @contextlib.contextmanager
    def placing(self):
        """Around placing tables (``self.tables.place``) and writing them: on an error the
        rows are forgotten, since the device never got the entries they count as written."""
        try:
            yield
        except BaseException:
            self.tables.reset()
            raise

    def fill_decode(self, token_ids: list[int], positions: list[int],
                    block_tables: list[list[int]], adapter_slots: list[int],
                    shape: DecodeShape) -> None:
        """A decode step of ``len(token_ids)`` sequences (one new token each, at
        ``positions``), padded to ``shape.rows``, in one copy."""
        with self.placing():
            n, bs, rows = len(token_ids), self.block_size, shape.rows
            table_rows, index, values = self.tables.place(block_tables,
                                                          [p // bs + 1 for p in positions])
            w = len(index)
            host = self._decode if self._decode.device.type == "cpu" else \
                pinned(self._fixed + 2 * w)
            f = host.numpy()[:self._fixed].reshape(len(self.DECODE_FIELDS), self.max_rows)
            pos = np.asarray(positions, dtype=np.int64)
            first = np.asarray([t[p // bs] for p, t in zip(positions, block_tables)], np.int64)
            f[:, :n] = (token_ids, pos, first * bs + pos % bs, adapter_slots, pos + 1, table_rows)
            f[:, n:rows] = np.asarray((0, 0, self.scratch_block * bs, -1, 1, self.scratch_row),
                                      dtype=np.int64).reshape(-1, 1)
            host.numpy()[self._fixed:self._fixed + 2 * w] = index + values
            if host is not self._decode:
                self._decode[:self._fixed + 2 * w].copy_(host, non_blocking=True)
            self._write_tables(self._decode[self._fixed:self._fixed + 2 * w], w)
            views = self._decode[:self._fixed].view(len(self.DECODE_FIELDS), self.max_rows)
            for name, view in zip(self.DECODE_FIELDS, views):
                setattr(self, name, view[:rows])
            self.shape, self.lora_modules = shape, shape.lora

    def fill_packed(self, plan: PackedPlan, lora_modules: frozenset[str]) -> None:
        """A packed step (``step_inputs.plan_packed``, its table rows placed by
        ``self.tables``; both inside ``placing``), in one copy sized to the step."""
        lists = plan.lists
        flat = [v for values in lists.values() for v in values]
        if self.device.type == "cpu":
            dev = torch.tensor(flat, dtype=torch.long)
        else:
            host = pinned(len(flat))
            host.numpy()[:] = flat
            dev = torch.empty(len(flat), dtype=torch.long, device=self.device)
            dev.copy_(host, non_blocking=True)
        views, offset = {}, 0
        for name, values in lists.items():
            views[name] = dev[offset:offset + len(values)]
            offset += len(values)
        self._write_tables(views["table_writes"], len(lists["table_writes"]) // 2)
        for name in ("input_ids", "positions", "kv_slot", "token_slot", "token_rows",
                     "seq_lens", "seq_rows", "logits_rows"):
            setattr(self, name, views[name])
        self.plan = plan
        if plan.lora is not None:
            self.lora_modules = lora_modules
            self.lora = LoraBatch.from_plan(plan.lora, {
                "token_slot": views["token_slot"],
                **{k[5:]: v for k, v in views.items() if k.startswith("lora.")}})

    def kernel_tables(self) -> torch.Tensor:
        """The block tables the Triton kernel reads: all ``max_blocks`` columns on a
        decode step (a graph's fixed shape); on a packed step only those its longest context
        spans (``width_of``), so that its split count follows the step's contexts, not
        ``max_model_len``."""
        if self.plan is None:
            return self.block_tables
        blocks = -(-self.plan.attention.max_ctx_len // self.block_size)
        return self.block_tables[:, :width_of(blocks, self.max_blocks)]

    def _write_tables(self, index_values: torch.Tensor, w: int) -> None:
        if w:
            self.block_tables.view(-1).index_copy_(0, index_values[:w], index_values[w:])
