"""A fleet: two `nolaserve serve` processes (replicas A and B) over one PostgreSQL
registry. An adapter registered on A serves on B; a replace on A is served by B within
the documented bound (asserted on the tokens); a delete on A is NOT_FOUND on B; with
PostgreSQL stopped, hot adapters keep serving, registration and unknown adapters get
UNAVAILABLE and health's `registry` sub-service says NOT_SERVING, and after the restart
everything works with nothing acknowledged lost; a replica killed -9 during a
registration storm loses no acknowledged registration.

The tests of this module share the two replicas and run in order."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pg_helpers
import pytest
import yaml
from conftest import tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import HANG_GUARD, request
from test_server_process import SERVE, read_port

from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.spec import model_spec
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

POLL_S = 1.0  # registry_poll_interval_s of the replicas
BOUND_S = 2 * POLL_S  # docs/operations.md: the poll interval plus one registry query
Code = grpc.StatusCode


class Replica:
    def __init__(self, config: str, log_path) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, config], text=True,
                                     stdout=subprocess.PIPE, stderr=self.log)
        self.port = read_port(self.proc)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def register(self, adapter_id: str, data: bytes, replace: bool = False):
        return self.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
            adapter_id=adapter_id, data=data, replace=replace), timeout=60)

    def tokens(self, adapter_id: str) -> list[int]:
        out = self.inference.Generate(request(max_tokens=8, adapter=adapter_id), timeout=60)
        return list(out.token_ids)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service)).status

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def spec():
    return model_spec(tiny_llama(vocab_size=300, max_position_embeddings=1024), max_rank=8)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, bytebpe):
    pg_helpers.postgres_url()  # skips without PostgreSQL (fails under CI)
    tmp = tmp_path_factory.mktemp("fleet")
    model_dir = tmp / "model"
    tiny_llama(vocab_size=300, max_position_embeddings=1024).save_pretrained(model_dir)
    bytebpe.save_pretrained(model_dir)
    with pg_helpers.fresh_schema() as schema_url:
        replicas = []
        try:
            for name in ("a", "b"):
                config = dict(model=str(model_dir), device="cpu", dtype="float32",
                              cache_dir=str(tmp / name), registry_url=schema_url, num_slots=2,
                              max_rank=8, kv_cache_bytes=4 << 20, port=0, metrics_port=0,
                              http_port=0, registry_poll_interval_s=POLL_S)
                path = tmp / f"{name}.yaml"
                path.write_text(yaml.safe_dump(config))
                replicas.append(Replica(str(path), tmp / f"{name}.log"))
            yield replicas
        finally:
            for r in replicas:
                r.stop()


def nola(spec, seed: int) -> bytes:
    return random_nola(spec, seed=seed, rank=4, num_basis=16, coeff_std=4.0).to_bytes()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD  # a hang guard, not a speed requirement
    while not condition():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.05)


def test_registered_on_a_serves_on_b(fleet, spec):
    a, b = fleet
    a.register("shared", nola(spec, 1))
    assert b.tokens("shared") == a.tokens("shared")
    info = b.admin.GetAdapter(admin_pb2.AdapterRef(adapter_id="shared"))
    assert info.sha256 == hashlib.sha256(nola(spec, 1)).hexdigest()


def test_a_replace_on_a_is_served_by_b_within_the_bound(fleet, spec):
    a, b = fleet
    a.register("v2-reference", nola(spec, 2))
    old, new = b.tokens("shared"), b.tokens("v2-reference")  # B holds the old one hot
    assert old != new, "the two adapters must give different tokens for the test to mean it"
    a.register("shared", nola(spec, 2), replace=True)  # acknowledged here
    time.sleep(BOUND_S)  # the documented bound
    assert b.tokens("shared") == new


def test_a_delete_on_a_is_not_found_on_b(fleet):
    a, b = fleet
    a.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id="v2-reference"))
    with pytest.raises(grpc.RpcError) as info:
        b.tokens("v2-reference")
    assert info.value.code() == Code.NOT_FOUND


def test_postgres_down_hot_adapters_serve_and_everything_recovers(fleet, spec):
    a, b = fleet
    pg_helpers.control_dir()
    a.register("cold", nola(spec, 3))  # never used: no replica holds it
    hot = b.tokens("shared")
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    pg_helpers.stop_postgres()
    try:
        for replica in (a, b):
            wait_for(lambda r=replica: r.status("registry") == not_serving, "NOT_SERVING")
            assert replica.status() == serving  # the server as a whole still serves
        assert b.tokens("shared") == hot
        with pytest.raises(grpc.RpcError) as info:
            a.register("during", nola(spec, 4))
        assert info.value.code() == Code.UNAVAILABLE
        assert "registry" in info.value.details() and "unreachable" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            b.tokens("cold")
        assert info.value.code() == Code.UNAVAILABLE
    finally:
        pg_helpers.start_postgres()
    for replica in (a, b):
        wait_for(lambda r=replica: r.status("registry") == serving, "SERVING again")
    a.register("during", nola(spec, 4))
    assert b.tokens("during") and b.tokens("cold") and b.tokens("shared") == hot
    listed = b.admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1000))
    assert {x.adapter_id for x in listed.adapters} == {"shared", "cold", "during"}


def test_kill_9_of_a_replica_during_a_registration_storm_loses_nothing(fleet, spec):
    a, b = fleet
    payloads = {f"storm-{i:03d}": random_nola(spec, seed=100 + i, rank=4,
                                              num_basis=16 + i % 7).to_bytes()
                for i in range(300)}
    acked: list[str] = []
    stop = threading.Event()

    def storm(worker: int) -> None:
        for adapter_id in sorted(payloads)[worker::4]:
            if stop.is_set():
                return
            try:
                a.register(adapter_id, payloads[adapter_id])
            except grpc.RpcError:
                return  # A is gone: this one is unacknowledged
            acked.append(adapter_id)

    workers = [threading.Thread(target=storm, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    wait_for(lambda: len(acked) >= 40 or a.proc.poll() is not None, "40 acknowledgements")
    os.kill(a.proc.pid, signal.SIGKILL)  # mid-storm: other registrations are in flight
    a.proc.wait(timeout=30)
    stop.set()
    for w in workers:
        w.join(timeout=120)
    acked_now = set(acked)
    assert len(acked_now) >= 40
    present: dict[str, str] = {}
    token = ""
    while True:
        page = b.admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=1000,
                                                                  page_token=token))
        present.update({x.adapter_id: x.sha256 for x in page.adapters})
        token = page.next_page_token
        if not token:
            break
    assert acked_now <= set(present), sorted(acked_now - set(present))
    for adapter_id in present.keys() & payloads.keys():  # acked or not: whole, or absent
        assert present[adapter_id] == hashlib.sha256(payloads[adapter_id]).hexdigest()
    for adapter_id in sorted(acked_now)[:: max(1, len(acked_now) // 5)]:
        assert len(b.tokens(adapter_id)) == 8
