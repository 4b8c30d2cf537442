"""Decode-only steps at fixed shapes: the model forward reads nothing but ``StepBuffers``,
so one CUDA graph per ``DecodeShape``, captured at warm-up, replays any decode step of that
bucket; on CPU (or with ``enforce_eager``) the same forward runs eagerly.

Steps with a prefill chunk stay on the packed eager path (``step_inputs``).
"""

from __future__ import annotations

import torch
from torch import nn

from nolaserve.adapters.ops import slot_runs
from nolaserve.adapters.slots import SlotPool

from .attention_plan import GROUP_MIN_BLOCKS
from .step_buffers import DecodeShape, StepBuffers, bucket_of, decode_buckets
from .step_inputs import StepBatch


class DecodeStep:
    """Runs decode steps of up to ``max_num_seqs`` sequences through the runner's
    ``StepBuffers`` (``step``, at least that many rows).

    ``graphs``: capture one CUDA graph per bucket (needs CUDA and the Triton attention);
    without them every size is its own bucket (no padding: on CPU a padded row costs as
    much as a real one). ``buckets`` overrides the sizes (tests pad on CPU with them).
    ``pool``: the slot pool of the wrapped linears (None: base model only). With graphs
    every wrapped linear launches (a row without an adapter exits on the device); eagerly
    only the modules that the step's adapters adapt.
    """

    def __init__(self, model: nn.Module, step: StepBuffers, max_num_seqs: int, *,
                 graphs: bool, pool: SlotPool | None, buckets: list[int] | None = None) -> None:
        self.model, self.step, self.pool = model, step, pool
        self.all_modules = frozenset(pool.spec.module_shapes) if pool is not None else \
            frozenset()
        self.graphs_on = graphs and step.kernel is not None and step.device.type == "cuda"
        if buckets is None:
            buckets = decode_buckets(max_num_seqs) if self.graphs_on else \
                list(range(1, max_num_seqs + 1))
        if buckets[-1] > step.max_rows:
            raise ValueError(f"decode buckets up to {buckets[-1]} rows exceed the step "
                             f"buffers' {step.max_rows}")
        self.buckets = buckets
        self.graphs: dict[DecodeShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None

    def takes(self, batch: StepBatch) -> bool:
        """Whether ``batch`` is a decode step this path runs: one new token per sequence,
        every sequence sampled, at most the largest bucket. Without the Triton kernel the
        attention gathers every row to the longest context, so a batch of ragged contexts
        (``length_groups`` would split it) goes to the packed path instead."""
        if batch.num_seqs > self.buckets[-1] or not all(batch.sample) or \
                any(len(t) != 1 for t in batch.token_ids):
            return False
        if self.step.kernel is not None:
            return True
        blocks = [p // self.step.block_size + 1 for p in batch.start_pos]
        return max(blocks) <= max(2 * min(blocks), GROUP_MIN_BLOCKS)

    def shape_of(self, batch: StepBatch) -> DecodeShape:
        rows = bucket_of(batch.num_seqs, self.buckets)
        slots = set(batch.adapter_slot) - {-1}
        if self.graphs_on:
            lora = self.all_modules
        else:
            lora = self.pool.modules_of(slots) if slots else frozenset()
        if self.step.kernel is not None:
            return DecodeShape(rows, 0, lora)
        blocks = max(p // self.step.block_size + 1 for p in batch.start_pos)
        return DecodeShape(rows, min(blocks, self.step.max_blocks), lora)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Float32 logits ``[num_seqs, vocab]`` of a ``takes``-accepted batch, in its order."""
        shape = self.shape_of(batch)
        try:
            self.step.fill_decode([t[0] for t in batch.token_ids], batch.start_pos,
                                  batch.block_table, batch.adapter_slot, shape)
            graph = self.graphs.get(shape)
            if graph is None:
                return self.forward(shape)[:batch.num_seqs].float()
            graph[0].replay()
            return graph[1][:batch.num_seqs].to(torch.float32, copy=True)  # out is the graph's
        finally:
            self.step.clear()

    def forward(self, shape: DecodeShape) -> torch.Tensor:
        """The model over the step's ``shape.rows`` rows (filled): logits ``[rows, vocab]``.
        Everything it launches reads only the step's tensors, so a graph can capture it."""
        step = self.step
        if shape.lora:
            step.runs = slot_runs(step.token_slot)  # on the device: captured with the rest
        with torch.no_grad():
            out = self.model(input_ids=step.input_ids.view(1, -1),
                             position_ids=step.positions.view(1, -1), use_cache=False,
                             attn_metadata=step)
        return out.logits[0]

    def capture(self) -> int:
        """Capture one graph per bucket, largest first (they share one memory pool), each on
        all-padding buffers: only the scratch block is written. Returns the graphs made."""
        if not self.graphs_on:
            return 0
        for rows in reversed(self.buckets):
            shape = DecodeShape(rows, 0, self.all_modules)
            self.step.fill_decode([], [], [], [], shape)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(shape)  # lazy inits and Triton compiles happen outside capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self.forward(shape)
            self._graph_pool = graph.pool()
            self.graphs[shape] = (graph, out)
            self.step.clear()
        torch.cuda.synchronize()
        return len(self.graphs)
