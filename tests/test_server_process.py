"""`serve(config)` as a real process over a tiny checkpoint: it prints its address, and on
SIGTERM finishes the stream in flight, refuses new requests, and exits 0."""

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import yaml
from conftest import tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import HANG_GUARD, expect_code, free_port, request

from nolaserve.v1 import inference_pb2, inference_pb2_grpc

SERVE = ("import sys; from nolaserve.server.app import serve; "
         "from nolaserve.server.config import Config; "
         "sys.exit(serve(Config.load(sys.argv[1])))")


def write_config(tmp_path, bytebpe, grace_period_s: float = 30.0, http_port: int = 0) -> str:
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=300, max_position_embeddings=1024).save_pretrained(model_dir)
    bytebpe.save_pretrained(model_dir)
    config = dict(model=str(model_dir), device="cpu", dtype="float32",
                  cache_dir=str(tmp_path / "cache"), registry_path=":memory:", num_slots=2,
                  max_rank=8, kv_cache_bytes=4 << 20, port=0, metrics_port=0,
                  http_port=http_port, grace_period_s=grace_period_s)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read_port(proc: subprocess.Popen, timeout: float = HANG_GUARD) -> int:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            assert proc.poll() is None, f"serve exited with {proc.returncode}"
            continue
        match = re.match(r"nolaserve listening on 127\.0\.0\.1:(\d+) \(metrics off\)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("serve printed no address")


def start_serve(tmp_path, config: str) -> tuple[subprocess.Popen, int]:
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, config], text=True,
                                stdout=subprocess.PIPE, stderr=err)
    return proc, read_port(proc)


async def until_draining(channel) -> None:
    """Until health reports NOT_SERVING: the server has seen the signal and drains."""
    health = health_pb2_grpc.HealthStub(channel)
    while (await health.Check(health_pb2.HealthCheckRequest())).status != \
            health_pb2.HealthCheckResponse.NOT_SERVING:
        await asyncio.sleep(0.01)


def test_sigterm_drains_and_exits_zero(tmp_path, bytebpe):
    proc, port = start_serve(tmp_path, write_config(tmp_path, bytebpe))
    try:
        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                stream = stub.GenerateStream(request(max_tokens=400))
                tokens = list((await stream.read()).token_ids)
                proc.send_signal(signal.SIGTERM)
                await until_draining(channel)
                await expect_code(grpc.StatusCode.UNAVAILABLE, stub.Generate(request()),
                                  "shutting down")
                while (m := await stream.read()) is not grpc.aio.EOF:
                    tokens += m.token_ids
                    last = m
                return tokens, last

        tokens, last = asyncio.run(main())
        assert proc.wait(timeout=HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(tokens) == 400 and last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert "draining" in (tmp_path / "stderr.log").read_text()


def test_sigterm_grace_running_out_cancels_what_is_left_and_exits_zero(tmp_path, bytebpe):
    """grace_period_s = 0.05 and streams of 1,000 tokens (far more than 0.05 s of work on
    any machine), over gRPC and HTTP: each is cancelled at the grace and ends itself, the
    gRPC one with a last message finishing CANCELLED, the HTTP one with an error event and
    ``[DONE]`` (not cut mid-stream), and the process says so and exits 0 at once."""
    http_port = free_port()
    proc, port = start_serve(tmp_path, write_config(tmp_path, bytebpe, grace_period_s=0.05,
                                                    http_port=http_port))
    try:
        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
                    httpx.AsyncClient(timeout=HANG_GUARD) as h:
                stub = inference_pb2_grpc.InferenceStub(channel)
                stream = stub.GenerateStream(request(max_tokens=1000))
                tokens = list((await stream.read()).token_ids)
                async with h.stream("POST", f"http://127.0.0.1:{http_port}/v1/completions",
                                    json={"prompt": "hi", "max_tokens": 1000, "stream": True,
                                          "ignore_eos": True}) as r:
                    lines = r.aiter_lines()
                    first = await anext(lines)
                    proc.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
                    events = [first] + [x async for x in lines if x]
                    http_s = time.monotonic() - sent
                messages = []
                while (m := await stream.read()) is not grpc.aio.EOF:
                    messages.append(m)
                return tokens + [t for m in messages for t in m.token_ids], messages, \
                    events, http_s

        tokens, messages, events, http_s = asyncio.run(main())
        assert proc.wait(timeout=HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(tokens) < 1000
    assert messages[-1].finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert events[-1] == "data: [DONE]" and "shutting down" in events[-2], events[-3:]
    assert http_s < HANG_GUARD  # it ended by itself, not at a client timeout
    log = (tmp_path / "stderr.log").read_text()
    assert "still running after" in log and "cancelling them" in log, log
