"""End to end over HTTP: `nolaserve serve` as a subprocess on the embedded SmolLM2, a NOLA
adapter registered as bytes (POST /v1/adapters) and a PEFT LoRA loaded by path
(/v1/load_lora_adapter), driven by the official ``openai`` client: completion and chat,
streamed and not, with usage; greedy tokens equal gRPC Generate's for the same adapter and
prompt; models.list and NotFoundError; SIGTERM exits 0."""

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from server_helpers import free_port
from test_e2e import peft_lora_dir

from nolaserve.clients import cli
from nolaserve.clients.client import Client

TOKEN = "s3cret"
GREEDY = {"ignore_eos": True, "return_token_ids": True}
MESSAGES = [{"role": "user", "content": "Name a colour."}]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2):
    tmp = tmp_path_factory.mktemp("e2e_openai")
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nolaserve.clients.cli", "serve", "--port", str(port),
         "--metrics-port", "0", "--http-port", str(http_port), "--registry-path",
         str(tmp / "registry.db"), "--admin-token", TOKEN, "--adapter-dirs", str(tmp),
         "--num-slots", "4", "--max-rank", "8", "--target-modules", "self_attn.q_proj",
         "self_attn.v_proj", "--kv-cache-bytes", str(128 << 20)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 600
    while not any("OpenAI API on" in line for line in lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.5)
    # the server's log (stderr, into the same pipe) may write between the line's end and
    # its newline: take the URL, not the rest of the line
    url = re.search(r"OpenAI API on (http://\S+?/v1)", "".join(lines)).group(1)
    assert url == f"http://127.0.0.1:{http_port}/v1"
    yield proc, f"127.0.0.1:{port}", url, tmp
    if proc.poll() is None:
        proc.kill()


def register(target: str, url: str, tmp) -> None:
    """A NOLA adapter as bytes over HTTP, a PEFT LoRA directory by path."""
    nola = tmp / "nola.safetensors"
    assert cli.main(["--target", target, "--admin-token", TOKEN, "adapters", "create-nola",
                     str(nola), "--seed", "3", "--rank", "4", "--num-basis", "64",
                     "--coeff-std", "3.0"]) == 0
    lora = peft_lora_dir(tmp, Client(target, admin_token=TOKEN).server_info(), lora_alpha=32)
    headers = {"authorization": f"Bearer {TOKEN}"}
    base = url.removesuffix("/v1")
    r = httpx.post(f"{base}/v1/adapters", params={"adapter_id": "nola"},
                   content=nola.read_bytes(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/v1/load_lora_adapter", headers=headers, timeout=60,
                   json={"lora_name": "lora", "lora_path": str(lora)})
    assert r.status_code == 200, r.text


def test_openai_client_end_to_end(server):
    proc, target, url, tmp = server
    register(target, url, tmp)
    grpc_client = Client(target)
    want = {a: grpc_client.generate("The capital of France is", adapter_id=a, max_tokens=8,
                                    temperature=0.0, ignore_eos=True).token_ids
            for a in ("", "nola", "lora")}
    want_chat = grpc_client.generate(messages=MESSAGES,
                                     adapter_id="lora", max_tokens=8, temperature=0.0,
                                     ignore_eos=True).token_ids
    got = asyncio.run(_over_http(url))
    assert got["completions"] == want
    assert len({tuple(t) for t in want.values()}) == 3, "each adapter changes the output"
    assert got["stream"] == (want["nola"], 8)
    assert got["chat"] == want_chat and got["chat_stream"][1] == 8
    assert got["chat_stream"][0] == got["chat_text"]
    assert {"nola", "lora"} <= set(got["models"])
    assert got["not_found"] == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


async def _over_http(url: str) -> dict:
    oa = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    kw = dict(max_tokens=8, temperature=0, extra_body=GREEDY)
    got: dict = {"completions": {}}
    for model in ("", "nola", "lora"):
        out = await oa.completions.create(model=model, prompt="The capital of France is", **kw)
        got["completions"][model] = out.choices[0].token_ids
    stream = await oa.completions.create(model="nola", prompt="The capital of France is",
                                         stream=True, stream_options={"include_usage": True},
                                         **kw)
    chunks = [c async for c in stream]
    got["stream"] = ([t for c in chunks[:-1] for t in c.choices[0].token_ids],
                     chunks[-1].usage.completion_tokens)
    chat = await oa.chat.completions.create(model="lora", messages=MESSAGES, **kw)
    got["chat"], got["chat_text"] = chat.choices[0].token_ids, chat.choices[0].message.content
    stream = await oa.chat.completions.create(model="lora", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}, **kw)
    chunks = [c async for c in stream]
    got["chat_stream"] = ("".join(c.choices[0].delta.content or "" for c in chunks[:-1]),
                          chunks[-1].usage.completion_tokens)
    got["models"] = [m.id for m in (await oa.models.list()).data]
    try:
        await oa.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    except openai.NotFoundError as e:
        got["not_found"] = e.status_code
    return got
