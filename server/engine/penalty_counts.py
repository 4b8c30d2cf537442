"""Per-request token counts for the presence, frequency and repetition penalties, kept on
the device across steps instead of rebuilt from every prompt and output token each step.

Row ``slot`` of ``counts`` ``[capacity, V]`` counts each token of one request's output so
far; the same row of ``seen`` ``[capacity, V]`` marks its prompt's tokens. A request gets
its row at its first penalized step (its prompt marked once); each later step adds only
the tokens accepted since, for the whole batch in one ``index_put_``. A recompute after
preemption keeps the output tokens, so the row stays valid; each of ``n`` choices is its
own Sequence with its own row. The engine frees the row when the request finishes
(``release``); a Sequence collected without that frees its row then.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampler import row_tensor
from .sequence import Sequence


@dataclass
class _Row:
    slot: int
    free: weakref.finalize  # gives the slot back, once: at ``release`` or collection
    counted: int = 0  # output tokens already in the row


class PenaltyCounts:
    def __init__(self, initial_rows: int = 8) -> None:
        self._initial = initial_rows
        self._counts: Tensor | None = None  # [capacity, V] float32: output token counts
        self._seen: Tensor | None = None  # [capacity, V] bool: prompt tokens
        self._free: list[int] = []
        self._rows: weakref.WeakKeyDictionary[Sequence, _Row] = weakref.WeakKeyDictionary()

    def gather(self, seqs: list[Sequence], like: Tensor) -> tuple[Tensor, Tensor]:
        """``(counts, prompt_seen)``, both ``[len(seqs), V]`` on ``like``'s device: each
        row's output token counts (float32) and its prompt's tokens (bool), up to date."""
        rows = [self._row(s, like) for s in seqs]
        pairs: tuple[list[int], list[int]] = ([], [])
        for seq, row in zip(seqs, rows, strict=True):
            new = seq.output_token_ids[row.counted:]
            pairs[0].extend([row.slot] * len(new))
            pairs[1].extend(new)
            row.counted += len(new)
        if pairs[0]:
            self._counts.index_put_(_split(pairs, like), torch.ones(
                len(pairs[0]), device=like.device), accumulate=True)
        index = row_tensor([r.slot for r in rows], torch.int64, like)
        return self._counts.index_select(0, index), self._seen.index_select(0, index)

    @property
    def rows_held(self) -> int:
        return len(self._rows)

    def release(self, seq: Sequence) -> None:
        """``seq`` finished: its row (if it has one) is free for another request."""
        row = self._rows.pop(seq, None)
        if row is not None:
            row.free()

    def _row(self, seq: Sequence, like: Tensor) -> _Row:
        row = self._rows.get(seq)
        if row is not None and row.counted <= len(seq.output_token_ids):
            return row
        if row is None:
            slot = self._take_slot(like)
            row = self._rows[seq] = _Row(slot, weakref.finalize(seq, self._free.append, slot))
        row.counted = 0  # new, or its output shrank (never by the engine): recount
        self._counts[row.slot].zero_()
        self._seen[row.slot].zero_()
        if seq.prompt_token_ids:
            prompt = row_tensor(seq.prompt_token_ids, torch.int64, like)
            self._seen[row.slot].index_fill_(0, prompt, True)
        return row

    def _take_slot(self, like: Tensor) -> int:
        if self._counts is None:
            vocab = like.shape[1]
            self._counts = torch.zeros(0, vocab, device=like.device)
            self._seen = torch.zeros(0, vocab, dtype=torch.bool, device=like.device)
        if not self._free:
            old = self._counts.shape[0]
            grow = max(old, self._initial)
            self._counts = torch.cat([self._counts, self._counts.new_zeros(grow, like.shape[1])])
            self._seen = torch.cat([self._seen, self._seen.new_zeros(grow, like.shape[1])])
            self._free.extend(range(old + grow - 1, old - 1, -1))  # in place: finalizers
        return self._free.pop()


def _split(pairs: tuple[list[int], list[int]], like: Tensor) -> tuple[Tensor, Tensor]:
    both = row_tensor(list(pairs), torch.int64, like)
    return both[0], both[1]
