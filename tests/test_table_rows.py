"""Block tables kept on the device across steps (``TableRows``): a step writes only the
block ids the device does not hold yet, a freed table (a new list) is rewritten, rows are
reused least recently used first, and a failed fill forgets every row."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_decode_step import BLOCK, decode_steps, runner

from nolaserve.server.engine.kv_cache import KVCache
from nolaserve.server.engine.step_buffers import DecodeShape, StepBuffers
from nolaserve.server.engine.table_rows import TableRows


def test_a_table_is_written_once_then_only_its_new_blocks():
    rows = TableRows(2, 4)
    a, b = [7, 8], [9]
    assert rows.place([a, b], [2, 1]) == ([0, 1], [0, 1, 4], [7, 8, 9])
    assert rows.place([b, a], [1, 2]) == ([1, 0], [], [])
    a.append(3)
    assert rows.place([a], [3]) == ([0], [2], [3])
    assert rows.place([a], [2]) == ([0], [], [])  # a step that needs fewer: nothing


def test_a_new_list_is_rewritten_and_rows_are_reused_least_recent_first():
    rows = TableRows(2, 4)
    a, b, c = [1, 2], [3], [4, 5, 6]
    rows.place([a], [2])
    rows.place([b], [1])
    rows.place([b], [1])  # a is now the least recently used
    assert rows.place([c], [3]) == ([0], [0, 1, 2], [4, 5, 6])
    assert rows.place([a, b], [2, 1]) == ([0, 1], [0, 1], [1, 2])  # a lost its row
    cut = [4]
    assert rows.place([cut], [1])[2] == [4]  # a new list (blocks freed): a fresh write


def test_rows_of_a_step_are_never_shared_and_limits_raise():
    rows = TableRows(2, 3)
    with pytest.raises(ValueError, match="3 sequences exceed the 2 block-table rows"):
        rows.place([[1], [2], [3]], [1, 1, 1])
    with pytest.raises(ValueError, match="4 blocks exceeds the 3 blocks"):
        rows.place([[1, 2, 3, 4]], [4])
    t = [1, 2]
    rows.place([t], [2])
    rows.reset()
    assert rows.place([t], [2]) == ([0], [0, 1], [1, 2])


def test_a_failed_fill_forgets_the_rows_it_placed():
    step = StepBuffers(4, 8, KVCache(1, 16, 4, 1, 8), None)
    table = [3, 4]
    with pytest.raises(ValueError):  # ragged lists: fails after placing the table
        step.fill_decode([1], [5, 6], [table], [-1], DecodeShape(1, 2, frozenset()))
    step.fill_decode([1], [5], [table], [-1], DecodeShape(1, 2, frozenset()))
    assert step.block_tables[step.token_rows[0], :2].tolist() == [3, 4]


def test_decode_steps_copy_only_the_blocks_they_cross_into(monkeypatch):
    r, slots = runner(tiny_llama(), eager=False)
    written = []
    real = StepBuffers._write_tables

    def count(self, index_values, w):
        written.append(w)
        real(self, index_values, w)

    monkeypatch.setattr(StepBuffers, "_write_tables", count)
    seqs = decode_steps([r], 3, slots, steps=BLOCK + 1)
    ctx = [len(s) - (BLOCK + 2) for s in seqs]  # prompt lengths (steps + 1 tokens added)
    assert written[0] == sum(-(-c // BLOCK) for c in ctx)  # the prefill: every table
    # each decode step writes a block id only for a sequence that starts a new block
    for step, w in enumerate(written[1:]):
        assert w == sum((c + step) % BLOCK == 0 for c in ctx)
    assert torch.equal(r.step.block_tables[-1], torch.full((r.step.max_blocks,),
                                                           r.kv_cache.scratch_block))
