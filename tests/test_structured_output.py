"""Structured output (issue #30 item 2): output held to a JSON schema, or to any JSON object,
by a grammar (server/engine/structured.py), per row of mixed-adapter batches. The tiny
random model produces garbage on its own, so the grammar does all the work: every output
must parse and match its schema (checked with ``jsonschema``)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run, step_all
from vllm_helpers import vllm_python

from nolaserve.adapters.errors import InvalidRequestError, QueueFullError, Status
from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine import structured as grammars
from nolaserve.server.engine.schema_checks import enforceable
from nolaserve.server.engine.sequence import FinishReason, SamplingParams, StructuredSpec
from nolaserve.server.engine.structured import (
    GRAMMAR_GRACE_S,
    MAX_SCHEMA_CHARS,
    GrammarState,
    SharedGrace,
)

# Schemas whose every output is short enough to complete within max_tokens even when the
# model picks among the allowed tokens at random (bounded strings via patterns, enums,
# bounded integers and arrays).
SCHEMAS = [
    {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "n", "color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
     "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{0,5}$"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
            "required": ["name", "tags"], "additionalProperties": False},
        "kind": {"anyOf": [{"type": "null"}, {"type": "boolean"},
                           {"const": "other"}]}},
     "required": ["user", "kind"], "additionalProperties": False},
]
ADAPTERS = (None, "a", "b")


@pytest.fixture(scope="module")
def model():
    # EOS 0 is the tokenizer's <eos>: LlamaConfig's default (2) is '"' in bytebpe
    return tiny_llama(vocab_size=300, eos_token_id=0)


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, bytebpe)
    for seed, name in enumerate(ADAPTERS[1:]):
        engine.store.register(name, random_nola(engine.store.spec, seed=seed + 1, rank=4,
                                                num_basis=16).to_bytes())
    return engine


def texts(engine, requests: dict[str, tuple[list[int], SamplingParams, str | None]]
          ) -> dict[str, tuple[str, FinishReason]]:
    """Run ``requests`` to the end: each one's text and finish reason."""
    got: dict[str, list] = {rid: ["", None] for rid in requests}
    for rid, (prompt, params, adapter) in requests.items():
        engine.add_request(rid, prompt, params, adapter)
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0] += out.text
            if out.finished:
                got[out.request_id][1] = out.finish_reason
    return {rid: (text, reason) for rid, (text, reason) in got.items()}


def structured(schema: dict | None, seed: int, **fields) -> SamplingParams:
    spec = StructuredSpec(None if schema is None else json.dumps(schema))
    return SamplingParams(**{"max_tokens": 120, "temperature": 1.0, "seed": seed,
                             "structured": spec, **fields})


def test_json_schema_output_always_parses_and_matches(engine):
    """Several schemas x random adapters x seeds in one mixed batch: every output is JSON
    that validates, ended by the EOS its complete grammar leaves (as vLLM), not by
    max_tokens."""
    requests = {f"{s}-{a}-{seed}": ([5 + seed, 6, 7], structured(schema, seed), a)
                for s, schema in enumerate(SCHEMAS) for a in ADAPTERS for seed in range(3)}
    for rid, (text, reason) in texts(engine, requests).items():
        assert reason is FinishReason.EOS, (rid, text)
        jsonschema.validate(json.loads(text), SCHEMAS[int(rid.split("-")[0])])


def test_strings_bounded_by_length_hold_no_raw_control_characters(engine):
    """xgrammar's ``maxLength`` rule alone lets raw control characters in (``json.loads``
    refuses them); structured.py says the lengths as a pattern too. A property named as a
    keyword (``not``) is a name, not a keyword."""
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 4},
        "t": {"type": "string", "minLength": 1, "maxLength": 3},
        "not": {"type": "string", "maxLength": 2},
        "e": {"enum": [{"type": "string", "maxLength": 1, "pattern": "x"}]}},  # a value
        "required": ["s", "t", "e", "not"], "additionalProperties": False}
    requests = {f"c{seed}": ([7, seed], structured(schema, seed), ADAPTERS[seed % 3])
                for seed in range(12)}
    for rid, (text, reason) in texts(engine, requests).items():
        assert reason is FinishReason.EOS, (rid, text)
        jsonschema.validate(json.loads(text), schema)
    given = json.loads(enforceable(json.dumps(schema)))["properties"]
    assert given["t"] == {"type": "string", "pattern": "^.{1,3}$"}  # nothing for xgrammar to
    assert given["e"] == schema["properties"]["e"]                   # say it ignores


def test_json_object_is_an_object_and_ends_even_with_ignore_eos(engine):
    """``json_object``: any JSON object; the request ends when the object closes, even with
    ``ignore_eos`` (a '"' and '}' bias keeps the random model's keys short)."""
    quote, close = engine.tokenizer.convert_tokens_to_ids(['"', "}"])
    requests = {f"o{seed}": ([9, seed], structured(None, seed, ignore_eos=True,
                                                   logit_bias={quote: 6.0, close: 4.0}), a)
                for seed in range(4) for a in ADAPTERS}
    for rid, (text, reason) in texts(engine, requests).items():
        assert reason is FinishReason.STOP, (rid, text)
        assert isinstance(json.loads(text), dict)


def test_rows_without_a_grammar_are_untouched(engine):
    """A plain request gets the same tokens beside structured ones as alone."""
    alone = run(engine, {"plain": ([3, 4, 5], greedy(12), "a")})["plain"]
    mixed = run(engine, {"plain": ([3, 4, 5], greedy(12), "a"),
                         **{f"s{i}": ([3, 4, 5], structured(SCHEMAS[i], i), "a")
                            for i in range(3)}})
    assert mixed["plain"] == alone


CHOICES = ("héllo", "wörld 😀", 'a "q" \\', "héllo wörld")  # a prefix of another


# An EBNF grammar (xgrammar's syntax) and the regular expression of the same language.
GRAMMAR = 'root ::= ("oui" | "non") " " [0-9]{1,3} ("," item)*\nitem ::= [a-c]+'
GRAMMAR_AS_REGEX = r"(oui|non) [0-9]{1,3}(,[a-c]+)*"
LARK = 'start: ("oui" | "non") " " NUMBER ("," ITEM)*\nNUMBER: /[0-9]{1,3}/\nITEM: /[a-c]+/'


def test_regex_choice_and_grammar_outputs_match_whole_in_a_mixed_batch(engine):
    """vLLM's ``choice``, ``regex`` and ``grammar``: beside JSON and plain rows, across
    adapters and seeds, each output is one of the choices or matches the regex (the
    grammar's language) whole, and ends by the grammar (``stop``: nothing may follow) or
    by EOS (where the output may also go on: a choice that is a prefix of another, 1-4
    letters)."""
    regex = r"[0-9]{3}-[a-zé]{1,4}"
    specs = {"choice": StructuredSpec(choice=CHOICES), "regex": StructuredSpec(regex=regex),
             "json": StructuredSpec(json.dumps(SCHEMAS[0])),
             "grammar": StructuredSpec(grammar=GRAMMAR), "lark": StructuredSpec(grammar=LARK)}
    requests = {f"{kind}-{a}-{seed}": ([5 + seed, 6], SamplingParams(
        max_tokens=60, temperature=1.0, seed=seed, structured=spec), a)
        for kind, spec in specs.items() for a in ADAPTERS for seed in range(4)}
    requests["plain"] = ([5, 6], greedy(6), "a")
    for rid, (text, reason) in texts(engine, requests).items():
        kind = rid.split("-")[0]
        if kind in ("choice", "regex"):
            assert reason in (FinishReason.STOP, FinishReason.EOS), (rid, text)
            assert text in CHOICES if kind == "choice" else re.fullmatch(regex, text), rid
        elif kind in ("grammar", "lark"):  # a list may go on: at max_tokens, a prefix
            done = reason in (FinishReason.STOP, FinishReason.EOS)
            assert re.fullmatch(GRAMMAR_AS_REGEX if done else GRAMMAR_AS_REGEX + "(,[a-c]*)?",
                                text), (rid, text, reason)
        elif kind == "json":
            jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_a_grammar_writes_a_special_tokens_text_in_plain_tokens(bytebpe):
    """xgrammar took a special token for its text, which the output text drops: a choice
    ``<filename>`` came back as an empty text (an outside probe). Special tokens but the
    stop ones are now never allowed, so the grammar's text is written in plain tokens."""
    import copy

    import xgrammar as xgr

    tok = copy.deepcopy(bytebpe)
    tok.add_special_tokens({"additional_special_tokens": ["<tag>"]})
    tag, eos = tok.convert_tokens_to_ids("<tag>"), tok.eos_token_id
    compiled = xgr.GrammarCompiler(grammars.token_info(tok, len(tok), [eos])).compile_grammar(
        'root ::= "<tag>"')
    assert not xgr.GrammarMatcher(compiled).accept_token(tag)
    matcher = xgr.GrammarMatcher(compiled)
    assert all(matcher.accept_token(tok.convert_tokens_to_ids(c)) for c in "<tag>")
    assert matcher.accept_token(eos) and matcher.is_terminated()


def schema(value: dict) -> StructuredSpec:
    return StructuredSpec(json_schema=json.dumps(value))


def test_an_all_of_of_one_schema_is_that_schema():
    """pydantic's spelling of a ``$ref`` with a description; xgrammar dropped it whole."""
    given = {"$defs": {"P": {"type": "integer"}}, "type": "object",
             "properties": {"p": {"allOf": [{"$ref": "#/$defs/P"}], "description": "d"}},
             "required": ["p"], "additionalProperties": False}
    held = json.loads(enforceable(json.dumps(given)))["properties"]["p"]
    assert held == {"$ref": "#/$defs/P", "description": "d"}
    closed = {"type": "object", "properties": {"a": {"type": "integer"}},
              "additionalProperties": False, "maxProperties": 1}
    assert enforceable(json.dumps(closed)) == json.dumps(closed)


@pytest.mark.parametrize(("spec", "message"), [
    (StructuredSpec(regex="(ab"), "the regex cannot be enforced: .*parenthesis"),
    (StructuredSpec(choice=()), "choice must be a list of non-empty strings"),
    (StructuredSpec(choice=("a", "")), "choice must be a list of non-empty strings"),
    (StructuredSpec(regex="a" * (MAX_SCHEMA_CHARS + 1)), "the regex has .* simplify it"),
    (StructuredSpec(grammar='start ::= "a"'), "the grammar cannot be enforced: .*root"),
    (StructuredSpec(grammar='root ::= "a'), "the grammar cannot be enforced"),
    (StructuredSpec(grammar='root: "a"'), "the Lark grammar cannot be enforced: .*start"),
    # xgrammar would hold the output to only one of each pair, saying so in its log only
    (StructuredSpec(json_schema=json.dumps({"type": "object", "properties": {"c": {
        "type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}})),
     "pattern and its minLength/maxLength cannot both be enforced: put the length into"),
    (StructuredSpec(json_schema=json.dumps({"type": "array", "items": {
        "type": "string", "format": "date", "minLength": 30}})), "format and its minLength"),
    (StructuredSpec(json_schema=json.dumps({"anyOf": [{"not": {"type": "integer"}}]})),
     "'not' would not be enforced: remove it"),
    # xgrammar drops these, or the whole schema, and the output ends "stop" unheld (an
    # outside probe's outputs failed each of them)
    (schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "'allOf' would not be "
     "enforced: merge its schemas into one"),
    (schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     "'uniqueItems' would not be enforced"),
    (schema({"type": "array", "contains": {"const": 1}}), "'contains' would not be"),
    (schema({"if": {"type": "string"}, "then": {"const": "a"}}), "'if' would not be"),
    (schema({"type": "object", "properties": {"a": {}, "b": {}},
             "dependentRequired": {"a": ["b"]}}), "'dependentRequired' would not be"),
    (schema({"$ref": "https://example.com/s.json"}), r"\$ref 'https://example.com/s.json' "
     "is outside the schema and would not be enforced"),
    (schema({"type": "number", "multipleOf": 0.5}), "'multipleOf' is enforced only on "
     '"type": "integer"'),
    (schema({"type": "object", "required": ["x"]}), "required names 'x', which properties "
     "does not define"),
    (schema({"type": "object", "additionalProperties": {"type": "integer"},
             "minProperties": 3}), "'minProperties' would not be enforced where keys are "
     "open"),
    # lone surrogates (a JSON "\ud800" escape), named; they got the codec's error, or
    # xgrammar's "Check failed" with the whole schema after it
    (StructuredSpec(regex="a\ud800"), r"the regex is not valid Unicode: .*U\+D800\) at "
     "character 1"),
    (StructuredSpec(choice=("a", "\udfff")), r"the choice list is not valid Unicode"),
    (StructuredSpec(json_schema=json.dumps({"enum": ["\ud800"]})),
     r"the JSON schema cannot be enforced: it holds a lone surrogate \(U\+D800\): send"),
    (StructuredSpec(json_schema='{"items":' * 2000 + "{}" + "}" * 2000),
     "the JSON schema cannot be enforced: it nests too deep to parse; send"),
    (StructuredSpec(json_schema='{"enum": [NaN]}'),  # xgrammar's own parse error, trimmed
     r"cannot be enforced: Failed to parse JSON: syntax error at line 1 near: NaN\]}; send"),
])
def test_a_bad_regex_choice_or_grammar_is_refused_before_the_model(engine, spec, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", [1, 2], SamplingParams(max_tokens=8, structured=spec))
    assert not engine.has_unfinished()


def test_compiled_grammars_are_kept_within_a_byte_bound(engine, monkeypatch):
    """An outside probe's 320 distinct 42 KB schemas grew the server by 2.4 GB: the cache
    was bounded by count. It is bounded by xgrammar's ``memory_size_bytes`` now, least
    recently used out, the newest kept whatever its size."""
    specs = [StructuredSpec(json.dumps({"type": "object", "properties": {
        f"k{i}_{j}": {"type": "integer"} for j in range(40)}})) for i in range(6)]
    sizes = [engine.grammars.compile(s).memory_size_bytes for s in specs[:2]]
    monkeypatch.setattr(grammars, "CACHE_BYTES", sum(sizes) + 1)  # two fit, not three
    for s in specs[2:]:
        engine.grammars.compile(s)
    kept = engine.grammars._compiled
    assert [json.loads(text)["properties"].keys() for _, text in kept] == [
        json.loads(s.json_schema)["properties"].keys() for s in specs[4:]]
    assert engine.grammars._compiled_bytes == sum(g.memory_size_bytes for g in kept.values())
    monkeypatch.setattr(grammars, "CACHE_BYTES", 1)  # one over the bound: still kept
    engine.grammars.compile(specs[0])
    assert len(kept) == 1 and engine.grammars.compile(specs[0]) is next(iter(kept.values()))


@pytest.fixture
def held_compiles(monkeypatch):
    """Compiles of a text starting "slow" wait for the event it yields; a request waits
    0.2 s for its compile, and 3 may wait for compiles they started."""
    gate, source = threading.Event(), grammars._source

    def slow_source(spec):
        what, text, build, fix = source(spec)
        held = lambda c, t: (gate.wait(60), build(c, t))[1]  # noqa: E731
        return what, text, held if text.startswith("slow") else build, fix

    monkeypatch.setattr(grammars, "_source", slow_source)
    monkeypatch.setattr(grammars, "COMPILE_WAIT_S", 0.2)
    monkeypatch.setattr(grammars, "COMPILE_WAITERS", 3)
    yield gate
    gate.set()


def test_a_slow_compile_holds_only_its_own_thread_and_its_request_waits_a_bounded_time(
        engine, held_compiles):
    """Some small schemas take xgrammar minutes to compile, and a compile cannot be
    stopped: an outside probe's six 70-byte patterns held every worker thread of the HTTP
    server, and a plain completion waited for them. The request waits ``COMPILE_WAIT_S``,
    then gets INVALID_ARGUMENT while its compile goes on, on its own thread; one queued
    behind it gets RESOURCE_EXHAUSTED and is dropped; a schema compiled before does not
    wait; requests without a grammar run."""
    slow, queued = StructuredSpec(regex="slow|a"), StructuredSpec(regex="slow|b")
    known = engine.grammars.compile(StructuredSpec(regex="ab|cd"))
    try:
        with pytest.raises(InvalidRequestError, match=r"takes more than 0.2 s to compile"):
            engine.grammars.compile(slow)
        with pytest.raises(QueueFullError, match="retry later") as full:
            engine.grammars.compile(queued)
        assert full.value.status is Status.RESOURCE_EXHAUSTED
        assert engine.grammars.compile(StructuredSpec(regex="ab|cd")) is known  # no wait
        plain = texts(engine, {"p": ([5, 6], greedy(3), None)})["p"]
        assert plain[1] is FinishReason.LENGTH
    finally:
        held_compiles.set()
    assert engine.grammars.compile(slow) is not None  # compiled meanwhile: cached
    assert engine.grammars.compile(queued) is not None  # dropped, so compiled now


def test_front_ends_await_compiles_holding_no_thread(engine, held_compiles):
    """``Grammars.wait`` (what ``AsyncEngine`` does): waits for slow compiles take no
    thread of the event loop's (here one worker, still free), at most ``COMPILE_WAITERS``
    wait at once, and a waiter that goes away (a client's disconnect) frees its place
    without dropping the compile."""
    spec = [StructuredSpec(regex=f"slow|{c}") for c in "abcde"]

    async def main():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        waits = [asyncio.create_task(engine.grammars.wait(s)) for s in spec[:3]]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):  # a fourth
            await engine.grammars.wait(spec[3])
        assert await asyncio.to_thread(lambda: "free") == "free"
        waits[2].cancel()
        await asyncio.sleep(0.01)
        fifth = asyncio.create_task(engine.grammars.wait(spec[4]))  # in the place it freed
        return await asyncio.gather(*waits[:2], fifth, return_exceptions=True)

    slow, queued, fifth = asyncio.run(main())
    assert isinstance(slow, InvalidRequestError) and "takes more than 0.2 s" in str(slow)
    assert isinstance(queued, QueueFullError) and isinstance(fifth, QueueFullError)
    held_compiles.set()
    assert engine.grammars.compile(spec[0]) is not None  # it went on, into the cache


def test_requests_sending_one_new_schema_together_share_its_compile(engine, held_compiles,
                                                                     monkeypatch):
    """Requests that wait for a compile already pending join it and take no place: eight
    parallel requests of one new schema all get it (five got RESOURCE_EXHAUSTED when each
    waiter took a place), beside three waiting for compiles of their own."""
    same, others = StructuredSpec(regex="slow|s"), [StructuredSpec(regex=f"slow|{c}")
                                                      for c in "ab"]

    async def main():
        waits = [asyncio.create_task(engine.grammars.wait(s)) for s in [same] * 8 + others]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):  # a fourth compile of its own
            await engine.grammars.wait(StructuredSpec(regex="slow|c"))
        held_compiles.set()
        return await asyncio.gather(*waits, return_exceptions=True)

    monkeypatch.setattr(grammars, "COMPILE_WAIT_S", 60.0)  # the gate decides, not the clock
    assert asyncio.run(main()) == [None] * 10


SYNTAXES = ["rule: 'abc'", "rule ::= 'abc'", 'start: "a"  # x ::= y', '// rules\nroot ::= "a"',
            'root ::= "a" # start: "b"', LARK, GRAMMAR]


def test_lark_is_told_from_ebnf_as_vllm_tells_them():
    """The same answer as vLLM's ``grammar_is_likely_lark``, run in its virtualenv."""
    code = ("import json, sys\n"
            "from vllm.v1.structured_output.utils import grammar_is_likely_lark as f\n"
            "print(json.dumps([f(g) for g in json.loads(sys.argv[1])]))\n")
    out = subprocess.run([vllm_python(), "-c", code, json.dumps(SYNTAXES)],
                         capture_output=True, text=True, timeout=300, check=True)
    theirs = json.loads(out.stdout.splitlines()[-1])
    assert [grammars.is_lark(g) for g in SYNTAXES] == theirs == [
        True, False, True, False, False, True, False]


def test_a_grammar_that_costs_too_much_a_token_ends_its_request_only(engine, monkeypatch):
    """The matcher's time is charged to its request: past the grace plus the per-token
    share, that request ends with INVALID_ARGUMENT saying what to simplify; a plain request
    in the same batch gets the tokens it gets alone. (A fake clock: each token's matcher
    work "takes" 0.1 s: 0.05 s to accept it, 0.05 s to fill the next mask; so the mask
    after the third token is over 0.25 s + 3 x 5 ms.)"""
    alone = run(engine, {"plain": ([3, 4, 5], greedy(8), "a")})["plain"]
    ticks = iter(range(10**6))
    monkeypatch.setattr(grammars, "thread_time", lambda: 0.05 * next(ticks))
    costly = SamplingParams(max_tokens=30, ignore_eos=True,
                            structured=StructuredSpec(regex="[a-z]{10,20}"))
    engine.add_request("costly", [3, 4], costly)
    engine.add_request("plain", [3, 4, 5], greedy(8), "a")
    outputs = step_all(engine)
    last = outputs["costly"][-1]
    assert last.finish_reason is FinishReason.ERROR and last.error_code is Status.INVALID_ARGUMENT
    assert "ms a token to enforce (at most 5): simplify the regex" in last.error
    assert sum(len(o.token_ids) for o in outputs["costly"]) == 3
    assert [t for o in outputs["plain"] for t in o.token_ids] == alone


def test_a_step_fills_its_masks_once_its_forward_is_queued(engine, monkeypatch):
    """The bitmask for a step's token is filled after that step's forward is launched (on
    a GPU the fill runs while the forward does), never before it; the output is whole and
    ends with the EOS sampled at the step whose mask allows only a stop token."""
    events = []
    execute, fill = engine.runner.execute, grammars.GrammarState._fill
    monkeypatch.setattr(engine.runner, "execute",
                        lambda *a, **k: events.append("forward") or execute(*a, **k))
    monkeypatch.setattr(grammars.GrammarState, "_fill",
                        lambda self: events.append("fill") or fill(self))
    params = SamplingParams(max_tokens=10, temperature=0.0,
                            structured=StructuredSpec(regex="[a-z]{3}"))
    engine.add_request("r", [3, 4], params)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert events == ["forward"] + ["forward", "fill"] * 3
    text = "".join(o.text for o in outputs)
    assert re.fullmatch("[a-z]{3}", text) and outputs[-1].finish_reason is FinishReason.EOS
    assert [t for o in outputs for t in o.token_ids][3:] == [0]  # the EOS, as vLLM's


def test_a_complete_output_whose_request_forbids_the_stop_token_ends_with_stop(engine):
    """The EOS a complete output leaves, when the request's own min_tokens or
    allowed_token_ids forbid it: the request ends (``stop``) instead of failing."""
    a, b = engine.tokenizer.convert_tokens_to_ids(["a", "b"])
    spec = StructuredSpec(choice=("ab",))
    requests = {"min_tokens": ([3, 4], SamplingParams(max_tokens=10, min_tokens=5,
                                                      structured=spec), None),
                "allowed": ([3, 4], SamplingParams(max_tokens=10, allowed_token_ids=[a, b],
                                                   structured=spec), "a")}
    assert texts(engine, requests) == {"min_tokens": ("ab", FinishReason.STOP),
                                       "allowed": ("ab", FinishReason.STOP)}


def test_costly_grammars_at_once_share_one_grace(engine, monkeypatch):
    """Four costly grammars in one batch (each token's matcher work "takes" 0.1 s, as
    above; alone, each would end after its third token): they draw on one grace, so they
    end sooner (after 3, 1, 2 and 1 tokens); the plain request gets the tokens it gets
    alone."""
    alone = run(engine, {"plain": ([3, 4, 5], greedy(8), "a")})["plain"]
    ticks = iter(range(10**6))
    monkeypatch.setattr(grammars, "thread_time", lambda: 0.05 * next(ticks))
    costly = SamplingParams(max_tokens=30, ignore_eos=True,
                            structured=StructuredSpec(regex="[a-z]{10,20}"))
    for i in range(4):
        engine.add_request(f"costly{i}", [3, 4 + i], costly)
    engine.add_request("plain", [3, 4, 5], greedy(8), "a")
    outputs = step_all(engine)
    tokens = []
    for i in range(4):
        last = outputs[f"costly{i}"][-1]
        assert last.error_code is Status.INVALID_ARGUMENT and "simplify" in last.error
        tokens.append(sum(len(o.token_ids) for o in outputs[f"costly{i}"]))
    assert max(tokens) == 3 and sum(tokens) < 4 * 3, tokens
    assert [t for o in outputs["plain"] for t in o.token_ids] == alone


def test_a_grammar_within_its_share_is_never_charged():
    """``SharedGrace``: a request back within its per-token share leaves the account, and
    one over it alone may use the whole grace."""
    grace, a, b = SharedGrace(), object.__new__(GrammarState), object.__new__(GrammarState)
    assert not grace.charge(a, 0.2) and not grace.charge(b, 0.04)
    assert grace.charge(b, 0.06)  # 0.2 + 0.06 > 0.25: b ends
    assert not grace.charge(a, -0.01) and not grace.charge(b, GRAMMAR_GRACE_S)


@pytest.mark.parametrize(("schema", "message"), [
    ('{"type": "objec"}', 'the JSON schema cannot be enforced: Unsupported type "objec"'),
    ('{"type": ', "the JSON schema cannot be enforced"),
    (json.dumps({"enum": ["x" * MAX_SCHEMA_CHARS]}),
     f"at most {MAX_SCHEMA_CHARS} are allowed: simplify it"),
])
def test_a_schema_that_does_not_compile_is_refused_before_the_model(engine, schema, message):
    params = SamplingParams(max_tokens=8, structured=StructuredSpec(schema))
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        engine.add_request("bad", [1, 2], params)
    assert not engine.has_unfinished()


def test_structured_output_needs_a_tokenizer(model):
    engine = make_engine(model, None)
    with pytest.raises(InvalidRequestError, match="needs the model's tokenizer"):
        engine.add_request("r", [1, 2], structured(None, 0))


@pytest.mark.slow
def test_the_vllm_backend_gets_the_same_json_constraint():
    """``--engine vllm``: the spec maps onto vLLM's ``StructuredOutputsParams``, and JSON
    is compact, as the native grammar, through the engine's config (the only place vLLM
    reads ``disable_any_whitespace``), checked in the vLLM virtualenv."""
    python = vllm_python()
    code = ("from nolaserve.server.config import Config\n"
            "from nolaserve.server.engine.vllm_args import engine_args, sampling\n"
            "from nolaserve.server.engine.sequence import SamplingParams, StructuredSpec\n"
            "for spec in (StructuredSpec('{\"type\": \"integer\"}'), StructuredSpec(),\n"
            "             StructuredSpec(regex='[a-c]+'), StructuredSpec(choice=('x', 'y')),\n"
            "             StructuredSpec(grammar='root ::= \"a\"')):\n"
            "    s = sampling(SamplingParams(structured=spec)).structured_outputs\n"
            "    print(s.json, s.disable_any_whitespace, s.regex, s.choice, s.grammar)\n"
            "print(sampling(SamplingParams()).structured_outputs)\n"
            "import vllm.engine.arg_utils as arg_utils\n"
            "arg_utils.AsyncEngineArgs = dict  # vLLM's own config, not a model at /m\n"
            "config = engine_args(Config(registry_path=':memory:'), '/m', 'cpu')\n"
            "print(config['structured_outputs_config'].disable_any_whitespace)\n")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True).stdout.splitlines()
    assert out[-7:] == ['{"type": "integer"} False None None None',
                        '{"type": "object"} False None None None', "None False [a-c]+ None None",
                        "None False None ['x', 'y'] None", 'None False None None root ::= "a"',
                        "None", "True"]
