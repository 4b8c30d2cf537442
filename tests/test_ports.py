"""Every port is bound before the model loads: a port in use (gRPC or metrics) fails at
once, naming the address and the flag, and never shares the address (SO_REUSEPORT off);
while the model loads, health and the APIs answer that it is loading."""

import asyncio
import socket
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import expect_code, free_port, request, serving

from nolaserve.clients import cli
from nolaserve.server import app
from nolaserve.server.config import Config
from nolaserve.server.ports import PortInUseError, bind_tcp
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the server tries to build its engine (load the model)."""
    calls = []

    def build_engine(config):
        calls.append(config)
        raise AssertionError("the model was loaded although a port is in use")

    monkeypatch.setattr(app, "build_engine", build_engine)
    return calls


def reuseport_listener() -> socket.socket:
    """A listening socket with SO_REUSEPORT, as gRPC's default makes them: a second
    socket that also sets SO_REUSEPORT could bind the same address."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_grpc_port_in_use_fails_before_the_model_loads(no_model_load):
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            asyncio.run(app.start(Config(port=port, metrics_port=0, http_port=0)))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "--port" in str(info.value)
    assert no_model_load == []


def test_metrics_port_in_use_fails_before_the_model_loads(no_model_load):
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            asyncio.run(app.start(Config(port=0, metrics_port=port, http_port=0)))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "--metrics-port" in str(info.value)
    assert no_model_load == []


@pytest.mark.parametrize(("first", "second"), [("port", "metrics_port"),
                                                ("metrics_port", "http_port"),
                                                ("port", "http_port")])
def test_two_ports_set_alike_are_refused_naming_both(first, second):
    """An outside probe's metrics_port equal to http_port was told to pass another
    --http-port (the metrics port bound first)."""
    with pytest.raises(ValueError, match=f"config {first} and config {second} are both 9311"):
        Config(**{first: 9311, second: 9311})


def test_http_port_in_use_fails_before_the_model_loads(no_model_load):
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            asyncio.run(app.start(Config(port=0, metrics_port=0, http_port=port)))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "--http-port" in str(info.value)
    assert no_model_load == []


def test_a_second_server_on_the_same_port_is_refused(no_model_load):
    """Two real servers: the second fails at once instead of splitting the traffic."""
    engine = make_engine(tiny_llama(), None)

    async def main():
        async with serving(engine) as first:
            with pytest.raises(PortInUseError, match=f":{first.running.port}\\b"):
                await app.start(Config(port=first.running.port, metrics_port=0, http_port=0))

    asyncio.run(main())
    assert no_model_load == []


def test_serve_command_reports_the_address_and_flag(no_model_load, capsys):
    with reuseport_listener() as busy:
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--port", str(port), "--metrics-port", "0", "--http-port", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "--port" in err
    assert no_model_load == []


def test_an_unknown_host_is_named_as_such_not_as_a_port_in_use(no_model_load):
    with pytest.raises(PortInUseError) as info:
        asyncio.run(app.start(Config(host="no-such-host.invalid", port=0, metrics_port=0,
                                     http_port=0)))
    assert "cannot listen on no-such-host.invalid:0: unknown host" in str(info.value)
    assert str(info.value).endswith("; pass another --host (config key host)")
    assert no_model_load == []


def test_a_host_that_is_not_local_or_empty_names_host(no_model_load):
    with pytest.raises(PortInUseError, match="cannot listen on 192.0.2.1:0: .*; pass another "
                       r"--host \(config key host\)$"):
        asyncio.run(app.start(Config(host="192.0.2.1", port=0, metrics_port=0, http_port=0)))
    with pytest.raises(ValueError, match="config host is empty"):
        Config(host="")


def test_a_tls_key_that_is_not_the_certificates_is_refused_naming_both(tmp_path):
    """It failed the start as a port that could not be bound (an outside probe)."""
    from test_server_admin import self_signed

    cert, key = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed(other)
    refused = {(cert, other_key): "the key is not the certificate's",
               (key, cert): "a file is not PEM of its kind",
               (cert, tmp_path / "none.pem"): "No such file or directory"}
    for (c, k), why in refused.items():
        with pytest.raises(ValueError, match=f"config tls_cert '{c}' and tls_key '{k}' are not "
                                             f"a PEM certificate and its private key: {why}"):
            Config(tls_cert=str(c), tls_key=str(k))
    Config(tls_cert=str(cert), tls_key=str(key))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    locked = tmp_path / "locked.pem"  # OpenSSL asked for its passphrase on the terminal
    locked.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ValueError, match="the key is encrypted: give it unencrypted"):
        Config(tls_cert=str(cert), tls_key=str(locked))


def test_bind_tcp_holds_the_port_until_closed():
    with bind_tcp("127.0.0.1", 0, "--metrics-port") as sock:
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match="--metrics-port"):
            bind_tcp("127.0.0.1", port, "--metrics-port")
    bind_tcp("127.0.0.1", port, "--metrics-port").close()


def test_every_port_answers_while_the_model_loads(monkeypatch, bytebpe):
    """Health is NOT_SERVING and the APIs say "loading" (gRPC UNAVAILABLE, HTTP 503)
    while the engine builds, instead of a probe that times out; then all serve."""
    engine, loaded = make_engine(tiny_llama(vocab_size=300), bytebpe), threading.Event()

    def build_engine(config):
        assert loaded.wait(60)
        return engine

    monkeypatch.setattr(app, "build_engine", build_engine)
    port, http_port = free_port(), free_port()
    config = Config(port=port, metrics_port=0, http_port=http_port)

    async def main():
        starting = asyncio.create_task(app.start(config))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True,
                                       timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            listed = await health.List(health_pb2.HealthListRequest())
            assert {s.status for s in listed.statuses.values()} == {check.status}
            # every service it will report, known from the start (registry was NOT_FOUND)
            assert set(listed.statuses) == {"", *app.SERVICES, app.REGISTRY}
            await expect_code(grpc.StatusCode.UNAVAILABLE, inference_pb2_grpc.InferenceStub(
                channel).Generate(request()), "loading")
            stream = inference_pb2_grpc.InferenceStub(channel).GenerateStream(request())
            await expect_code(grpc.StatusCode.UNAVAILABLE, stream, "loading")
            await expect_code(grpc.StatusCode.UNAVAILABLE, admin_pb2_grpc.AdminStub(
                channel).GetServerInfo(admin_pb2.GetServerInfoRequest()), "loading")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
                for path in ("/health", "/v1/models"):
                    response = await http.get(path)
                    assert response.status_code == 503
                    assert "loading" in response.json()["error"]["message"]
                loaded.set()
                running = await starting
                try:
                    check = await health.Check(health_pb2.HealthCheckRequest())
                    assert check.status == health_pb2.HealthCheckResponse.SERVING
                    assert (await http.get("/health")).status_code == 200
                    out = await inference_pb2_grpc.InferenceStub(channel).Generate(
                        request(max_tokens=2))
                    assert len(out.token_ids) == 2
                finally:
                    await running.stop(0)

    asyncio.run(main())


def test_serve_raises_the_open_files_limit_toward_the_hard_one():
    """At a soft limit of 1,024 an outside probe's few hundred slow connections ran the
    server out of descriptors (every accept then failed); vLLM raises it too."""
    code = ("import resource\n"
            "from nolaserve.server.app import raise_open_files_limit\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "raise_open_files_limit()\n"
            "want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == max(want, 256))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"
