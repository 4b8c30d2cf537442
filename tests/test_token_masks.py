"""vLLM's ``allowed_token_ids`` and ``bad_words`` in the native engine, held to
transformers ``generate`` (``prefix_allowed_tokens_fn`` and ``bad_words_ids``), per row in
mixed batches; and a request whose masks leave no token fails alone, saying why."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run, step_all, word_of
from openai_helpers import GREEDY, http, http_serving, openai_client
from server_helpers import serving

from nolaserve.adapters.errors import InvalidRequestError, Status
from nolaserve.clients.client import AsyncClient
from nolaserve.server.engine.engine_types import EngineLimits, check_limits
from nolaserve.server.engine.sequence import FinishReason, SamplingParams
from nolaserve.server.engine.token_masks import bad_word_ids, banned_now
from nolaserve.v1 import inference_pb2

VOCAB = 300
PROMPT = [5, 17, 99, 3, 250, 42, 8]
TEXT = "héllo wörld"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=256)


def hf(model, prompt: list[int], n: int, **kwargs) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("fields", "message"), [
    ({"allowed_token_ids": []}, "allowed_token_ids is empty"),
    ({"allowed_token_ids": [3, 32]}, "allowed_token_ids entry 32 is out of range"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids entry -1 is out of range"),
    ({"allowed_token_ids": [1] * 33}, "allowed_token_ids has 33 entries; at most 32"),
    ({"bad_words": [""]}, "bad_words: at most 128 strings of 1 to 256"),
    ({"bad_words": ["   "]}, "not only spaces"),
    ({"bad_words": ["x" * 257]}, "bad_words: at most 128"),
    ({"bad_words": ["w"] * 129}, "bad_words: at most 128"),
])
def test_bad_fields_say_what_to_fix(fields, message):
    with pytest.raises(InvalidRequestError) as e:
        check_limits(EngineLimits(100, 50, 200, 10, vocab_size=32), [1, 2],
                     SamplingParams(**fields))
    assert message in str(e.value)


def test_bad_words_tokenize_alone_and_after_a_space(bytebpe):
    words = bad_word_ids(bytebpe, ["héllo", " café", "héllo"])
    for word in ("héllo", "café"):
        alone = tuple(bytebpe.encode(word, add_special_tokens=False))
        spaced = tuple(bytebpe.encode(" " + word, add_special_tokens=False))
        assert alone in words
        assert (spaced in words) == (spaced[0] != alone[0] and len(spaced) == len(alone))
    assert len(words) == len(set(words)), "a repeated word is banned once"
    with pytest.raises(InvalidRequestError, match="takes token ids only"):
        bad_word_ids(None, ["x"])


def test_bad_words_are_limited_by_their_token_sequences_as_vllm_counts_them():
    """128 sequences, as vLLM's ``MAX_NUM_BAD_WORDS``: 64 words of two each (the README
    and the proto said 128 words). Here every word is one token, another after a space."""
    def tokenizer(text: str, add_special_tokens: bool) -> dict:
        return {"input_ids": [2 * int(text.strip()) + text.startswith(" ")]}

    words = [str(i) for i in range(65)]
    assert len(bad_word_ids(tokenizer, words[:64])) == 128
    with pytest.raises(InvalidRequestError, match=r"gives 130 token sequences \(one or two "
                       r"a word: alone, and after a space, as vLLM counts them\); at most 128"):
        bad_word_ids(tokenizer, words)


def test_a_word_is_banned_only_at_its_last_token_after_the_rest():
    bad = ((7,), (1, 2, 3))
    assert banned_now(bad, []) == [7]
    assert banned_now(bad, [5, 1, 2]) == [7, 3]
    assert banned_now(bad, [1, 2, 5]) == [7]
    assert banned_now(((1, 2, 3),), [2]) == []


def test_allowed_token_ids_match_transformers_prefix_allowed_tokens(model, bytebpe):
    allowed = [4, 40, 77, 123, 299]
    engine = make_engine(model, bytebpe)
    got = run(engine, {"limited": (PROMPT, greedy(10, allowed_token_ids=allowed), None),
                       "free": (PROMPT, greedy(10), None)})
    assert got["limited"] == hf(model, PROMPT, 10, prefix_allowed_tokens_fn=lambda *_: allowed)
    assert got["free"] == hf(model, PROMPT, 10), "the other row is untouched"
    assert set(got["limited"]) <= set(allowed) and got["limited"] != got["free"]


def test_bad_words_match_transformers_bad_words_ids(model, bytebpe):
    engine = make_engine(model, bytebpe)
    free = run(engine, {"r": (PROMPT, greedy(12), None)})["r"]
    # a word of two of the free output's tokens, and one of one token: both must go
    words = [word_of(bytebpe, free, 2), word_of(bytebpe, free, 1)]
    banned = bad_word_ids(bytebpe, words)
    assert all(w[:-1] != tuple(PROMPT[-len(w) + 1:]) for w in banned if len(w) > 1), \
        "transformers matches the prompt too; vLLM (and we) the output only"
    got = run(engine, {"bad": (PROMPT, greedy(12, bad_words=words), None),
                       "free": (PROMPT, greedy(12), None)})
    assert got["bad"] == hf(model, PROMPT, 12, bad_words_ids=[list(w) for w in banned])
    assert got["bad"] != free and got["free"] == free
    for w in banned:
        assert all(tuple(got["bad"][i:i + len(w)]) != w for i in range(len(got["bad"])))


def test_masks_leaving_no_token_fail_that_request_alone(model, bytebpe):
    engine = make_engine(model, bytebpe)
    eos = bytebpe.eos_token_id
    engine.add_request("none", PROMPT, SamplingParams(max_tokens=8, temperature=0.7,
                                                      allowed_token_ids=[eos], min_tokens=3))
    engine.add_request("ok", PROMPT, greedy(8))
    outs = step_all(engine)
    last = outs["none"][-1]
    assert last.finish_reason is FinishReason.ERROR and last.error_code is Status.INVALID_ARGUMENT
    assert "no token can come at output token 0" in last.error and "loosen" in last.error
    assert [t for o in outs["ok"] for t in o.token_ids] == hf(model, PROMPT, 8)


def test_both_fields_over_http_grpc_and_the_client_give_the_engines_tokens(model, bytebpe):
    """As the official ``openai`` client sends them (extra_body), as gRPC fields and as
    the Python client's keywords: the engine's tokens; bad values are 400 /
    INVALID_ARGUMENT naming the field."""
    engine = make_engine(model, bytebpe)
    ids = bytebpe(TEXT)["input_ids"]
    free = run(engine, {"r": (ids, greedy(8), None)})["r"]
    cases = [{"allowed_token_ids": [4, 40, 77]}, {"bad_words": [word_of(bytebpe, free, 1)]}]
    want = [run(engine, {"r": (ids, greedy(8, **f), None)})["r"] for f in cases]

    async def main():
        async with http_serving(engine) as (_, url), http(url) as h:
            oa = openai_client(url)
            over_http = [(await oa.completions.create(
                model="", prompt=TEXT, max_tokens=8, temperature=0, extra_body=GREEDY | f)
                ).choices[0].token_ids for f in cases]
            bad = [await h.post("/v1/completions", json={"prompt": TEXT, **b}) for b in (
                {"allowed_token_ids": []}, {"allowed_token_ids": [300]}, {"bad_words": [""]},
                {"bad_words": "x"})]
        async with serving(engine) as c:
            sampling = dict(max_tokens=8, temperature=0, ignore_eos=True)
            raw = [list((await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=TEXT, sampling=inference_pb2.SamplingParams(**sampling | f))))
                .token_ids) for f in cases]
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                typed = [(await client.generate(TEXT, **sampling | f)).token_ids
                         for f in cases]
        return over_http, bad, raw, typed

    over_http, bad, raw, typed = asyncio.run(main())
    assert over_http == raw == typed == want
    assert set(want[0]) <= {4, 40, 77} and want[1] != free
    assert [r.status_code for r in bad] == [400] * 4
    assert "allowed_token_ids is empty" in bad[0].json()["error"]["message"]
    assert "allowed_token_ids entry 300" in bad[1].json()["error"]["message"]
    assert "bad_words" in bad[2].json()["error"]["message"]
