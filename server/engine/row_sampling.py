"""The engine's sampling of a step: one token per sequence, or the failure of that row
alone, with the logprobs asked for, read back from the device in one copy."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nolaserve.adapters.errors import Status, short

from .engine_types import TokenLogprob
from .logprobs import StepRows, chosen_logprobs, logprob_values, row_width, token_logprobs
from .sampler import Sampler, row_tensor
from .sequence import Sequence


@dataclass(frozen=True)
class RowFailure:
    """Why one row of a step got no token; the engine fails that request with it."""

    message: str
    code: Status
    masked: bool = False  # the request's own masks left no token (not NaN or Inf)


@dataclass
class SampledRows:
    """A step's read-back: per sampling row its token (or failure) and, when its request
    asks, the token's ``TokenLogprob``; and the step's prompt logprobs per chunk
    (``StepRows.prompt_logprobs``)."""

    tokens: list[int | RowFailure]
    logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[tuple[str, int, list[TokenLogprob]]] = field(default_factory=list)


class RowSampler(Sampler):
    """``Sampler`` plus the rules of a step: a row with NaN/Inf logits fails alone, and if
    the batched draw raises, the rows are drawn one by one."""

    def sample_rows(self, raw: torch.Tensor, seqs: list[Sequence],
                    generators: list[torch.Generator | None],
                    processed: torch.Tensor | None = None,
                    rows: StepRows | None = None, step_logits: torch.Tensor | None = None
                    ) -> SampledRows:
        """Sample ``processed`` (the ``raw`` logits after bias, penalties and masks; ``raw``
        itself if None). The tokens, the finite check of ``raw``, the logprobs asked for
        (from ``raw``) and the prompt logprobs of ``rows`` (from ``step_logits``) come back
        in one device-to-host copy, the step's only sync."""
        processed = raw if processed is None else processed
        status = _row_status(raw, processed)
        drawn: list[int | RowFailure] | None = None
        try:
            ids = self.sample_ids(processed, [s.params for s in seqs], generators) if seqs \
                else torch.empty(0, dtype=torch.int64, device=raw.device)
        except Exception:
            drawn = [self._sample_one(processed[i:i + 1], s, g) for i, (s, g)
                     in enumerate(zip(seqs, generators))]
            ids = row_tensor([t if isinstance(t, int) else 0 for t in drawn], torch.int64, raw)
        asking = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        blocks = [ids.double(), status]
        if asking:
            index = row_tensor(asking, torch.int64, raw)
            blocks.append(logprob_values(raw.index_select(0, index), ids.index_select(0, index),
                                         max(seqs[i].params.logprobs for i in asking)))
        if chosen := _chosen(seqs, asking):
            blocks.append(chosen_logprobs(raw, chosen))
        prompt = rows.prompt_values(step_logits) if rows is not None else None
        host = torch.cat(blocks + ([prompt] if prompt is not None else [])).tolist()
        return self._unpack(host, seqs, asking, drawn, rows, raw.shape[1])

    def _unpack(self, host: list[float], seqs: list[Sequence], asking: list[int],
                drawn: list[int | RowFailure] | None, rows: StepRows | None,
                vocab: int) -> SampledRows:
        n = len(seqs)
        tokens = [int(t) for t in host[:n]] if drawn is None else drawn
        tokens = [t if ok == _SAMPLED else non_finite(s) if ok == _NON_FINITE else no_token(s)
                  for t, ok, s in zip(tokens, host[n:2 * n], seqs)]
        ks = [seqs[i].params.logprobs for i in asking]
        width = len(asking) * row_width(min(max(ks, default=0), vocab))
        lps = token_logprobs(host[2 * n:2 * n + width],
                             [t if isinstance(t, int) else 0 for t in
                              (tokens[i] for i in asking)], ks, vocab)
        logprobs: list[TokenLogprob | None] = [None] * n
        for i, lp in zip(asking, lps):
            logprobs[i] = lp if isinstance(tokens[i], int) else None
        at = 2 * n + width
        for i, chosen_ids in _chosen(seqs, asking).items():  # they replace the top k
            values = host[at:at + len(chosen_ids)]
            at += len(chosen_ids)
            if logprobs[i] is not None:
                logprobs[i] = replace(logprobs[i], top=tuple(zip(chosen_ids, values)))
        prompt = rows.prompt_logprobs(host[at:], vocab) if rows is not None \
            and rows.prompt else []
        return SampledRows(tokens, logprobs, prompt)

    def _sample_one(self, row: torch.Tensor, seq: Sequence,
                    generator: torch.Generator | None) -> int | RowFailure:
        try:
            return self.sample(row, [seq.params], [generator])[0]
        except Exception as e:
            return RowFailure(f"internal error sampling this request: {e!r:.200}",
                              Status.INTERNAL)


_NON_FINITE, _SAMPLED, _ALL_MASKED = 0.0, 1.0, 2.0  # a row's status in the read-back


def _chosen(seqs: list[Sequence], asking: list[int]) -> dict[int, list[int]]:
    """Row -> vLLM's ``logprob_token_ids``, for the rows that ask for logprobs and name
    their tokens."""
    return {i: seqs[i].params.logprob_token_ids for i in asking
            if seqs[i].params.logprob_token_ids}


def _row_status(raw: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
    """Per row, as float64 ``[N]``: ``_NON_FINITE`` (its logits hold NaN or Inf),
    ``_ALL_MASKED`` (its request's masks left no token to sample), else ``_SAMPLED``."""
    # One reduction instead of isfinite over [N, V]: a NaN or an infinity makes the
    # row's sum non-finite (so would |logits| ~1e34, as unusable as an infinity).
    status = torch.isfinite(raw.sum(dim=1)).double()
    if processed is raw:
        return status
    return status.masked_fill_((processed.amax(dim=1) == float("-inf")) & (status > 0),
                               _ALL_MASKED)


def no_token(seq: Sequence) -> RowFailure:
    """The failure of a row whose every token its own request masked."""
    return RowFailure(
        f"no token can come at output token {len(seq.output_token_ids)}: this request's "
        "allowed_token_ids, bad_words, min_tokens (which masks EOS and stop_token_ids) and "
        "output format leave none; loosen them", Status.INVALID_ARGUMENT, masked=True)


def non_finite(seq: Sequence) -> RowFailure:
    """The failure of a row whose logits hold NaN or Inf: the adapter's fault (named) or,
    for the base model, an internal error."""
    token = len(seq.output_token_ids)
    if seq.adapter_id is None:
        return RowFailure(f"internal error: the base model produced NaN or Inf logits at "
                          f"output token {token}", Status.INTERNAL)
    return RowFailure(f"adapter {short(seq.adapter_id)} produced NaN or Inf logits at output "
                      f"token {token}: its weights are numerically unusable with this model; "
                      "re-register a bounded version", Status.FAILED_PRECONDITION)
