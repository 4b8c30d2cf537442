"""The OpenAI HTTP API's guards over a tiny model: bearer tokens (401), TLS, adapter paths
confined to adapter_dirs (403, nothing read), bodies over the limit refused before
parsing (413), adapter management like vLLM's, and a client that disconnects mid-stream
(its KV blocks and slot are freed)."""

import asyncio
import copy
import os
import socket
import ssl

import httpx
import openai
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from openai_helpers import http, http_serving, openai_client, with_chat_template
from peft import LoraConfig, get_peft_model
from server_helpers import assert_no_leaks, slow_down, wait_idle
from test_server_admin import self_signed

from nolaserve.adapters.nola import random_nola
from nolaserve.server.app import start
from nolaserve.server.config import Config

ADMIN, INFERENCE = "adm1n", "inf3r"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    return make_engine(model, bytebpe)


def nola_bytes(engine, seed: int = 1) -> bytes:
    return random_nola(engine.store.spec, seed=seed, rank=4, num_basis=16).to_bytes()


def test_tokens_guard_inference_and_admin(engine):
    async def main():
        async with http_serving(engine, admin_token=ADMIN,
                                inference_token=INFERENCE) as (c, url):
            codes = {}
            for name, key in (("missing", "none"), ("wrong", "nope"), ("admin", ADMIN)):
                with pytest.raises(openai.AuthenticationError) as err:
                    await openai_client(url, key).completions.create(model="", prompt="hi")
                codes[name] = err.value.status_code
            ok = await openai_client(url, INFERENCE).completions.create(
                model="", prompt="hi", max_tokens=2)
            models = await openai_client(url, INFERENCE).models.list()
            async with http(url, INFERENCE) as h:
                as_inference = await h.post("/v1/adapters", params={"adapter_id": "x"},
                                            content=nola_bytes(engine))
                bad_body = await h.post("/v1/completions", content=b"{not json")
            async with http(url, ADMIN) as h:
                registered = await h.post("/v1/adapters", params={"adapter_id": "x"},
                                          content=nola_bytes(engine))
                again = await h.post("/v1/adapters", params={"adapter_id": "x"},
                                     content=nola_bytes(engine, 2))
                junk = await h.post("/v1/adapters", params={"adapter_id": "y"},
                                    content=b"x" * 64)
            async with http(url) as h:
                health = await h.get("/health")
            return codes, ok, models, as_inference, bad_body, registered, again, junk, health

    codes, ok, models, as_inference, bad_body, registered, again, junk, health = \
        asyncio.run(main())
    assert codes == {"missing": 401, "wrong": 401, "admin": 401}
    assert ok.usage.completion_tokens == 2 and models.data
    assert as_inference.status_code == 401
    assert "admin_token" in as_inference.json()["error"]["message"]
    assert bad_body.status_code == 400
    info = registered.json()
    assert registered.status_code == 200 and info["adapter_id"] == "x"
    assert info["kind"] == "nola" and info["size_bytes"] > 0
    assert again.status_code == 409 and again.json()["error"]["type"] == "ConflictError"
    assert junk.status_code == 400 and health.status_code == 200


def peft_dir(model, directory) -> str:
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(directory)
    return str(directory)


def test_load_lora_adapter_reads_only_under_adapter_dirs(engine, model, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    fifo = outside / "fifo"  # opening it for reading would block: the test would hang
    os.mkfifo(fifo)
    (allowed / "link").symlink_to(fifo)
    (allowed / "dirlink").symlink_to(outside)
    (allowed / "n.safetensors").write_bytes(nola_bytes(engine))
    lora = peft_dir(model, allowed / "peft")

    async def load(h, name: str, path, **extra) -> tuple[int, str]:
        r = await h.post("/v1/load_lora_adapter", json={"lora_name": name,
                                                       "lora_path": str(path), **extra})
        return r.status_code, r.text

    async def main():
        async with http_serving(engine, adapter_dirs=[str(allowed)]) as (c, url), \
                http(url) as h:
            refused = [await asyncio.wait_for(load(h, "x", p), 30) for p in
                       (fifo, allowed / "link", allowed / "dirlink" / "fifo",
                        allowed / ".." / "outside" / "fifo")]
            too_long = await load(h, "x", allowed / ("a" * 5000))  # ENAMETOOLONG: was 500
            loaded = [await load(h, "nola", allowed / "n.safetensors"),
                      await load(h, "lora", lora)]
            again = [await load(h, "nola", lora),  # vLLM's load_inplace replaces it
                     await load(h, "nola", lora, load_inplace=True)]
            out = await openai_client(url).completions.create(model="lora", prompt="hi",
                                                              max_tokens=2)
            unloaded = await h.post("/v1/unload_lora_adapter", json={"lora_name": "lora"})
            gone = await h.post("/v1/unload_lora_adapter", json={"lora_name": "lora"})
        async with http_serving(engine) as (c, url), http(url) as h:
            no_dirs = await load(h, "y", allowed / "n.safetensors")
        return refused, too_long, loaded, again, out, unloaded, gone, no_dirs

    refused, too_long, loaded, again, out, unloaded, gone, no_dirs = asyncio.run(main())
    for status, text in refused:
        assert status == 403 and "adapter_dirs" in text, text
    assert too_long[0] == 400 and "too long" in too_long[1] and len(too_long[1]) < 1000
    assert [s for s, _ in loaded] == [200, 200] and "lora" in loaded[1][1]
    assert again[0][0] == 409 and "set load_inplace to true" in again[0][1]
    assert again[1][0] == 200 and engine.store.registry.get("nola").kind == "lora"
    assert out.usage.completion_tokens == 2
    assert unloaded.status_code == 200 and gone.status_code == 404
    assert no_dirs[0] == 403 and "adapter_dirs" in no_dirs[1]


def test_oversized_bodies_are_refused_before_parsing(engine):
    limit = 4096

    def raw(port: int, head: bytes, body: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + body)
            return s.recv(65536)

    async def main():
        async with http_serving(engine, max_message_bytes=limit) as (c, url), \
                http(url) as h:
            not_json = await h.post("/v1/completions", content=b"{" * (limit + 1))
            adapter = await h.post("/v1/adapters", params={"adapter_id": "a"},
                                   content=b"x" * (limit + 1))
            small = await h.post("/v1/completions", content=b"{")
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            port = c.running.http_port
            claimed = await asyncio.to_thread(
                raw, port, head + b"Content-Length: 999999999\r\n\r\n", b"{")
            chunk = b"%x\r\n%s\r\n" % (1024, b"{" * 1024)
            chunked = await asyncio.to_thread(
                raw, port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunk * 8)
            return not_json, adapter, small, claimed, chunked

    not_json, adapter, small, claimed, chunked = asyncio.run(main())
    for r in (not_json, adapter):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "RequestTooLargeError"
    assert small.status_code == 400  # a small body is parsed (and is not JSON)
    assert claimed.startswith(b"HTTP/1.1 413") and chunked.startswith(b"HTTP/1.1 413")
    assert not engine.store.registry.contains("a")


def test_disconnect_mid_stream_frees_the_kv_blocks(engine):
    engine.store.register("n", nola_bytes(engine))
    slow_down(engine, 0.05)

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            body = {"model": "n", "prompt": "héllo", "max_tokens": 200, "stream": True,
                    "ignore_eos": True, "temperature": 0}
            async with h.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                first = await anext(lines)
                used = engine.scheduler.block_manager.num_free_blocks
            await wait_idle(engine)
            unary = asyncio.create_task(h.post("/v1/completions", json=body | {
                "stream": False}))
            while not engine.has_unfinished():
                await asyncio.sleep(0.01)
            unary.cancel()
            await asyncio.gather(unary, return_exceptions=True)
            await wait_idle(engine)
            return first, used

    first, used = asyncio.run(main())
    assert first.startswith("data: ")
    bm = engine.scheduler.block_manager
    assert used < bm.num_blocks  # the stream held blocks while it ran
    assert_no_leaks(engine)


def test_tls_covers_the_http_port(engine, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)

    async def main():
        async with http_serving(engine, tls_cert=str(cert), tls_key=str(key),
                                inference_token=INFERENCE) as (c, url):
            trust = ssl.create_default_context(cafile=str(cert))
            async with httpx.AsyncClient(verify=trust) as tls:
                oa = openai.AsyncOpenAI(base_url=url, api_key=INFERENCE, http_client=tls,
                                        max_retries=0)
                out = await oa.completions.create(model="", prompt="hi", max_tokens=2)
            async with httpx.AsyncClient() as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get(url.replace("https://", "http://") + "/models")
            return url, out

    url, out = asyncio.run(main())
    assert url.startswith("https://127.0.0.1:") and out.usage.completion_tokens == 2


def test_http_port_in_use_fails_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = Config(model=str(tmp_path / "no-such-model"), port=0, metrics_port=0,
                        http_port=taken.getsockname()[1], registry_path=":memory:")
        with pytest.raises(OSError, match="--http-port"):  # not the model's error
            asyncio.run(start(config))


async def walk_pages(h, limit: int) -> list[list[dict]]:
    """Every page of ``/v1/models?limit=``, following ``next_page_token``."""
    pages, params = [], {"limit": limit}
    while True:
        body = (await h.get("/v1/models", params=params)).json()
        pages.append(body["data"])
        if not body["has_more"]:
            return pages
        params = {"limit": limit, "page_token": body["next_page_token"]}


def test_models_retrieve_tokenize_detokenize_and_version(model, bytebpe, monkeypatch):
    """What vLLM serves beside generation, through the official client where it has a
    call: ``models.retrieve`` (base, bare adapter id, ``<base>:<id>``, unknown: 404),
    ``/v1/models`` listing every adapter unless paging is asked, ``/tokenize`` (prompt and
    chat), ``/detokenize`` and ``/version``; a token guards the parameterized path too."""
    from nolaserve.server.openai_api import admin

    monkeypatch.setattr(admin, "MAX_PAGE_SIZE", 2)  # listing all must follow the pages
    named = copy.deepcopy(model)
    named.name_or_path = "tiny-base"
    engine = make_engine(named, with_chat_template(bytebpe))
    for i in range(5):
        engine.store.register(f"ad{i}", nola_bytes(engine, i + 1))
    engine.store.build_rmm(["ad0", "ad1"], 2, "rb")  # a basis is no model: its tasks are
    base = engine.model_name

    async def main():
        async with http_serving(engine, inference_token=INFERENCE) as (c, url):
            client = openai_client(url, INFERENCE)
            cards = [await client.models.retrieve(m) for m in (base, "ad3", f"{base}:ad3")]
            for name in ("nope", "rb"):
                with pytest.raises(openai.NotFoundError):
                    await client.models.retrieve(name)
            listed = await client.models.list()
            async with http(url, INFERENCE) as h:
                pages = {n: await walk_pages(h, n) for n in (1, 2)}
                zero = await h.get("/v1/models", params={"limit": 0})
                tok = (await h.post("/tokenize", json={"model": "ad1", "prompt": "héllo"})).json()
                chat = await h.post("/tokenize", json={"messages": [
                    {"role": "user", "content": "hi"}]})
                detok = (await h.post("/detokenize", json={"tokens": tok["tokens"]})).json()
                bad = await h.post("/detokenize", json={"tokens": [10 ** 6]})
                unknown = await h.post("/tokenize", json={"model": "nope", "prompt": "x"})
                ver = (await h.get("/version")).json()
            async with http(url) as h:
                guarded = await h.get("/v1/models/ad3")
            return cards, listed, pages, zero, tok, chat, detok, bad, unknown, ver, guarded

    cards, listed, pages, zero, tok, chat, detok, bad, unknown, ver, guarded = asyncio.run(main())
    assert [c.id for c in cards] == [base, "ad3", f"{base}:ad3"]
    assert cards[1].root == base and cards[0].object == "model"
    assert [m.id for m in listed.data] == [base] + [f"ad{i}" for i in range(5)] + [
        "rb/ad0", "rb/ad1"]
    for n, walked in pages.items():  # pages of ``limit`` models, the base first, the
        assert all(len(page) == n for page in walked[:-1])  # basis passed over (no model)
        assert 0 < len(walked[-1]) <= n
        assert [m["id"] for page in walked for m in page] == [m.id for m in listed.data]
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "limit"
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    assert detok["prompt"].endswith("héllo")
    assert chat.status_code == 200 and chat.json()["count"] > 0
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]
    assert unknown.status_code == 404
    assert ver["version"] and guarded.status_code == 401
