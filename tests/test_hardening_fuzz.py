"""Property-based tests of every RPC field against an in-process server over the tiny
model: whatever a client sends, the server answers within a deadline with a status of the
caller-error family (never INTERNAL or UNKNOWN), and stays healthy afterwards."""

import math
import struct

import grpc
import hypothesis.strategies as st
import pytest
import torch
from conftest import tiny_llama
from engine_helpers import make_engine
from hypothesis import HealthCheck, given, settings
from server_helpers import BackgroundServer, assert_healthy, assert_no_leaks, wait_idle

from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

Code = grpc.StatusCode
CALLER_ERRORS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION,
                 Code.RESOURCE_EXHAUSTED, Code.ALREADY_EXISTS}
DEADLINE = 20.0  # s: a hang fails the example instead of the whole run
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
UINT32, UINT64 = 2**32 - 1, 2**64 - 1

texts = st.one_of(st.just(""), st.text(max_size=40),
                  st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),
                  st.sampled_from(["n", "l", "n/../l", "a" * 128, "a" * 129, "ü" * 5000,
                                   "é\u0000x", "\U0001f600" * 64, " n", "n\n"]))
floats = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1.0, 3.4e38]))


@pytest.fixture(scope="module")
def server(bytebpe):
    engine = make_engine(tiny_llama(vocab_size=300), bytebpe, max_queued_requests=64)
    spec = engine.store.spec
    engine.store.register("n", random_nola(spec, seed=1, rank=4, num_basis=16).to_bytes())
    engine.store.register("l", lora_bytes(spec, seed=2))
    srv = BackgroundServer(engine, max_message_bytes=4 << 20)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    srv.inference = inference_pb2_grpc.InferenceStub(channel)
    srv.admin = admin_pb2_grpc.AdminStub(channel)
    srv.spec = spec
    yield srv
    try:
        assert_healthy(srv.port)
        srv.call(wait_idle(engine))
        assert_no_leaks(engine)
    finally:
        channel.close()
        srv.close()


def lora_bytes(spec, seed: int, rank: int = 4) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    targets = sorted(spec.module_shapes)
    factors = AdapterFactors({
        (layer, name): ModuleFactors(A=torch.randn(rank, d_in, generator=gen) * 0.1,
                                     B=torch.randn(d_out, rank, generator=gen) * 0.1,
                                     scale=2.0)
        for layer in range(spec.num_layers)
        for name, (d_in, d_out) in spec.module_shapes.items()})
    return LoraAdapter(targets, {t: spec.module_shapes[t] for t in targets},
                       spec.num_layers, factors).to_bytes()


def outcome(call) -> Code:
    """The status of a unary call or of a drained stream."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            for _ in result:
                pass
        return Code.OK
    except grpc.RpcError as e:
        assert e.code() in CALLER_ERRORS, (e.code(), e.details())
        return e.code()


sampling = st.builds(
    dict,
    max_tokens=st.one_of(st.integers(0, 6), st.sampled_from([257, 10**6, UINT32])),
    temperature=st.one_of(st.none(), floats), top_p=st.one_of(st.none(), floats),
    top_k=st.one_of(st.integers(0, 400), st.just(UINT32)),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1), st.sampled_from([2**63, UINT64])),
    stop=st.lists(texts, max_size=18), ignore_eos=st.booleans())


def generate_request(adapter: str, prompt: str, params: dict,
                     request_id: str) -> inference_pb2.GenerateRequest:
    params = {k: v for k, v in params.items() if v is not None}
    return inference_pb2.GenerateRequest(adapter_id=adapter, prompt=prompt,
                                         sampling=inference_pb2.SamplingParams(**params),
                                         request_id=request_id)


@FUZZ
@given(adapter=texts, prompt=st.one_of(texts, st.just("héllo " * 2000)), params=sampling,
       request_id=texts, stream=st.booleans())
def test_generate_fields(server, adapter, prompt, params, request_id, stream):
    req = generate_request(adapter, prompt, params, request_id)
    method = server.inference.GenerateStream if stream else server.inference.Generate
    code = outcome(lambda: method(req, timeout=DEADLINE))
    valid = is_valid(server, adapter, prompt, req.sampling)
    assert (code is Code.OK) == valid, (code, valid, adapter, prompt[:40], params)


def is_valid(server, adapter: str, prompt: str, sampling) -> bool:
    """Written from the documented limits (README, docs/operations.md), independently of
    the server's checks: a valid request must get OK, any other a caller error."""
    limits = server.engine.limits
    prompt_tokens = len(server.engine.tokenizer(prompt)["input_ids"])
    max_tokens = sampling.max_tokens or 16
    bm = server.engine.scheduler.block_manager
    fits = (0 < prompt_tokens <= min(limits.max_prompt_tokens, limits.max_model_len - 1)
            and prompt_tokens + max_tokens <= min(limits.max_model_len,
                                                  bm.num_blocks * bm.block_size))

    def number(field: str, ok) -> bool:
        value = getattr(sampling, field)
        return not sampling.HasField(field) or (math.isfinite(value) and ok(value))

    return (adapter in ("", "n", "l") and fits and 1 <= max_tokens <= limits.max_tokens_limit
            and number("temperature", lambda t: t >= 0)
            and number("top_p", lambda p: 0 < p <= 1)
            and (not sampling.HasField("seed") or sampling.seed < 2**63)
            and len(sampling.stop) <= 16 and all(1 <= len(s) <= 256 for s in sampling.stop))


@FUZZ
@given(messages=st.lists(st.tuples(texts, texts), max_size=4), adapter=texts)
def test_chat_messages(server, messages, adapter):
    req = inference_pb2.GenerateRequest(
        adapter_id=adapter, messages=inference_pb2.ChatMessages(messages=[
            inference_pb2.ChatMessage(role=r, content=c) for r, c in messages]))
    # the tiny tokenizer has no chat template: always a caller error
    assert outcome(lambda: server.inference.Generate(req, timeout=DEADLINE)) is not Code.OK


@FUZZ
@given(adapter=texts, method=st.sampled_from(["GetAdapter", "DeleteAdapter", "PinAdapter",
                                              "UnpinAdapter"]))
def test_adapter_ids(server, adapter, method):
    if adapter in ("n", "l") and method == "DeleteAdapter":
        adapter += "-not-there"
    code = outcome(lambda: getattr(server.admin, method)(
        admin_pb2.AdapterRef(adapter_id=adapter), timeout=DEADLINE))
    if code is Code.OK:
        assert adapter in ("n", "l")
    server.admin.UnpinAdapter(admin_pb2.AdapterRef(adapter_id="n"), timeout=DEADLINE)
    server.admin.UnpinAdapter(admin_pb2.AdapterRef(adapter_id="l"), timeout=DEADLINE)


@FUZZ
@given(page_size=st.one_of(st.integers(0, 1001), st.just(UINT32)),
       page_token=st.one_of(texts, st.binary(max_size=40).map(lambda b: b.hex())))
def test_list_page_tokens(server, page_size, page_token):
    code = outcome(lambda: server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(
        page_size=page_size, page_token=page_token), timeout=DEADLINE))
    if code is Code.OK:
        assert page_size <= 1000


@FUZZ
@given(sources=st.lists(texts, max_size=4), basis_size=st.one_of(st.integers(0, 5),
                                                                 st.just(UINT32)),
       basis_id=texts)
def test_build_rmm_fields(server, sources, basis_size, basis_id):
    if basis_id in ("n", "l"):
        basis_id += "x"
    code = outcome(lambda: server.admin.BuildRmmBasis(admin_pb2.BuildRmmBasisRequest(
        source_adapter_ids=sources, basis_size=basis_size, basis_id=basis_id),
        timeout=DEADLINE))
    if code is Code.OK:  # a valid build: take it out again so the next example is clean
        for source in sources:
            server.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id=f"{basis_id}/{source}"))
        server.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id=basis_id))


def _header_bytes(header: dict, body: bytes = b"") -> bytes:
    import json

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _crafted(spec) -> list[bytes]:
    """Hand-made safetensors files: wrong dtypes, huge declared shapes, lying offsets."""
    nola = random_nola(spec, seed=3, rank=4, num_basis=16).to_bytes()
    n = struct.unpack("<Q", nola[:8])[0]
    import json

    header = json.loads(nola[8:8 + n])
    body = nola[8 + n:]
    out = []
    for name in [k for k in header if k != "__metadata__"]:
        for change in ({"dtype": "F16"}, {"dtype": "I64"}, {"dtype": "F8_E4M3"},
                       {"shape": [2**40, 2**40]}, {"shape": [-1]},
                       {"data_offsets": [0, 2**62]}, {"shape": [0]}):
            out.append(_header_bytes({**header, name: {**header[name], **change}}, body))
    meta = header["__metadata__"]
    for key, value in (("rank", "99999999"), ("rank", "-1"), ("num_layers", str(2**40)),
                       ("module_shapes", '{"x": [1048576, 1048576]}'),
                       ("format_version", "2"), ("format", "nolaserve.rmm-task"),
                       ("format", "nolaserve.rmm-basis"), ("lora_alpha", "nan")):
        out.append(_header_bytes({**header, "__metadata__": {**meta, key: value}}, body))
    out.append(struct.pack("<Q", 2**63) + b"{}")
    out.append(_header_bytes({"__metadata__": {"format": "nolaserve.lora"}}))
    return out


def _variants(spec):
    valid = [random_nola(spec, seed=4, rank=4, num_basis=16).to_bytes(), lora_bytes(spec, 5)]
    return st.one_of(
        st.binary(max_size=2000),
        st.sampled_from(_crafted(spec)),
        st.tuples(st.sampled_from(valid), st.floats(0, 1)).map(
            lambda v: v[0][:int(len(v[0]) * v[1])]),  # truncated
        st.tuples(st.sampled_from(valid), st.lists(st.tuples(st.floats(0, 1),
                                                             st.integers(0, 255)),
                                                   min_size=1, max_size=8)).map(_mutate))


def _mutate(v) -> bytes:
    data, edits = bytearray(v[0]), v[1]
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    return bytes(data)


@pytest.mark.parametrize("replace", [False, True])
def test_adapter_bytes(server, replace):
    counter = iter(range(10**6))

    @FUZZ
    @given(data=_variants(server.spec))
    def check(data):
        adapter_id = "n" if replace else f"fuzz-{next(counter)}"
        code = outcome(lambda: server.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
            adapter_id=adapter_id, data=data, replace=replace), timeout=DEADLINE))
        if code is not Code.OK:
            return
        # whatever was accepted must serve
        req = generate_request(adapter_id, "héllo", {"max_tokens": 2, "temperature": 0.0,
                                                      "ignore_eos": True}, "")
        out = server.inference.Generate(req, timeout=DEADLINE)
        assert len(out.token_ids) == 2 and out.finish_reason == inference_pb2.FINISH_REASON_LENGTH

    try:
        check()
    finally:
        server.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
            adapter_id="n", replace=True,
            data=random_nola(server.spec, seed=1, rank=4, num_basis=16).to_bytes()))
