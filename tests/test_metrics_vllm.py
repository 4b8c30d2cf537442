"""vLLM's request-level series on a nolaserve replica (issue #30 item 4): every metric
deploy/grafana/vllm.json (vLLM's dashboard layout) queries is on /metrics after a few
requests, labelled with the base model's name; the counts agree with what was served;
a client that goes away counts as ``finished_reason="abort"``; and every ``vllm:`` family
nolaserve emits is one a vLLM backend's own copy is dropped for."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import free_port, request, serving, slow_down, wait_idle

from nolaserve.server.metrics import VLLM_NAMES, Metrics
from nolaserve.server.metrics_vllm import token_buckets

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "vllm.json"
QUERIED = re.compile(r"\bvllm:[a-z0-9_]+")


@pytest.fixture
def engine(bytebpe):
    return make_engine(tiny_llama(vocab_size=300), bytebpe)


def samples(text: str) -> dict[str, list]:
    """Sample name -> its samples, from a /metrics page."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(page: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in page.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


async def scrape(port: int) -> dict[str, list]:
    url = f"http://127.0.0.1:{port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    return samples(text)


def test_the_vllm_dashboard_fills_from_our_metrics(engine):
    async def main():
        async with serving(engine, metrics_port=free_port()) as c:
            for prompt in ("héllo", "a longer prompt here"):
                await c.inference.Generate(request(prompt, max_tokens=4))
            return await scrape(c.running.metrics_port)

    page = asyncio.run(main())
    model = engine.model_name
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p["targets"]]
    for name in {m for e in exprs for m in QUERIED.findall(e)}:
        assert any(s.labels.get("model_name") == model for s in page.get(name, [])), name
    assert value(page, "vllm:prompt_tokens_total") == \
        value(page, "nolaserve_prompt_tokens_total") > 2
    assert value(page, "vllm:generation_tokens_total") == 8
    assert value(page, "vllm:request_success_total", finished_reason="length") == 2
    assert value(page, "vllm:request_success_total", finished_reason="stop") == 0
    # one gap per token after the first, under the old and the new name
    assert value(page, "vllm:inter_token_latency_seconds_count") == 6
    assert value(page, "vllm:time_per_output_token_seconds_count") == 6
    assert value(page, "vllm:request_time_per_output_token_seconds_count") == 2
    assert value(page, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(page, "vllm:time_to_first_token_seconds_count") == 2
    assert value(page, "vllm:request_generation_tokens_bucket", le="5.0") == 2
    assert value(page, "vllm:num_requests_running", model_name=model, engine="0") == 0


def test_a_client_that_goes_away_counts_as_abort(engine):
    slow_down(engine, 0.02)

    async def main():
        async with serving(engine, metrics_port=free_port()) as c:
            stream = c.inference.GenerateStream(request(max_tokens=200))
            await anext(aiter(stream))
            stream.cancel()
            await wait_idle(engine)
            for _ in range(1000):  # the cancel reaches the front end asynchronously
                page = await scrape(c.running.metrics_port)
                if value(page, "vllm:request_success_total", finished_reason="abort"):
                    break
                await asyncio.sleep(0.01)
            return page

    page = asyncio.run(main())
    assert value(page, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(page, "vllm:request_success_total", finished_reason="length") == 0
    assert value(page, "vllm:generation_tokens_total") >= 1
    assert value(page, "nolaserve_request_latency_seconds_count") == 0  # not finished
    # prefilled (a token came), so its prompt counts, as vLLM counts it (it counted 0)
    assert value(page, "vllm:prompt_tokens_total") == \
        value(page, "vllm:request_prompt_tokens_sum") == \
        value(page, "vllm:prefix_cache_queries_total") > 0


def test_prompt_tokens_count_once_prefilled(engine):
    """vLLM counts a request's prompt tokens when its first token comes: one that fails
    before it (its adapter deleted while it waited) or goes away before it counts none."""
    from nolaserve.server.engine.engine_types import RequestOutput
    from nolaserve.server.engine.sequence import FinishReason

    metrics = Metrics()
    metrics.bind(engine)
    failed, gone, served = (metrics.request_timer() for _ in range(3))
    failed.observe(RequestOutput("f", "", [], True, FinishReason.ERROR, prompt_tokens=7))
    gone.aborted(prompt_tokens=5)
    served.observe(RequestOutput("s", "a", [3]))
    served.aborted(prompt_tokens=11)
    page = samples(generate_latest(metrics.registry).decode())
    assert value(page, "vllm:prompt_tokens_total") == 11
    assert value(page, "vllm:request_prompt_tokens_count") == 3


def test_every_vllm_family_we_emit_is_dropped_from_a_vllm_backend(engine):
    metrics = Metrics()
    metrics.bind(engine)
    # the prefix cache's two and the preemptions are the native engine's only: a vLLM
    # backend keeps its own
    native_only = {"vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                   "vllm:num_preemptions"}
    ours = {f.name for f in metrics.registry.collect() if f.name.startswith("vllm:")}
    ours -= native_only
    assert "vllm:e2e_request_latency_seconds" in ours
    assert ours <= VLLM_NAMES, sorted(ours - VLLM_NAMES)


def test_request_token_buckets_are_vllms():
    assert token_buckets(8192) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    assert token_buckets(1) == [1]


def test_a_refused_batch_starts_nothing_and_counts_no_request(engine):
    """A completions batch with a prompt too long for the context is a 400 before any of
    its prompts starts: an outside probe saw the good one prefilled, then aborted and
    counted as an aborted request with its latency and tokens."""
    from openai_helpers import http, http_serving

    async def main():
        async with http_serving(engine, metrics_port=free_port()) as (c, url):
            async with http(url) as h:
                r = await h.post("/v1/completions", json={
                    "model": engine.model_name, "max_tokens": 4,
                    "prompt": ["hi", "hello " * engine.limits.max_model_len]})
            return r, await scrape(c.running.metrics_port)

    response, page = asyncio.run(main())
    assert response.status_code == 400, response.text
    assert value(page, "vllm:e2e_request_latency_seconds_count") == 0
    assert value(page, "vllm:request_success_total") == 0
    assert value(page, "vllm:prefix_cache_queries_total") == 0
