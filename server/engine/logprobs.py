"""Logprobs of a step, as vLLM reports them by default ("raw"): the ``log_softmax`` of the
model's logits before bias, penalties, grammar masks and temperature, from the step's own
logits (no second forward). Each block of rows becomes one flat float64 tensor that the
step reads back with its sampled tokens in one copy (token ids are exact in float64).

Prompt logprobs need the logits of every prompt position: a chunk of a request that asks
for them runs with ``all_logits`` (``StepBatch``), so the runner returns one row per new
token for it (the logits at position ``p`` give token ``p + 1``'s logprob).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .engine_types import TokenLogprob
from .sampler import row_tensor
from .scheduler import ScheduledSeq

# prompt rows whose logprobs are taken at once: bounds the [rows, vocab] temporaries of
# a step of long prompt-logprobs chunks (the logits themselves are in the memory profile)
PROMPT_ROWS_AT_ONCE = 256


def row_width(k: int) -> int:
    """Floats per row of ``logprob_values`` with ``k`` alternatives."""
    return 2 + 2 * k


def logprob_values(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Flat float64 ``[R * row_width(k)]`` for ``logits`` ``[R, V]``: per row the logprob
    of ``targets[r]``, its rank (1 + the tokens likelier), then the ``k`` largest logprobs
    and their token ids. ``log_softmax`` is ``logits - logsumexp`` taken only where read,
    not materialized as another ``[R, V]``."""
    logits = logits.float()
    lse = logits.logsumexp(dim=1, keepdim=True)  # [R, 1]
    target = logits.gather(1, targets.view(-1, 1))  # [R, 1]
    parts = [target - lse, (logits > target).sum(dim=1, keepdim=True) + 1]
    k = min(k, logits.shape[1])
    if k > 0:
        top = logits.topk(k, dim=1)
        parts += [top.values - lse, top.indices]
    return torch.cat([p.double() for p in parts], dim=1).flatten()


def chosen_logprobs(logits: Tensor, chosen: dict[int, list[int]]) -> Tensor:
    """Flat float64: for each row ``r`` of ``chosen`` in order, the logprobs of its token
    ids ``chosen[r]`` (vLLM's ``logprob_token_ids``), in their order."""
    sub = logits.index_select(0, row_tensor(list(chosen), torch.int64, logits)).float()
    lse = sub.logsumexp(dim=1)  # [R]: those rows' normalizers only
    pairs = row_tensor([[j for j, ids in enumerate(chosen.values()) for _ in ids],
                        [t for ids in chosen.values() for t in ids]], torch.int64, logits)
    return (sub[pairs[0], pairs[1]] - lse[pairs[0]]).double()


def token_logprobs(values: list[float], targets: list[int], ks: list[int],
                   vocab: int) -> list[TokenLogprob]:
    """``logprob_values``' read-back as one ``TokenLogprob`` per row, row ``r`` keeping the
    ``ks[r]`` most likely of the block's ``max(ks)``."""
    k = min(max(ks, default=0), vocab)
    width = row_width(k)
    out = []
    for r, (target, kr) in enumerate(zip(targets, ks)):
        row = values[r * width:(r + 1) * width]
        top = tuple((int(t), v) for v, t in zip(row[2:2 + kr], row[2 + k:2 + k + kr]))
        out.append(TokenLogprob(target, row[0], top, int(row[1])))
    return out


def wants_prompt_logits(s: ScheduledSeq) -> bool:
    """Whether this chunk of ``s.seq`` needs a row per token: its request asks for prompt
    logprobs, has none delivered yet (no output token), and some row of the chunk predicts
    a prompt token."""
    seq = s.seq
    return (seq.params.prompt_logprobs is not None and not seq.output_token_ids
            and seq.num_computed_tokens + 1 < seq.num_prompt_tokens)


@dataclass
class StepRows:
    """Where a step's sequences are in the runner's logits (read before the step moves
    their computed counts): the row of each sampling sequence, in order, and the rows
    that give prompt logprobs, with their targets, their ``k`` and their requests."""

    sampled: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    chunks: list[tuple[str, int, int]] = field(default_factory=list)  # (id, first position, n)
    num_rows: int = 0

    @classmethod
    def of(cls, scheduled: list[ScheduledSeq]) -> StepRows:
        rows = cls()
        for s in scheduled:
            seq, q = s.seq, s.num_new_tokens
            if wants_prompt_logits(s):
                start = seq.num_computed_tokens  # row j predicts position start + 1 + j
                n = min(start + q, seq.num_prompt_tokens - 1) - start
                rows.prompt += range(rows.num_rows, rows.num_rows + n)
                rows.targets += seq.prompt_token_ids[start + 1:start + 1 + n]
                rows.ks += [seq.params.prompt_logprobs] * n
                rows.chunks.append((seq.request_id, start + 1, n))
                rows.num_rows += q
                if s.samples:
                    rows.sampled.append(rows.num_rows - 1)
            elif s.samples:
                rows.sampled.append(rows.num_rows)
                rows.num_rows += 1
        return rows

    def sampled_logits(self, logits: Tensor) -> Tensor:
        """The rows of the sampling sequences (``logits`` itself when those are all)."""
        if len(self.sampled) == self.num_rows:
            return logits
        return logits.index_select(0, row_tensor(self.sampled, torch.int64, logits))

    def prompt_values(self, logits: Tensor) -> Tensor | None:
        """``logprob_values`` of the prompt rows (``PROMPT_ROWS_AT_ONCE`` at a time), or
        None without any."""
        if not self.prompt:
            return None
        index = row_tensor([self.prompt, self.targets], torch.int64, logits)
        k = max(self.ks)
        return torch.cat([logprob_values(logits.index_select(0, rows), targets, k)
                          for rows, targets in zip(index[0].split(PROMPT_ROWS_AT_ONCE),
                                                   index[1].split(PROMPT_ROWS_AT_ONCE))])

    def prompt_logprobs(self, values: list[float], vocab: int
                        ) -> list[tuple[str, int, list[TokenLogprob]]]:
        """The prompt rows' read-back per chunk: ``(request id, first position, logprobs)``."""
        flat = token_logprobs(values, self.targets, self.ks, vocab)
        out, at = [], 0
        for request_id, first, n in self.chunks:
            out.append((request_id, first, flat[at:at + n]))
            at += n
        return out


def extend_prompt_logprobs(collected: list[TokenLogprob | None], first: int,
                           new: list[TokenLogprob]) -> None:
    """Add a chunk's prompt logprobs (positions ``first...``) to ``collected`` (positions
    ``0...``); positions already there (a chunk recomputed after preemption) are kept, and
    positions never computed (none today) are ``None``."""
    if first > len(collected):
        collected.extend([None] * (first - len(collected)))
    collected.extend(new[len(collected) - first:])
