"""Per-request sampling features in the engine: logit_bias, penalties, min_tokens, logprobs
and prompt logprobs, each held to a reference we did not write (transformers) or to
hand-written expectations, and each per row inside mixed batches."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import make_engine

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine import logprobs
from nolaserve.server.engine.detokenizer import IncrementalDetokenizer
from nolaserve.server.engine.engine_types import (
    EngineLimits,
    RequestOutput,
    TokenLogprob,
    check_limits,
)
from nolaserve.server.engine.logits_process import process_logits as _process_logits
from nolaserve.server.engine.penalty_counts import PenaltyCounts
from nolaserve.server.engine.row_sampling import RowSampler
from nolaserve.server.engine.sequence import FinishReason, SamplingParams, Sequence

LIMITS = EngineLimits(100, 50, 200, 10, vocab_size=32)


@pytest.mark.parametrize(("fields", "message"), [
    ({"logprobs": 21}, "logprobs must be between 0 and 20"),
    ({"logprobs": -1}, "logprobs must be between 0 and 20"),
    ({"prompt_logprobs": 99}, "prompt_logprobs must be between 0 and 20"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"min_tokens": 17}, "min_tokens must be between 0 and max_tokens (16)"),
    ({"min_tokens": -1}, "min_tokens must be between 0 and max_tokens"),
    ({"logit_bias": {32: 1.0}}, "logit_bias token id 32 is out of range: token ids are 0 to 31"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token id -1 is out of range"),
    ({"logit_bias": {3: 101.0}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": {3: 10**400}}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": {10**22: 1.0}}, f"logit_bias token id {10**22} is out of range"),
    ({"temperature": 10**400}, "temperature must be a finite number, got 1000"),
    ({"top_p": -10**400}, "top_p must be a finite number"),
    ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "at most 300"),
    ({"min_p": 1.5}, "min_p must be in [0, 1]"),
    ({"min_p": float("nan")}, "min_p must be in [0, 1]"),
    ({"stop_token_ids": [32]}, "stop_token_ids entry 32 is out of range: token ids are 0 to 31"),
    ({"stop_token_ids": [-1]}, "stop_token_ids entry -1 is out of range"),
    ({"stop_token_ids": list(range(65))}, "at most 64"),
    ({"n": 2}, "n = 2: an engine request makes one sequence"),
])
def test_bad_sampling_fields_say_what_to_fix(fields, message):
    with pytest.raises(InvalidRequestError) as e:
        check_limits(LIMITS, [1, 2], SamplingParams(**fields))
    assert message in str(e.value)


def test_good_sampling_fields_pass():
    check_limits(LIMITS, [1, 2], SamplingParams(
        logprobs=20, prompt_logprobs=0, logit_bias={0: -100, 31: 100.0}, presence_penalty=-2,
        frequency_penalty=2, repetition_penalty=1.3, min_tokens=16, min_p=1.0,
        stop_token_ids=[0, 31]))


# -- logits processing, row by row ------------------------------------------------------
VOCAB = 300
EOS = 0  # bytebpe's <eos>


def seq(prompt: list[int], output: list[int] = (), **fields) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**fields))
    s.output_token_ids = list(output)
    return s


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos: set[int]) -> torch.Tensor:
    return _process_logits(logits, seqs, eos, PenaltyCounts())  # each call from scratch


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = random.Random(0)
    logits = random_logits(4)
    for penalty in (0.5, 1.3, 2.0):
        seqs = [seq([rng.randrange(VOCAB) for _ in range(9)], [rng.randrange(VOCAB) for _ in
                range(i * 3)], repetition_penalty=penalty) for i in range(4)]
        got = process_logits(logits, seqs, set())
        for i, s in enumerate(seqs):
            ref = RepetitionPenaltyLogitsProcessor(penalty)(
                torch.tensor([s.token_ids]), logits[i:i + 1].clone())
            torch.testing.assert_close(got[i], ref[0])


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, VOCAB)
    s = seq([7, 7, 8], [5, 5, 5, 6], presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, [s], set())[0]
    assert got[5].item() == -(0.5 + 3 * 0.25)
    assert got[6].item() == -(0.5 + 0.25)
    assert got[7].item() == got[8].item() == 0.0  # prompt tokens: not penalized (OpenAI)
    assert torch.count_nonzero(got).item() == 2


def test_logit_bias_is_added_and_min_tokens_masks_eos_until_reached():
    logits = random_logits(3)
    bias = seq([1], [2], logit_bias={4: 100.0, 9: -2.5})
    early = seq([1], [2, 3], min_tokens=3)
    done = seq([1], [2, 3, 4], min_tokens=3)
    got = process_logits(logits, [bias, early, done], {EOS, 2})
    want = logits.clone()
    want[0, 4] += 100.0
    want[0, 9] -= 2.5
    want[1, [EOS, 2]] = float("-inf")
    torch.testing.assert_close(got, want)
    ignoring = seq([1], [], min_tokens=3, ignore_eos=True)
    assert torch.equal(process_logits(logits[:1], [ignoring], {EOS}), logits[:1])


def test_min_tokens_masks_the_requests_stop_token_ids_too():
    """As vLLM: before ``min_tokens``, a row's ``stop_token_ids`` are masked with EOS, and
    still with ``ignore_eos`` (which frees EOS only)."""
    logits = random_logits(2, seed=2)
    got = process_logits(logits, [seq([1], [2], min_tokens=3, stop_token_ids=[7, 9]),
                                  seq([1], [], min_tokens=3, ignore_eos=True,
                                      stop_token_ids=[5])], {EOS})
    want = logits.clone()
    want[0, [EOS, 7, 9]] = float("-inf")
    want[1, 5] = float("-inf")
    torch.testing.assert_close(got, want)


def test_rows_that_do_not_ask_are_untouched_and_raw_logits_kept():
    logits = random_logits(6, seed=1)
    raw = logits.clone()
    asking = {1: {"logit_bias": {3: 5.0}}, 4: {"repetition_penalty": 1.5, "frequency_penalty": 1.0}}
    seqs = [seq([1, 2, 3], [4, 4], **asking.get(i, {})) for i in range(6)]
    got = process_logits(logits, seqs, {EOS})
    assert torch.equal(logits, raw), "the raw logits are kept for logprobs"
    for i in range(6):
        assert torch.equal(got[i], raw[i]) is (i not in asking), i
    plain = [seq([1], [2]) for _ in range(2)]
    assert process_logits(logits, plain * 3, {EOS}) is logits, "no row asks: no copy"


def test_min_tokens_holds_back_stop_strings_in_the_detokenizer(bytebpe):
    ids = bytebpe.encode("hello world")
    detok = IncrementalDetokenizer(bytebpe, ["l"], min_tokens=len(ids))
    text = "".join(detok.add([t]) for t in ids[:-1])
    assert not detok.stopped and text == bytebpe.decode(ids[:-1])
    plain = IncrementalDetokenizer(bytebpe, ["l"])
    plain.add(ids)
    assert plain.stopped and plain.text == "he"


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)


# -- the engine: logprobs, prompt logprobs, penalties per row ---------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=256)


def collect(engine, requests: dict[str, tuple[list[int], SamplingParams, str | None]]
            ) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    for rid, (prompt, params, adapter) in requests.items():
        engine.add_request(rid, prompt, params, adapter)
    for _ in range(10_000):
        if not engine.has_unfinished():
            return outs
        for out in engine.step():
            outs[out.request_id].append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``log_softmax`` of transformers' logits at every position of ``ids``: ``[T, V]``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def assert_logprob(got: TokenLogprob, ref_row: torch.Tensor, k: int) -> None:
    assert got.logprob == pytest.approx(ref_row[got.token_id].item(), abs=1e-4)
    likelier = ref_row - ref_row[got.token_id]  # the rank, where logits within 1e-4 may swap
    assert int((likelier > 1e-4).sum()) + 1 <= got.rank <= int((likelier > -1e-4).sum()) + 1
    values, ids = ref_row.topk(k)
    assert [t for t, _ in got.top] == ids.tolist()
    assert [v for _, v in got.top] == pytest.approx(values.tolist(), abs=1e-4)


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_logprobs_of_sampled_tokens_match_transformers(model, bytebpe):
    engine = make_engine(model, bytebpe)
    reqs = {"greedy": (prompt_of(7, 1), greedy(10, logprobs=5), None),
            "sampled": (prompt_of(11, 2), SamplingParams(max_tokens=10, seed=3, logprobs=0,
                                                         temperature=0.8, ignore_eos=True), None),
            "none": (prompt_of(5, 3), greedy(10), None)}
    outs = collect(engine, reqs)
    assert all(o.logprobs is None for o in outs["none"])
    for rid, k in (("greedy", 5), ("sampled", 0)):
        prompt, tokens = reqs[rid][0], tokens_of(outs[rid])
        ref = reference_logprobs(model, prompt + tokens)
        lps = [lp for o in outs[rid] for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == tokens
        for j, lp in enumerate(lps):
            assert_logprob(lp, ref[len(prompt) - 1 + j], k)


@pytest.mark.parametrize("rows_at_once", [256, 5], ids=["whole", "in-slices"])
def test_prompt_logprobs_chunk_by_chunk_match_transformers(model, bytebpe, monkeypatch,
                                                           rows_at_once):
    """Prompts over several 16-token chunks, two requests' rows in one step; their
    logprobs taken in slices of 5 rows (across the requests) or whole."""
    monkeypatch.setattr(logprobs, "PROMPT_ROWS_AT_ONCE", rows_at_once)
    engine = make_engine(model, bytebpe, max_num_batched_tokens=16)  # prompts span chunks
    reqs = {f"p{k}": (prompt_of(40 + k, k), greedy(3, prompt_logprobs=k), None) for k in (0, 3)}
    reqs["plain"] = (prompt_of(30, 9), greedy(3), None)
    outs = collect(engine, reqs)
    assert all(o.prompt_logprobs is None for o in outs["plain"])
    for k in (0, 3):
        prompt, first, *rest = reqs[f"p{k}"][0], *outs[f"p{k}"]
        assert all(o.prompt_logprobs is None for o in rest)
        got = first.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        ref = reference_logprobs(model, prompt)
        for p in range(1, len(prompt)):
            assert got[p].token_id == prompt[p]
            assert_logprob(got[p], ref[p - 1], k)


def test_processing_per_row_in_a_mixed_adapter_batch(model, bytebpe):
    engine = make_engine(model, bytebpe, num_slots=4)
    for i in range(2):
        engine.store.register(f"a{i}", random_nola(engine.store.spec, seed=i, rank=4, num_basis=32,
                                                        coeff_std=0.5).to_bytes())
    asks = {"bias": {"logit_bias": {42: 100.0}}, "rep": {"repetition_penalty": 1.8},
            "pen": {"presence_penalty": 2.0, "frequency_penalty": 2.0},
            "lp": {"logprobs": 3, "prompt_logprobs": 2}}
    reqs = {}
    for i, name in enumerate(["bias", "plain0", "rep", "plain1", "pen", "plain2", "lp"]):
        reqs[name] = (prompt_of(6 + i, 20 + i), greedy(12, **asks.get(name, {})),
                      f"a{i % 2}" if i % 3 else None)
    together = {rid: tokens_of(o) for rid, o in collect(engine, reqs).items()}
    assert together["bias"] == [42] * 12
    for rid in ("rep", "pen"):
        assert len(set(together[rid])) == 12, f"{rid}: the penalties forbid repeats here"
    for rid, req in reqs.items():
        alone = tokens_of(collect(engine, {rid: req})[rid])
        assert alone == together[rid], rid
        if rid.startswith("plain") or rid == "lp":
            unprocessed = dataclasses.replace(req[1], **{f: v for f, v in (
                ("logprobs", None), ("prompt_logprobs", None))})
            plain = tokens_of(collect(engine, {rid: (req[0], unprocessed, req[2])})[rid])
            assert plain == together[rid], rid


def test_min_tokens_holds_eos_back_then_eos_ends(model, bytebpe):
    engine = make_engine(model, bytebpe)
    push_eos = {EOS: 100.0}
    outs = collect(engine, {
        "min": (prompt_of(5, 1), SamplingParams(max_tokens=20, temperature=0, min_tokens=6,
                                                logit_bias=push_eos), None),
        "free": (prompt_of(5, 1), SamplingParams(max_tokens=20, temperature=0,
                                                 logit_bias=push_eos), None)})
    assert tokens_of(outs["free"]) == [EOS]
    got = tokens_of(outs["min"])
    assert len(got) == 7 and EOS not in got[:6] and got[6] == EOS
    assert outs["min"][-1].finish_reason is FinishReason.EOS


def test_stop_token_ids_end_the_request_after_min_tokens(model, bytebpe):
    """A stop token ends its request with STOP and is its last output token, its text not
    output unless ``include_stop_str_in_output`` (vLLM's contract); not before
    ``min_tokens``."""
    engine = make_engine(model, bytebpe)
    free = collect(engine, {"r": (prompt_of(5, 2), greedy(12), None)})
    first = tokens_of(free["r"])
    stop = first[3]
    outs = collect(engine, {
        "stop": (prompt_of(5, 2), greedy(12, stop_token_ids=[stop, VOCAB - 1]), None),
        "kept": (prompt_of(5, 2), greedy(12, stop_token_ids=[stop],
                                         include_stop_str_in_output=True), None),
        "late": (prompt_of(5, 2), greedy(12, stop_token_ids=[stop],
                                         min_tokens=first.index(stop) + 2), None)})
    got = tokens_of(outs["stop"])
    assert got == first[: first.index(stop) + 1]
    assert outs["stop"][-1].finish_reason is FinishReason.STOP
    assert outs["stop"][-1].stop_reason == stop  # vLLM's: the token id
    text = {k: "".join(o.text for o in outs[k]) for k in ("stop", "kept")}
    assert text["stop"] == bytebpe.decode(got[:-1])  # vLLM: the stop token's text is not
    assert text["kept"] == bytebpe.decode(got)  # output, unless include_stop_str_in_output
    late = tokens_of(outs["late"])
    assert late[: first.index(stop) + 1] != got and stop not in late[: first.index(stop) + 2]


def test_the_step_reads_back_once_with_logprobs_and_prompt_logprobs(model, bytebpe,
                                                                     monkeypatch):
    engine = make_engine(model, bytebpe, max_num_batched_tokens=16)
    engine.add_request("a", prompt_of(20, 1), greedy(4, logprobs=2, prompt_logprobs=1))
    engine.add_request("b", prompt_of(5, 2), greedy(4, logprobs=1, repetition_penalty=1.2))
    engine.add_request("c", prompt_of(6, 3), greedy(4, allowed_token_ids=[5, 9, 40],
                                                    bad_words=["é"]))
    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("item() syncs"))
    steps = 0
    while engine.has_unfinished():
        calls.clear()
        engine.step()
        steps += 1
        assert len(calls) == 1, f"step {steps} read back {len(calls)} times"


def test_a_failed_batched_draw_still_gives_logprobs(model, bytebpe, monkeypatch):
    engine = make_engine(model, bytebpe)
    prompt = prompt_of(6, 4)
    want = collect(engine, {"r": (prompt, greedy(3, logprobs=2), None)})["r"]
    real = RowSampler.sample_ids

    def fails(self, logits, params, gens):
        raise RuntimeError("boom")

    monkeypatch.setattr(RowSampler, "sample_ids", fails)  # the rows are drawn one by one:
    monkeypatch.setattr(RowSampler, "sample", lambda self, logits, params, gens: (
        real(self, logits, params, gens).tolist()))
    got = collect(engine, {"r": (prompt, greedy(3, logprobs=2), None)})["r"]
    assert tokens_of(got) == tokens_of(want)
    for o, w in zip(got, want):
        assert o.logprobs[0].top[0][0] == w.logprobs[0].top[0][0]
        assert o.logprobs[0].logprob == pytest.approx(w.logprobs[0].logprob, abs=1e-5)


def test_prompt_logprobs_are_whole_with_prefix_caching(model, bytebpe):
    engine = make_engine(model, bytebpe, enable_prefix_caching=True)
    prompt = prompt_of(30, 5)
    collect(engine, {"warm": (prompt, greedy(2), None)})
    hits = engine.stats.prefix_cache.hits
    first = collect(engine, {"p": (prompt, greedy(2, prompt_logprobs=1), None)})["p"][0]
    assert engine.stats.prefix_cache.hits == hits, "the cached prefix is computed again"
    ref = reference_logprobs(model, prompt)
    assert first.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        assert_logprob(first.prompt_logprobs[p], ref[p - 1], 1)
    collect(engine, {"again": (prompt, greedy(2), None)})
    assert engine.stats.prefix_cache.hits > hits, "requests without prompt logprobs still hit"


def test_the_offline_api_returns_logprobs(model, bytebpe, tmp_path):
    from nolaserve import LLM

    model.save_pretrained(tmp_path / "model")
    bytebpe.save_pretrained(tmp_path / "model")
    llm = LLM(str(tmp_path / "model"), device="cpu", dtype="float32", kv_cache_bytes=4 << 20,
              cache_dir=str(tmp_path / "cache"))
    prompt = prompt_of(9, 6)
    out = llm.generate([prompt], greedy(4, logprobs=2, prompt_logprobs=1))[0]
    llm.close()
    ref = reference_logprobs(model, prompt + out.token_ids)
    ids = prompt + out.token_ids
    positions = [(len(prompt) + j, p, 2) for j, p in enumerate(out.outputs[0].logprobs)]
    positions += [(4, out.prompt_logprobs[4], 1)]
    for at, position, k in positions:  # vLLM's {token id: Logprob(logprob, rank, text)}
        row, chosen = ref[at - 1], position[ids[at]]
        assert chosen.logprob == pytest.approx(row[ids[at]].item(), abs=1e-4)
        assert chosen.decoded_token == bytebpe.decode([ids[at]])
        values, top = row.topk(k)
        assert all(position[t].logprob == pytest.approx(v, abs=1e-4)
                   for t, v in zip(top.tolist(), values.tolist()))
        assert {position[t].rank for t in top.tolist()} <= {chosen.rank, *range(1, k + 1)}
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(p[t].logprob for p, t in zip(out.outputs[0].logprobs, out.token_ids)))


def test_min_tokens_reached_costs_nothing():
    logits = random_logits(2)
    done = [seq([1], [2, 3], min_tokens=2), seq([1], [], min_tokens=5, ignore_eos=True)]
    assert process_logits(logits, done, {EOS}) is logits


def test_logprobs_are_raw_before_bias_and_penalties(model, bytebpe):
    engine = make_engine(model, bytebpe)
    prompt = prompt_of(8, 7)
    outs = collect(engine, {"r": (prompt, greedy(4, logprobs=2, logit_bias={42: 100.0},
                                                 repetition_penalty=1.5), None)})["r"]
    assert tokens_of(outs) == [42] * 4
    ref = reference_logprobs(model, prompt + [42] * 4)
    for j, o in enumerate(outs):
        assert_logprob(o.logprobs[0], ref[len(prompt) - 1 + j], 2)
        assert o.logprobs[0].logprob < -1, "the biased logprob would be ~0"
