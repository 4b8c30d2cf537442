"""Sampler: greedy is argmax, filters drop exactly the right tokens, seeds are batch-proof."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from nolaserve.server.engine.sampler import (
    Sampler,
    apply_min_p,
    apply_temperature,
    apply_top_k_top_p,
    make_generator,
    row_argmax,
)
from nolaserve.server.engine.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# probabilities 0.6, 0.25, 0.1, 0.05 for tokens 0..3
FOUR = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()


def kept(params: SamplingParams, logits: torch.Tensor = FOUR) -> list[int]:
    probs = Sampler().probabilities(logits, [params])[0]
    return torch.nonzero(probs > 0).flatten().tolist()


def test_greedy_is_argmax_with_ties_to_lowest_index():
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(0))
    logits[3, [7, 20, 41]] = 100.0  # a three-way tie
    picks = Sampler().sample(logits, [GREEDY] * 9, [None] * 9)
    assert picks == logits.argmax(dim=1).tolist()
    assert picks[3] == 7


def test_greedy_ignores_filters_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.01, seed=5)
    assert Sampler().sample(logits, [params], [make_generator(5)]) == [1]


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=1e-30), SamplingParams(temperature=1e-7)]
    assert Sampler().sample(logits, params, [None, make_generator(1)]) == [1, 0]


def test_greedy_matches_transformers_generate():
    model = tiny_llama(seed=3)
    prompt = torch.tensor([[5, 17, 99, 3]])
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids, sampler = prompt, Sampler()
    with torch.no_grad():
        for _ in range(8):
            logits = model(ids).logits[:, -1]
            tok = sampler.sample(logits, [GREEDY], [None])
            ids = torch.cat([ids, torch.tensor([tok])], dim=1)
    assert ids.tolist() == ref.tolist()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), [0, 1, 2, 3]),
        (SamplingParams(top_k=2), [0, 1]),
        (SamplingParams(top_k=1), [0]),
        (SamplingParams(top_k=9), [0, 1, 2, 3]),  # k > V is no filter
        (SamplingParams(top_p=0.5), [0]),
        (SamplingParams(top_p=0.8), [0, 1]),  # 0.6 + 0.25 >= 0.8
        (SamplingParams(top_p=0.9), [0, 1, 2]),
        (SamplingParams(top_p=1e-9), [0]),  # the top token is always kept
        (SamplingParams(top_k=3, top_p=0.7), [0, 1]),  # 0.6 / 0.95 < 0.7
        (SamplingParams(top_k=2, top_p=0.7), [0]),  # 0.6 / 0.85 >= 0.7
    ],
)
def test_filters_keep_the_right_tokens(params, expected):
    assert kept(params) == expected


def test_filtered_tokens_are_never_sampled():
    logits = FOUR.repeat(500, 1)
    gen = make_generator(0)
    for params, allowed in [(SamplingParams(top_k=2), {0, 1}),
                            (SamplingParams(top_p=0.9), {0, 1, 2})]:
        picks = Sampler().sample(logits, [params] * 500, [gen] * 500)
        assert set(picks) == allowed


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0]])
    assert kept(SamplingParams(top_k=2), logits) == [0, 1, 2]


def test_temperature_scales_then_softmaxes():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.0, 4.0]])
    params = [SamplingParams(temperature=2.0), SamplingParams(temperature=0.5)]
    probs = Sampler().probabilities(logits, params)
    expected = torch.stack([(logits[0] / 2.0).softmax(0), (logits[1] / 0.5).softmax(0)])
    torch.testing.assert_close(probs, expected)
    # greedy rows are left unscaled instead of dividing by zero
    scaled = apply_temperature(logits, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(scaled).all()


def test_rows_are_filtered_independently():
    """Per-row parameters in one batch give what each row gives alone."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(),
              SamplingParams(temperature=0.3, top_k=10, top_p=0.9), GREEDY]
    batch = Sampler().probabilities(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(batch[i], Sampler().probabilities(logits[i : i + 1], [p])[0])


def test_top_p_one_keeps_even_the_tokens_float_rounding_would_drop():
    """top_p = 1 is off for its row even when another row of the batch filters: its tail
    tokens (probability ~1e-13, so their cumulative mass rounds to 1.0) stay samplable."""
    logits = torch.tensor([[0.0, -30.0, -30.0, -30.0]] * 2)
    probs = Sampler().probabilities(logits, [SamplingParams(), SamplingParams(top_p=0.5)])
    assert torch.nonzero(probs[0] > 0).flatten().tolist() == [0, 1, 2, 3]
    assert torch.nonzero(probs[1] > 0).flatten().tolist() == [0]


@settings(max_examples=80, deadline=None)
@given(
    logits=st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=12),
    top_k=st.integers(0, 14),
    top_p=st.floats(0.01, 1.0),
)
def test_filter_properties(logits, top_k, top_p):
    x = torch.tensor([logits])
    out = apply_top_k_top_p(x, torch.tensor([top_k]), torch.tensor([top_p]))[0]
    keep = torch.isfinite(out)
    assert keep[x[0].argmax()], "the top token is always kept"
    assert torch.equal(out[keep], x[0][keep]), "kept logits are unchanged"
    if keep.sum() < len(logits):
        assert x[0][keep].min() >= x[0][~keep].max(), "kept tokens are the most likely"
    after_k = x[0] if top_k == 0 else x[0].masked_fill(x[0] < x[0].topk(min(top_k, len(logits)))
                                                      .values[-1], -math.inf)
    probs = after_k.softmax(0)
    if top_p < 1:
        mass = probs[keep].sum().item()
        assert mass >= top_p - 1e-5, "kept mass reaches top_p"
        assert mass - probs[keep].min().item() < top_p + 1e-5, "and is the smallest such set"
    else:
        assert torch.equal(keep, torch.isfinite(after_k))


def seeded_run(seed: int, position: int, batch: int, steps: int = 12) -> list[int]:
    """Tokens of the seeded request at ``position`` in a batch of ``batch`` mixed rows."""
    vocab = 64
    logit_gen = torch.Generator().manual_seed(123)
    step_logits = [torch.randn(vocab, generator=logit_gen) for _ in range(steps)]
    others = [SamplingParams(top_k=5), GREEDY, SamplingParams(temperature=0.7, top_p=0.8, seed=9)]
    params, gens = [], []
    for j in range(batch):
        p = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=seed) if j == position \
            else others[j % len(others)]
        params.append(p)
        gens.append(make_generator(p.seed))
    filler = torch.Generator().manual_seed(batch * 31 + position)
    out = []
    for logits in step_logits:
        rows = torch.randn(batch, vocab, generator=filler) * 3
        rows[position] = logits
        out.append(Sampler().sample(rows, params, gens)[position])
    return out


def test_seeded_rows_do_not_depend_on_the_batch():
    alone = seeded_run(seed=42, position=0, batch=1)
    for position, batch in [(0, 3), (2, 3), (5, 7), (12, 13)]:
        assert seeded_run(seed=42, position=position, batch=batch) == alone
    assert seeded_run(seed=43, position=0, batch=1) != alone


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize("seeded", [True, False])
def test_distribution_matches_probabilities(seeded):
    target = torch.tensor([0.5, 0.3, 0.2])
    n = 2000
    logits = target.log().repeat(n, 1)
    gens = [make_generator(0)] * n if seeded else [None] * n
    with torch.random.fork_rng():
        torch.manual_seed(0)
        picks = Sampler().sample(logits, [SamplingParams(temperature=1.0)] * n, gens)
    freq = torch.bincount(torch.tensor(picks), minlength=3).float() / n
    torch.testing.assert_close(freq, target, atol=0.04, rtol=0)  # ~3.5 sigma


def test_batch_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="batch mismatch"):
        Sampler().sample(torch.zeros(2, 5), [GREEDY], [None, None])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        Sampler().sample(torch.zeros(5), [GREEDY], [None])


def test_only_rows_that_ask_are_filtered_and_only_top_p_sorts(monkeypatch):
    from nolaserve.server.engine import sampler as sampler_mod

    calls = []
    real = sampler_mod.apply_top_k_top_p

    def recording(logits, top_k, top_p, **kw):
        calls.append((logits.shape[0], kw["use_p"]))
        return real(logits, top_k, top_p, **kw)

    monkeypatch.setattr(sampler_mod, "apply_top_k_top_p", recording)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort",
                        lambda self, *a, **kw: sorts.append(self.shape) or real_sort(self, *a,
                                                                                     **kw))
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    params = [GREEDY, SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_p=0.5),
              SamplingParams(top_k=2)]
    Sampler().sample(logits, params, [None] * 5)
    assert sorted(calls) == [(1, True), (2, False)]  # greedy and plain rows untouched
    assert sorts == [torch.Size([1, 40])]  # one sorted row: the top-p one
    calls.clear()
    Sampler().sample(logits, [SamplingParams()] * 5, [None] * 5)
    assert calls == []


def test_seeded_draw_uses_the_generator_on_its_device():
    gen = make_generator(3, "cpu")
    assert gen.device.type == "cpu"
    a = Sampler().sample(FOUR.repeat(4, 1), [SamplingParams(seed=3)] * 4, [make_generator(3)] * 4)
    b = Sampler().sample(FOUR.repeat(4, 1), [SamplingParams(seed=3)] * 4, [make_generator(3)] * 4)
    assert a == b


@pytest.mark.parametrize("vocab", [1, 100, 128, 129, 255, 384, 49152, 49153])
def test_row_argmax_is_argmax_with_its_ties(vocab):
    """The two-pass greedy argmax picks what ``argmax`` picks, the lowest index on ties:
    few distinct values make ties within and across chunks, and in a short last chunk."""
    gen = torch.Generator().manual_seed(vocab)
    for few in (False, True):
        x = torch.randint(-2, 3, (16, vocab), generator=gen).float() if few else \
            torch.randn(16, vocab, generator=gen)
        x[0] = 1.0  # every column ties
        x[1, -1] = 99.0  # the maximum in the last column
        assert torch.equal(row_argmax(x), x.argmax(dim=1))


def test_min_p_drops_what_transformers_min_p_drops():
    """``apply_min_p`` against transformers' ``MinPLogitsWarper`` (a reference we did not
    write), row by row with each row's own ``min_p``; ``min_p == 0`` drops nothing."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    min_ps = [0.0, 0.01, 0.05, 0.2, 0.5, 1.0]
    got = apply_min_p(logits, torch.tensor(min_ps))
    assert torch.equal(got[0], logits[0])
    for i, m in enumerate(min_ps[1:], start=1):
        want = MinPLogitsWarper(m)(None, logits[i : i + 1].clone())[0]
        assert torch.equal(got[i].isinf(), want.isinf()), m
        assert torch.equal(got[i][~got[i].isinf()], logits[i][~got[i].isinf()])


def test_min_p_comes_before_top_p_as_in_vllm():
    """vLLM filters min-p first, then top-k/top-p over what is left: a row with both keeps
    the top-p set of the min-p survivors, renormalized."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    probs = Sampler().probabilities(logits, [SamplingParams(min_p=0.3, top_p=0.75)])
    # min-p 0.3 x 0.4 drops 0.1; of 0.4, 0.3, 0.2 (renormalized: 0.44, 0.33, 0.22) top-p
    # 0.75 keeps two. Top-p first (transformers' order) would have kept three.
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    only = Sampler().probabilities(logits, [SamplingParams(min_p=1.0)])
    assert only[0].tolist() == [1.0, 0.0, 0.0, 0.0]
