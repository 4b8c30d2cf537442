"""`nolaserve serve --engine vllm` as a real process (the virtualenv that .ci/run builds,
``NOLASERVE_VLLM_PYTHON``) on a tiny random Llama: NOLA, LoRA and RMM-task adapters
registered over gRPC give the native engine's greedy tokens (numerical ties excepted and
counted), a replace is served with the new weights at once (vLLM's prefix-cache trap), a
deleted adapter is no longer served, and pin, streaming, stop strings, cancellation,
health and metrics work as over the native engine."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import pytest
import torch
from conftest import merged, spec_of
from engine_helpers import TIE_GAP, greedy, make_engine, run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import free_port, request
from vllm_helpers import VllmServer, save_model, stub_engine_args, vllm_python, write_config

from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors
from nolaserve.server.config import Config
from nolaserve.server.engine.vllm_args import engine_args
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow
PROMPTS = ["héllo wörld", "naïve café", "中文字 こんにちは", "wörld 🎉 héllo", "café café"]
MAX_TOKENS = 8
Code = grpc.StatusCode


def lora_file(spec, seed: int, rank: int = 8) -> bytes:
    g = torch.Generator().manual_seed(seed)
    mods = {(i, m): ModuleFactors(torch.randn(rank, n_in, generator=g) * 0.3,
                                  torch.randn(n_out, rank, generator=g) * 0.3, 1.0)
            for i in range(spec.num_layers) for m, (n_in, n_out) in spec.module_shapes.items()
            if m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    targets = ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    return LoraAdapter(targets, {m: spec.module_shapes[m] for m in targets},
                       spec.num_layers, AdapterFactors(mods)).to_bytes()


class Setup:
    """The vLLM server, a native engine over the same model, and the same adapters in both."""

    def __init__(self, tmp, bytebpe) -> None:
        from transformers import AutoTokenizer

        python = vllm_python()
        self.model = save_model(tmp / "model", bytebpe)
        self.tokenizer = AutoTokenizer.from_pretrained(tmp / "model")
        spec = spec_of(self.model, max_rank=8)
        self.files = {"nola": random_nola(spec, 7, rank=8, num_basis=64).to_bytes(),
                      "lora": lora_file(spec, 1), "swap": lora_file(spec, 2),
                      "gone": random_nola(spec, 9, rank=8, num_basis=64).to_bytes(),
                      "src2": lora_file(spec, 3)}
        self.native = make_engine(self.model, self.tokenizer)
        for name, data in self.files.items():
            self.native.store.register(name, data)
        self.native.store.build_rmm(["lora", "src2"], 2, "rb")
        self.metrics_port, self.http_port = free_port(), free_port()
        config = write_config(tmp / "config.yaml", tmp / "model", self.metrics_port,
                              self.http_port)
        self.server = VllmServer(python, config, tmp / "serve.log")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        for name, data in self.files.items():
            self.register(name, data)
        for rmm in ("rb", "rb/src2"):  # the same RMM bytes as the native store built
            self.register(rmm, self.native.store.registry.data(rmm))

    def register(self, name: str, data: bytes, replace: bool = False) -> None:
        self.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
            adapter_id=name, data=data, replace=replace))

    def reference(self, prompt: str, adapter: str | None) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return run(self.native, {"r": (ids, greedy(MAX_TOKENS), adapter)})["r"]

    def tie_at(self, prompt: str, adapter: str | None, want: list[int], got: list[int]) -> bool:
        """Whether the first difference of ``got`` from ``want`` is a numerical tie: the
        top-2 logit gap of the merged model at that step is below ``TIE_GAP``."""
        step = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        model = (merged(self.model, self.native.store.factors(adapter)) if adapter
                 else self.model)
        ids = self.tokenizer(prompt)["input_ids"] + want[:step]
        with torch.no_grad():
            top2 = model(torch.tensor([ids])).logits[0, -1].float().topk(2).values
        return float(top2[0] - top2[1]) < TIE_GAP

    def close(self) -> None:
        self.channel.close()
        assert self.server.stop() == 0, self.server.log.read_text()[-3000:]
        self.native.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bytebpe):
    s = Setup(tmp_path_factory.mktemp("vllm"), bytebpe)
    yield s
    s.close()


def generate(setup: Setup, prompt: str, adapter: str = "", **kw):
    return setup.inference.Generate(request(prompt, MAX_TOKENS, adapter, **kw), timeout=300)


def test_mixed_adapters_match_the_native_engine(setup):
    adapters = ["", "nola", "lora", "rb/src2"]
    cases = [(p, a) for p in PROMPTS for a in adapters]
    futures = [setup.inference.Generate.future(request(p, MAX_TOKENS, a), timeout=300)
               for p, a in cases]  # all in flight at once: mixed-adapter batches
    ties = equal = 0
    for (prompt, adapter), future in zip(cases, futures):
        got, want = list(future.result().token_ids), setup.reference(prompt, adapter or None)
        if got == want:
            equal += 1
            continue
        assert setup.tie_at(prompt, adapter or None, want, got), (
            f"{adapter or 'base'} on {prompt!r}: vLLM {got} vs native {want}, not a tie")
        ties += 1
    print(f"vLLM vs native: {equal} equal, {ties} numerical ties of {len(cases)}")
    assert equal >= len(cases) - 2, f"{ties} ties of {len(cases)}: too many to trust"
    by_adapter = {a: [setup.reference(p, a or None) for p in PROMPTS] for a in adapters}
    assert len({tuple(map(tuple, v)) for v in by_adapter.values()}) == len(adapters), (
        "adapters do not change the output: the comparison would prove nothing")


def test_another_adapters_request_runs_beside_a_burst_not_behind_it(setup):
    """Fair queuing reaches vLLM (its priority policy over our tags): with every one of the
    16 seats taken by adapter ``nola``'s burst and four more of its requests queued, a
    request on ``lora`` takes the first seat to free (that of the burst's short first
    request). Under FCFS it would queue behind the four and end after the burst's long
    requests."""
    ends: list[str] = []

    def send(name: str, adapter: str, max_tokens: int):
        future = setup.inference.Generate.future(request("héllo", max_tokens, adapter),
                                                 timeout=300)
        future.add_done_callback(lambda f: ends.append(name))
        return future

    burst = [send(f"a{i}", "nola", 40 if i == 0 else 300) for i in range(20)]
    other = send("b", "lora", 8)
    for future in (*burst, other):
        assert future.result().token_ids
    assert ends.index("b") < ends.index("a1"), ends


def test_replace_is_served_with_the_new_weights(setup):
    prompt = " ".join(PROMPTS * 16)  # ~300 tokens: full KV blocks, which vLLM caches
    before = list(generate(setup, prompt, "swap").token_ids)
    assert before == setup.reference(prompt, "swap") or setup.tie_at(
        prompt, "swap", setup.reference(prompt, "swap"), before)
    hits = counter(setup, "vllm:prefix_cache_hits_total")
    assert list(generate(setup, prompt, "swap").token_ids) == before
    assert counter(setup, "vllm:prefix_cache_hits_total") > hits, (
        "the same request again hit no prefix cache: the trap below would not be armed")
    new = lora_file(spec_of(setup.model, max_rank=8), 42)
    setup.register("swap", new, replace=True)
    setup.native.store.register("swap", new, replace=True)
    after = list(generate(setup, prompt, "swap").token_ids)
    want = setup.reference(prompt, "swap")
    assert want != before, "the new weights give the same tokens: pick another seed"
    assert after == want or setup.tie_at(prompt, "swap", want, after)


def test_cache_salt_reaches_vllms_prefix_cache(setup):
    prompt = " ".join(PROMPTS * 12) + " salted"  # full KV blocks no other test caches
    hits = []
    for salt in ("a", "b", "a"):
        generate(setup, prompt, cache_salt=salt)
        hits.append(counter(setup, "vllm:prefix_cache_hits_total"))
    assert hits[1] == hits[0] < hits[2], "only the same salt shares the cached prompt"


def test_deleted_adapter_is_not_served(setup):
    assert generate(setup, PROMPTS[1], "gone").token_ids
    setup.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id="gone"))
    with pytest.raises(grpc.RpcError) as info:
        generate(setup, PROMPTS[1], "gone")
    assert info.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        generate(setup, PROMPTS[1], "never-registered")
    assert info.value.code() == Code.NOT_FOUND


def test_typed_errors(setup):
    for code, adapter, kw in ((Code.FAILED_PRECONDITION, "rb", {}),  # an RMM basis
                              (Code.INVALID_ARGUMENT, "", {"top_p": 2.0}),
                              (Code.INVALID_ARGUMENT, "nola", {"max_tokens": 10**6})):
        with pytest.raises(grpc.RpcError) as info:
            setup.inference.Generate(request(PROMPTS[0], kw.pop("max_tokens", MAX_TOKENS),
                                             adapter, **kw), timeout=300)
        assert info.value.code() == code, (adapter, kw, info.value.details())


def test_openai_http_api_over_vllm(setup):
    body = json.dumps({"model": "lora", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{setup.http_port}/v1/completions",
                                 body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    assert text == generate(setup, PROMPTS[2], "lora").text


def test_pin_and_unpin(setup):
    info = setup.admin.PinAdapter(admin_pb2.AdapterRef(adapter_id="lora"))
    assert info.pinned
    got = list(generate(setup, PROMPTS[2], "lora").token_ids)
    want = setup.reference(PROMPTS[2], "lora")
    assert got == want or setup.tie_at(PROMPTS[2], "lora", want, got)
    # an outside probe: a pin (vLLM's pin_lora held a device slot its scheduler did not
    # know of) plus max_loras (4) other adapters in one step stopped vLLM's engine
    others = ["", "nola", "swap", "src2", "rb/src2"]
    futures = [setup.inference.Generate.future(request(p, MAX_TOKENS, a), timeout=300)
               for p in PROMPTS[:2] for a in others]
    assert all(len(f.result().token_ids) == MAX_TOKENS for f in futures)
    assert not setup.admin.UnpinAdapter(admin_pb2.AdapterRef(adapter_id="lora")).pinned
    assert list(generate(setup, PROMPTS[2], "lora").token_ids) == got  # reloaded from its dir


def test_base_requests_beside_adapters_after_every_slot_was_used(setup):
    """vLLM's CPU LoRA ops index the weights with -1 for a token without a LoRA, which is
    the last slot: an outside probe's base requests, batched beside adapters once all
    slots had been used, came back with the last slot's adapter's tokens."""
    for name in ("nola", "lora", "swap", "src2", "rb/src2"):  # more than max_loras (4)
        generate(setup, PROMPTS[0], name)
    futures = {(p, a): setup.inference.Generate.future(request(p, MAX_TOKENS, a), timeout=300)
               for p in PROMPTS for a in ("", "src2", "swap", "nola")}
    for p in PROMPTS:
        got, want = list(futures[p, ""].result().token_ids), setup.reference(p, None)
        assert got == want or setup.tie_at(p, None, want, got), p


def test_streaming_stop_strings_and_usage(setup):
    whole = generate(setup, PROMPTS[3], "nola")
    chunks = list(setup.inference.GenerateStream(request(PROMPTS[3], MAX_TOKENS, "nola"),
                                                 timeout=300))
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    last = chunks[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        len(setup.tokenizer(PROMPTS[3])["input_ids"]), MAX_TOKENS)
    assert "".join(c.text for c in chunks) == whole.text
    stop = whole.text[len(whole.text) // 2:][:2]
    if stop.strip():
        cut = generate(setup, PROMPTS[3], "nola", stop=[stop])
        assert cut.finish_reason == inference_pb2.FINISH_REASON_STOP
        assert cut.text == whole.text[:whole.text.index(stop)]
        kept = generate(setup, PROMPTS[3], "nola", stop=[stop], include_stop_str_in_output=True)
        assert kept.text == whole.text[:whole.text.index(stop) + len(stop)]
    token = whole.token_ids[MAX_TOKENS // 2]  # vLLM's stop_token_ids, as the native engine
    by_token = generate(setup, PROMPTS[3], "nola", stop_token_ids=[token])
    native = run(setup.native, {"r": (setup.tokenizer(PROMPTS[3])["input_ids"],
                                      greedy(MAX_TOKENS, stop_token_ids=[token]), "nola")})
    assert list(by_token.token_ids) == native["r"] == list(
        whole.token_ids[: list(whole.token_ids).index(token) + 1])
    assert by_token.finish_reason == inference_pb2.FINISH_REASON_STOP
    # vLLM outputs no text for the stop token, as the native engine (test_sampling_features)
    assert by_token.text == setup.tokenizer.decode(list(by_token.token_ids)[:-1])


def test_cancellation_frees_the_request(setup):
    stream = setup.inference.GenerateStream(request(PROMPTS[4], 200, "nola"), timeout=300)
    next(stream)
    assert wait_running(setup, lambda n: n >= 1), "the stream never showed as running"
    stream.cancel()
    assert wait_running(setup, lambda n: n == 0), "the cancelled request still runs in vLLM"
    assert generate(setup, PROMPTS[0]).token_ids  # and the server goes on serving


def test_health_info_and_metrics(setup):
    health = health_pb2_grpc.HealthStub(setup.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    info = setup.admin.GetServerInfo(admin_pb2.GetServerInfoRequest())
    assert (info.dtype, info.device, info.num_slots) == ("float32", "cpu", 4)
    text = scrape(setup)
    families = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(families) == len(set(families)), "a metric family is exported twice"
    for name in ("nolaserve_requests_total", "nolaserve_time_to_first_token_seconds",
                 "nolaserve_batch_tokens", "vllm:lora_requests_info",
                 "vllm:num_requests_running"):
        assert name in text, name
    assert any(f.startswith("vllm:") and f not in ("vllm:lora_requests_info",) and
               "nolaserve" not in f for f in families if f.startswith("vllm:generation")), (
        "vLLM's own series are not exported")
    # vLLM's series and ours name the same model, so one dashboard variable selects both
    assert "vllm:e2e_request_latency_seconds_count" in text
    assert len(set(re.findall(r'^vllm:[^{\s]*\{[^}]*model_name="([^"]*)"', text, re.M))) == 1


def wait_running(setup: Setup, ok, guard: float = 60.0) -> bool:
    """Poll ``nolaserve_requests_running`` until ``ok(value)``; False after ``guard`` s."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        running = re.search(r"^nolaserve_requests_running (\S+)$", scrape(setup), re.M)
        if running and ok(float(running[1])):
            return True
        time.sleep(0.1)
    return False


def counter(setup: Setup, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets)."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$",
                                            scrape(setup), re.M))


def scrape(setup: Setup) -> str:
    url = f"http://127.0.0.1:{setup.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


@pytest.mark.parametrize(("dtype", "device", "want"), [
    ("auto", "cpu", "float32"), ("auto", "cuda", "bfloat16"),
    ("float32", "cuda", "float32"), ("bfloat16", "cpu", "bfloat16")])
def test_vllm_gets_the_dtype_the_native_engine_runs(monkeypatch, dtype, device, want):
    """``dtype: auto`` reaches vLLM resolved as the native engine resolves it (fp32 on CPU),
    not as vLLM's own ``auto`` (the checkpoint's dtype: bf16 for SmolLM2). Needs no vLLM:
    ``AsyncEngineArgs`` is replaced by a recorder."""
    stub_engine_args(monkeypatch)
    args = engine_args(Config(registry_path=":memory:", dtype=dtype), "/models/m", device)
    assert args["dtype"] == want
    assert args["model"] == "/models/m" and args["enable_lora"]
    assert args["scheduling_policy"] == "priority"  # fair queuing over FairTags' tags
    # JSON without free whitespace, as the native grammar: vLLM reads only the engine's
    assert args["structured_outputs_config"]["disable_any_whitespace"]
