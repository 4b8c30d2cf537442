"""A step's per-request logits processing before sampling: ``allowed_token_ids`` and
``bad_words`` (token_masks.py), ``logit_bias``, then the presence, frequency and repetition
penalties, then ``min_tokens`` (stop tokens masked to -inf).
The penalties read token counts kept per request across steps (penalty_counts.py).

Each is a batched tensor op over the rows that ask for it (rows that ask for none cost
nothing, and a batch where none asks returns its logits untouched). The per-row values
reach the device from the host's lists in non-blocking copies; nothing is read back.

Semantics, as vLLM and OpenAI define them:
- ``logit_bias[t]`` is added to token ``t``'s logit;
- ``presence_penalty`` is subtracted once from every token that occurs in the output so
  far, ``frequency_penalty`` once per occurrence;
- ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor`` over prompt and
  output tokens): a positive logit of a token seen is divided by it (at most to ``_cap``),
  a negative one multiplied;
- before ``min_tokens`` output tokens, the EOS tokens (unless ``ignore_eos``) and the
  request's ``stop_token_ids`` get -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .penalty_counts import PenaltyCounts
from .sampler import GREEDY_EPS, row_tensor
from .sequence import Sequence
from .token_masks import TokenMasks, asks, mask_pairs, pair_index


def process_logits(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int],
                   counts: PenaltyCounts, masks: TokenMasks | None = None) -> Tensor:
    """``logits`` ``[N, V]`` (row ``i`` is ``seqs[i]``'s next token) with each row's masks,
    bias, penalties and ``min_tokens`` applied: a new tensor if some row asks, else
    ``logits`` itself (never modified in place: the engine keeps the raw logits for
    logprobs). ``counts`` keeps the penalized requests' token counts from step to step,
    ``masks`` the ``allowed_token_ids`` rows (None: built for this call)."""
    rows = [i for i, s in enumerate(seqs) if _asks(s)]
    if not rows:
        return logits
    asking = [seqs[i] for i in rows]
    masks = masks or TokenMasks()
    if len(rows) == len(seqs):
        return _process(logits.clone(), asking, eos_token_ids, counts, masks)
    index = row_tensor(rows, torch.int64, logits)
    sub = _process(logits.index_select(0, index), asking, eos_token_ids, counts, masks)
    return logits.index_copy(0, index, sub)


def _asks(seq: Sequence) -> bool:
    """Whether this step changes the row of ``seq``: masked tokens, a bias, a penalty, or
    stop tokens to mask."""
    return bool(asks(seq) or seq.params.logit_bias or _penalized(seq) or _early(seq))


def _penalized(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def _early(seq: Sequence) -> bool:
    """Before ``min_tokens`` output tokens, with stop tokens to mask."""
    p = seq.params
    return len(seq.output_token_ids) < p.min_tokens and (not p.ignore_eos or
                                                         bool(p.stop_token_ids))


def _process(logits: Tensor, seqs: list[Sequence], eos: set[int],
             counts: PenaltyCounts, masks: TokenMasks) -> Tensor:
    """Every row of ``logits`` processed in place for its own sequence."""
    masks.apply(logits, seqs)
    _add_bias(logits, seqs)
    rows = [i for i, s in enumerate(seqs) if _penalized(s)]
    if len(rows) == len(seqs):
        _penalize(logits, seqs, counts)
    elif rows:
        index = row_tensor(rows, torch.int64, logits)
        sub = logits.index_select(0, index)
        _penalize(sub, [seqs[i] for i in rows], counts)
        logits.index_copy_(0, index, sub)
    _mask_stops(logits, seqs, eos)
    return logits


def _add_bias(logits: Tensor, seqs: list[Sequence]) -> None:
    rows, tokens, values = [], [], []
    for i, s in enumerate(seqs):
        rows += [i] * len(s.params.logit_bias)
        tokens += s.params.logit_bias.keys()
        values += s.params.logit_bias.values()
    if rows:
        logits.index_put_(pair_index(rows, tokens, logits),
                          row_tensor(values, logits.dtype, logits), accumulate=True)


def _penalize(logits: Tensor, seqs: list[Sequence], counts: PenaltyCounts) -> None:
    """Presence and frequency over the output tokens, then repetition over all tokens."""
    out_counts, prompt_seen = counts.gather(seqs, logits)  # [N, V] each
    out_counts = out_counts.to(logits.dtype)
    pres = [s.params.presence_penalty for s in seqs]
    freq = [s.params.frequency_penalty for s in seqs]
    if any(pres) or any(freq):
        penalty = out_counts * row_tensor(freq, logits.dtype, logits).unsqueeze(1) + \
            (out_counts > 0) * row_tensor(pres, logits.dtype, logits).unsqueeze(1)
        logits.sub_(penalty)
    rep = [s.params.repetition_penalty for s in seqs]
    if any(r != 1.0 for r in rep):
        seen = prompt_seen | (out_counts > 0)  # [N, V]
        r = row_tensor(rep, logits.dtype, logits).unsqueeze(1)
        penalized = torch.where(logits > 0, (logits / r).clamp(max=_cap(logits)), logits * r)
        logits.copy_(torch.where(seen, penalized, logits))


def _cap(logits: Tensor) -> float:
    """The most a penalized logit may become: a penalty near 0 (1e-38) divides past
    float's range, and inf turns to NaN in softmax (a sampled token 0). At the cap the
    seen tokens still take all the mass, and dividing by a temperature down to
    ``GREEDY_EPS`` stays finite."""
    return min(torch.finfo(logits.dtype).max, torch.finfo(torch.float32).max * GREEDY_EPS)


def _mask_stops(logits: Tensor, seqs: list[Sequence], eos: set[int]) -> None:
    """-inf for each early row's stop tokens: EOS (unless ``ignore_eos``) and its own."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        if _early(s):
            ids = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else eos)
            ids = sorted(t for t in ids if 0 <= t < logits.shape[1])
            rows += [i] * len(ids)
            cols += ids
    mask_pairs(logits, rows, cols)

