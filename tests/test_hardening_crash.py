"""Crash safety of registrations: a real ``nolaserve serve`` process is SIGKILLed in the
middle of a RegisterAdapter storm from concurrent clients, restarted on the same registry
file, and every acknowledged registration is there, intact and serving, while nothing
unacknowledged is half-present."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import yaml
from conftest import tiny_llama
from server_helpers import HANG_GUARD, request
from test_server_process import SERVE, read_port, write_config

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import model_spec
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

CLIENTS = 4
ACKED_BEFORE_KILL = 40


def start(config: str, log) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVE, config], text=True,
                            stdout=subprocess.PIPE, stderr=log)
    try:
        return proc, read_port(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def storm(port: int, payloads: dict[str, bytes], acked: list[str], sent: list[str],
          worker: int, stop: threading.Event) -> None:
    """Register this worker's share of ``payloads`` until the server dies or ``stop``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for adapter_id in sorted(payloads)[worker::CLIENTS]:
            if stop.is_set():
                return
            sent.append(adapter_id)
            try:
                admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                    adapter_id=adapter_id, data=payloads[adapter_id]), timeout=30)
            except grpc.RpcError:
                return  # the server is gone: this one is unacknowledged
            acked.append(adapter_id)


def test_sigkill_during_register_storm_keeps_every_acknowledged_adapter(tmp_path, bytebpe):
    config = write_config(tmp_path, bytebpe)
    with open(config) as f:
        values = yaml.safe_load(f)
    values["registry_path"] = str(tmp_path / "registry.db")
    with open(config, "w") as f:
        yaml.safe_dump(values, f)
    spec = model_spec(tiny_llama(vocab_size=300, max_position_embeddings=1024), max_rank=8)
    payloads = {f"storm-{i:03d}": random_nola(spec, seed=100 + i, rank=4,
                                              num_basis=16 + i % 7).to_bytes()
                for i in range(400)}
    sha = {i: hashlib.sha256(d).hexdigest() for i, d in payloads.items()}
    log = open(tmp_path / "stderr.log", "w")  # noqa: SIM115 (closed in the finally)
    proc, port = start(config, log)
    acked: list[str] = []
    sent: list[str] = []
    stop = threading.Event()
    try:
        workers = [threading.Thread(target=storm, args=(port, payloads, acked, sent, w, stop))
                   for w in range(CLIENTS)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + HANG_GUARD  # a hang guard, not a speed requirement
        while len(acked) < ACKED_BEFORE_KILL and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-storm: other registrations are in flight
        proc.wait(timeout=10)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        acked_now = set(acked)
        assert len(acked_now) >= ACKED_BEFORE_KILL
        assert len(set(sent)) > len(acked_now) or len(sent) == len(payloads)

        with SqliteRegistry(values["registry_path"]) as registry:  # the file after the crash
            assert registry.verify() == []

        proc, port = start(config, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            inference = inference_pb2_grpc.InferenceStub(channel)
            listed = admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1000))
            present = {a.adapter_id: a.sha256 for a in listed.adapters}
            assert acked_now <= set(present), sorted(acked_now - set(present))
            assert set(present) <= set(sent)  # nothing appears that was never sent
            for adapter_id, digest in present.items():  # acked or not: whole, or absent
                assert digest == sha[adapter_id]
            for adapter_id in sorted(set(sent) - acked_now):
                try:
                    info = admin.GetAdapter(admin_pb2.AdapterRef(adapter_id=adapter_id))
                    assert info.sha256 == sha[adapter_id]
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
            for adapter_id in sorted(present)[::max(1, len(present) // 12)] + \
                    sorted(set(present) - acked_now):
                out = inference.Generate(request(max_tokens=3, adapter=adapter_id), timeout=30)
                assert len(out.token_ids) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
