"""Penalties read per-request token counts kept across steps (penalty_counts.py): over
many steps they equal the counts rebuilt from every token (the former per-step code, kept
here as the reference), and a step converts only the tokens accepted since the last."""

from __future__ import annotations

import gc
import random

import torch

from nolaserve.server.engine import logits_process, penalty_counts
from nolaserve.server.engine.logits_process import process_logits
from nolaserve.server.engine.penalty_counts import PenaltyCounts
from nolaserve.server.engine.sampler import Sampler
from nolaserve.server.engine.sequence import SamplingParams, Sequence

VOCAB = 64
KINDS = [{"presence_penalty": 0.5, "frequency_penalty": 0.25}, {"repetition_penalty": 1.3},
         {"repetition_penalty": 0.7, "frequency_penalty": -0.5, "logit_bias": {3: 2.0}},
         {"logit_bias": {5: -1.0}}, {}]


def _reference(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The former per-step computation: counts rebuilt from every token of each row."""
    out = logits.clone()
    for i, s in enumerate(seqs):
        p = s.params
        for t, v in p.logit_bias.items():
            out[i, t] += v
        counts = torch.zeros(VOCAB).index_add_(
            0, torch.tensor(s.output_token_ids, dtype=torch.int64),
            torch.ones(len(s.output_token_ids)))
        out[i] -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(VOCAB, dtype=torch.bool)
            seen[s.token_ids] = True
            r = p.repetition_penalty
            out[i] = torch.where(seen, torch.where(out[i] > 0, out[i] / r, out[i] * r), out[i])
    return out


def _new_seq(rng: random.Random, rid: int) -> Sequence:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    return Sequence(str(rid), prompt, SamplingParams(**rng.choice(KINDS)))


def test_incremental_counts_equal_the_rebuilt_ones_over_many_steps():
    rng, counts = random.Random(0), PenaltyCounts(initial_rows=2)
    live = [_new_seq(rng, i) for i in range(5)]
    for step in range(80):
        batch = [s for s in live if rng.random() < 0.8]  # the others wait (preempted)
        logits = torch.randn(len(batch), VOCAB, generator=torch.Generator().manual_seed(step))
        got = process_logits(logits, batch, set(), counts)
        assert torch.equal(got, _reference(logits, batch)), step
        for s in batch:
            s.output_token_ids.append(int(got[batch.index(s)].argmax()))
        if step % 7 == 3:  # one ends, a new one (sometimes the n-th choice of one) starts
            live.pop(rng.randrange(len(live)))
            twin = rng.choice(live)
            live.append(Sequence("n", list(twin.prompt_token_ids), twin.params)
                        if step % 2 else _new_seq(rng, 100 + step))
    gc.collect()
    assert counts.rows_held == sum(1 for s in live if logits_process._penalized(s))


def test_a_step_converts_only_the_new_tokens(monkeypatch):
    converted: list[int] = []

    def counting(values, dtype, like):
        flat = [v for row in values for v in row] if values and isinstance(
            values[0], list) else list(values)
        converted.append(len(flat))
        return torch.tensor(values, dtype=dtype)
    monkeypatch.setattr(logits_process, "row_tensor", counting)
    monkeypatch.setattr(penalty_counts, "row_tensor", counting)
    counts = PenaltyCounts()
    seqs = [Sequence(str(i), list(range(20)), SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)) for i in range(3)]
    per_step = []
    for step in range(60):
        converted.clear()
        process_logits(torch.randn(3, VOCAB), seqs, set(), counts)
        per_step.append(sum(converted))
        for s in seqs:
            s.output_token_ids.append(step % VOCAB)
    assert per_step[1] == per_step[59]  # not growing with the tokens generated
    assert per_step[0] > per_step[1]  # the first step marks the prompts, once


def test_a_finished_requests_row_is_reused():
    counts = PenaltyCounts(initial_rows=2)
    for i in range(10):
        s = Sequence(str(i), [1, 2, 3], SamplingParams(repetition_penalty=1.5))
        s.output_token_ids = [4] * i
        got = process_logits(torch.ones(1, VOCAB), [s], set(), counts)
        assert torch.equal(got, _reference(torch.ones(1, VOCAB), [s]))
        del s
        gc.collect()
        assert counts.rows_held == 0
    assert counts._counts.shape[0] == 2  # the freed row was taken again, never grown


def test_a_released_row_is_free_at_once_while_the_sequence_lives_on():
    """The engine releases a finished request's row (``Engine._finish``); the Sequence may
    live on (the caller holds it) and the row is not freed a second time when it goes."""
    counts = PenaltyCounts(initial_rows=1)
    kept = []
    for i in range(3):
        s = Sequence(str(i), [1, 2], SamplingParams(presence_penalty=1.0))
        s.output_token_ids = [3] * i
        got = process_logits(torch.ones(1, VOCAB), [s], set(), counts)
        assert torch.equal(got, _reference(torch.ones(1, VOCAB), [s]))
        counts.release(s)
        assert counts.rows_held == 0
        kept.append(s)
    kept.clear()
    gc.collect()
    assert counts._counts.shape[0] == 1 and counts._free == [0]


def test_a_repetition_penalty_near_zero_samples_a_seen_token_not_token_0():
    """1e-38 passes "finite and > 0"; a seen token's logit divided by it was inf, softmax
    NaN, and the sampler drew token 0 (an outside probe's find)."""
    logits = torch.linspace(-1.0, 1.0, VOCAB).unsqueeze(0)
    for r in (1e-38, 1e-45):
        params = SamplingParams(repetition_penalty=r, temperature=0.7)
        seq = Sequence("0", [40, 50, 5], params)
        processed = process_logits(logits, [seq], set(), PenaltyCounts())
        assert torch.isfinite(processed).all()
        probs = Sampler().probabilities(processed, [params])
        assert torch.isfinite(probs).all()
        assert probs[0, [40, 50]].sum() == 1.0  # the seen tokens with a positive logit
