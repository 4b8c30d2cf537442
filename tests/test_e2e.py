"""End to end: `nolaserve serve` as a subprocess on the embedded SmolLM2, 16 adapters
registered through Admin (NOLA made by the CLI, a LoRA imported from a peft directory),
34 concurrent Generate/GenerateStream calls checked against the same requests run alone,
metrics, auth, error codes and the SIGTERM drain."""

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from peft import LoraConfig, get_peft_model
from server_helpers import free_port
from transformers import LlamaConfig, LlamaForCausalLM

from nolaserve.clients import cli
from nolaserve.clients.client import AsyncClient, Client, NolaserveError

TOKEN = "s3cret"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2):
    tmp = tmp_path_factory.mktemp("e2e")
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nolaserve.clients.cli", "serve", "--port", str(port),
         "--metrics-port", str(mport), "--http-port", "0",
         "--registry-path", str(tmp / "registry.db"),
         "--admin-token", TOKEN, "--num-slots", "8", "--max-rank", "8",
         "--target-modules", "self_attn.q_proj", "self_attn.v_proj",
         "--kv-cache-bytes", str(256 << 20), "--grace-period-s", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 600
    while not any("listening" in line for line in lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.5)
    yield proc, target, mport, tmp
    if proc.poll() is None:
        proc.kill()


def admin(target: str, *args: str) -> int:
    return cli.main(["--target", target, "--admin-token", TOKEN, *args])


def peft_lora_dir(tmp, info, lora_alpha: float = 4, seed: int = 0):
    """A peft LoRA (random non-zero B, from ``seed``) on a model with the server's q/v
    shapes."""
    torch.manual_seed(seed)
    shapes = {m.name: (m.in_features, m.out_features) for m in info.target_modules}
    hidden, kv = shapes["self_attn.q_proj"][0], shapes["self_attn.v_proj"][1]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=64, vocab_size=64,
                         num_hidden_layers=info.num_layers, num_attention_heads=9,
                         num_key_value_heads=9 * kv // hidden)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False))
    model.save_pretrained(tmp / "peft")
    return tmp / "peft"


def test_serve_end_to_end(server):
    proc, target, mport, tmp = server
    client = Client(target, admin_token=TOKEN)
    for i in range(15):
        assert admin(target, "adapters", "create-nola", str(tmp / f"n{i}.safetensors"),
                     "--seed", str(i), "--rank", "4", "--num-basis", "64",
                     "--coeff-std", "0.3", "--register", f"nola-{i}") == 0
    lora_dir = peft_lora_dir(tmp, client.server_info())
    assert admin(target, "adapters", "import-peft", str(lora_dir), str(tmp / "lora.safetensors"),
                 "--register", "lora-0") == 0
    ids = [a.adapter_id for a in client.iter_adapters()]
    assert len(ids) == 16 and "lora-0" in ids

    requests = [(f"Prompt {i}: tell me about number {i}", ([""] + ids)[i % 17], i % 2 == 0)
                for i in range(34)]
    together = asyncio.run(_concurrently(target, requests))
    for (prompt, adapter, stream), tokens in zip(requests, together):
        alone = asyncio.run(_concurrently(target, [(prompt, adapter, stream)]))[0]
        assert tokens == alone, (prompt, adapter)
    assert len({tuple(t) for t in together}) > 10, "adapters should change the outputs"

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
    count = _metric(metrics, "nolaserve_batch_distinct_adapters_count")
    one_or_less = _metric(metrics, 'nolaserve_batch_distinct_adapters_bucket{le="1.0"}')
    assert count > one_or_less, "some steps must mix more than one adapter"
    assert _metric(metrics, 'nolaserve_adapter_cache_misses_total{cache="slot"}') >= 8
    assert _metric(metrics, 'nolaserve_adapter_cache_evictions_total{cache="slot"}') > 0

    _check_errors(target, client, (tmp / "n0.safetensors").read_bytes())
    _check_drain(proc, target)


async def _concurrently(target: str, requests) -> list[list[int]]:
    async with AsyncClient(target) as client:
        async def one(prompt: str, adapter: str, stream: bool) -> list[int]:
            kw = dict(adapter_id=adapter, max_tokens=6, temperature=0.0, ignore_eos=True)
            if not stream:
                return (await client.generate(prompt, **kw)).token_ids
            return [t async for c in client.generate_stream(prompt, **kw) for t in c.token_ids]

        return await asyncio.gather(*(one(*r) for r in requests))


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def _check_errors(target: str, client: Client, nola: bytes) -> None:
    cases = [
        (lambda: Client(target).list_adapters(), "UNAUTHENTICATED"),
        (lambda: Client(target, admin_token="wrong").get_adapter("nola-0"), "UNAUTHENTICATED"),
        (lambda: client.generate("hi", adapter_id="nope"), "NOT_FOUND"),
        (lambda: client.register_adapter("nola-1", nola), "ALREADY_EXISTS"),
        (lambda: client.register_adapter("junk", b"x" * 64), "INVALID_ARGUMENT"),
        (lambda: client.generate("hi", top_p=1.5), "INVALID_ARGUMENT"),
        (lambda: client.generate("", max_tokens=4), "INVALID_ARGUMENT"),
    ]
    for call, code in cases:
        with pytest.raises(NolaserveError) as err:
            call()
        assert err.value.code == code, err.value
    # The same bytes under the same id again (a retry after a lost acknowledgement): OK.
    again = client.register_adapter("nola-0", nola)
    assert again.sha256 == client.get_adapter("nola-0").sha256


def _check_drain(proc: subprocess.Popen, target: str) -> None:
    chunks = []
    stream = Client(target).generate_stream("Once upon a time", max_tokens=40,
                                            temperature=0.0, ignore_eos=True)
    chunks.append(next(stream))
    proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 40
    assert proc.wait(timeout=60) == 0
