"""The Admin service, health and reflection, metrics and TLS over a real gRPC channel, and
the `serve` process draining on SIGTERM."""

import asyncio
import hashlib
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import expect_code, free_port, request, serving, slow_down

from nolaserve.adapters.nola import random_nola
from nolaserve.server.metrics import Metrics
from nolaserve.server.ports import bind_tcp
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    return make_engine(model, bytebpe)


def nola_bytes(engine, seed: int, description: str = "", rank: int = 4) -> bytes:
    adapter = random_nola(engine.store.spec, seed=seed, rank=rank, num_basis=16)
    adapter.description = description
    return adapter.to_bytes()


def register(c, adapter_id: str, data: bytes, replace: bool = False):
    return c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id, data=data, replace=replace))


def ref(adapter_id: str) -> admin_pb2.AdapterRef:
    return admin_pb2.AdapterRef(adapter_id=adapter_id)


def test_register_get_list_pin_and_server_info(engine):
    data = nola_bytes(engine, 1, "demo")
    before = time.time()

    async def main():
        async with serving(engine) as c:
            info = await register(c, "a", data)
            again = await register(c, "a", data)  # same bytes: idempotent, the same record
            assert (again.sha256, again.created_at) == (info.sha256, info.created_at)
            await expect_code(Code.ALREADY_EXISTS, register(c, "a", nola_bytes(engine, 9)),
                              "replace")
            await register(c, "a", data, replace=True)
            for i, name in enumerate(("b", "c")):
                await register(c, name, nola_bytes(engine, 2 + i))
            first = await c.admin.ListAdapters(admin_pb2.ListAdaptersRequest(page_size=2))
            second = await c.admin.ListAdapters(admin_pb2.ListAdaptersRequest(
                page_size=2, page_token=first.next_page_token))
            pinned = await c.admin.PinAdapter(ref("a"))
            got = await c.admin.GetAdapter(ref("a"))
            unpinned = await c.admin.UnpinAdapter(ref("a"))
            server = await c.admin.GetServerInfo(admin_pb2.GetServerInfoRequest())
            return info, first, second, (pinned, got, unpinned), server

    info, first, second, pins, server = asyncio.run(main())
    spec = engine.store.spec
    assert (info.adapter_id, info.kind, info.rank, info.description) == ("a", "nola", 4, "demo")
    assert info.size_bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert list(info.target_modules) == sorted(spec.module_shapes)
    assert info.base_model == spec.name and before <= info.created_at <= time.time()
    assert [a.adapter_id for a in first.adapters] == ["a", "b"] and first.total == 3
    assert [a.adapter_id for a in second.adapters] == ["c"] and not second.next_page_token
    assert [p.pinned for p in pins] == [True, True, False]
    assert (server.num_layers, server.num_slots, server.max_rank) == (2, 4, 8)
    assert server.dtype == "float32" and server.device == "cpu" and server.version
    assert {m.name: (m.in_features, m.out_features) for m in server.target_modules} == \
        spec.module_shapes
    assert server.max_tokens_limit == 256 and server.max_message_bytes == 64 << 20


def test_rmm_basis_and_delete_while_streaming(engine):
    slow_down(engine, 0.005)

    async def main():
        async with serving(engine) as c:
            for i, name in enumerate(("a", "b", "c")):
                await register(c, name, nola_bytes(engine, 1 + i))
            built = await c.admin.BuildRmmBasis(admin_pb2.BuildRmmBasisRequest(
                source_adapter_ids=["a", "b"], basis_size=1, basis_id="rb"))
            task = await c.admin.GetAdapter(ref("rb/a"))
            out = await c.inference.Generate(request(max_tokens=3, adapter="rb/a"))
            assert len(out.token_ids) == 3
            await expect_code(Code.FAILED_PRECONDITION,
                              c.inference.Generate(request(adapter="rb")), "RMM basis")
            await expect_code(Code.FAILED_PRECONDITION, c.admin.DeleteAdapter(ref("rb")),
                              "delete those first")
            stream = c.inference.GenerateStream(request(max_tokens=30, adapter="c"))
            tokens = list((await stream.read()).token_ids)
            await c.admin.DeleteAdapter(ref("c"))
            await expect_code(Code.NOT_FOUND, c.inference.Generate(request(adapter="c")), "'c'")
            while (m := await stream.read()) is not grpc.aio.EOF:
                tokens += m.token_ids
            await expect_code(Code.NOT_FOUND, c.admin.GetAdapter(ref("c")), "'c'")
            return built, task, tokens

    built, task, tokens = asyncio.run(main())
    assert built.basis_id == "rb"
    assert [(t.adapter_id, t.source_adapter_id) for t in built.tasks] == \
        [("rb/a", "a"), ("rb/b", "b")]
    assert all(0 <= t.relative_error <= 1 for t in built.tasks)
    assert (task.kind, task.basis_id) == ("rmm-task", "rb")
    assert len(tokens) == 30


def test_admin_errors_map_to_status_codes(engine):
    async def main():
        async with serving(engine, max_message_bytes=64 << 10) as c:
            await expect_code(Code.INVALID_ARGUMENT, register(c, "x", b"not an adapter"))
            await expect_code(Code.INVALID_ARGUMENT, register(c, "-bad id", nola_bytes(engine, 1)),
                              "invalid adapter id")
            await expect_code(Code.FAILED_PRECONDITION,
                              register(c, "big", nola_bytes(engine, 1, rank=16)), "max_rank")
            await expect_code(Code.RESOURCE_EXHAUSTED, register(c, "x", b"\0" * (100 << 10)))
            await expect_code(Code.NOT_FOUND, c.admin.GetAdapter(ref("nope")), "'nope'")
            await expect_code(Code.NOT_FOUND, c.admin.PinAdapter(ref("nope")), "'nope'")
            await expect_code(Code.INVALID_ARGUMENT, c.admin.ListAdapters(
                admin_pb2.ListAdaptersRequest(page_token="garbage")), "page_token")
            await expect_code(Code.INVALID_ARGUMENT, c.admin.ListAdapters(
                admin_pb2.ListAdaptersRequest(page_size=5000)), "page_size")
            await register(c, "a", nola_bytes(engine, 1))
            await expect_code(Code.INVALID_ARGUMENT, c.admin.BuildRmmBasis(
                admin_pb2.BuildRmmBasisRequest(source_adapter_ids=["a"], basis_id="rb")),
                "basis_size")

    asyncio.run(main())


def test_health_and_reflection(engine):
    async def main():
        async with serving(engine, admin_token="t", inference_token="t") as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            statuses = [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                        for s in ("", "nolaserve.v1.Inference", "nolaserve.v1.Admin")]
            await expect_code(Code.NOT_FOUND, health.Check(health_pb2.HealthCheckRequest(
                service="bogus")), "no service 'bogus' reports health here: ask for one of "
                "'', 'nolaserve.v1.Admin'")  # it was NOT_FOUND with no message
            listed_health = await health.List(health_pb2.HealthListRequest())
            assert {name: s.status for name, s in listed_health.statuses.items()} == {
                name: health_pb2.HealthCheckResponse.SERVING
                for name in ("", "nolaserve.v1.Inference", "nolaserve.v1.Admin", "registry")}
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            call = stub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            await call.write(reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="nolaserve.v1.SamplingParams"))
            described = await call.read()
            await call.write(reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.health.v1.Health"))
            health_file = await call.read()
            await call.done_writing()
            return (statuses, {s.name for s in listed.list_services_response.service},
                    described.file_descriptor_response, health_file.file_descriptor_response)

    statuses, services, described, health_file = asyncio.run(main())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 3
    assert {"nolaserve.v1.Inference", "nolaserve.v1.Admin", "grpc.health.v1.Health"} <= services
    assert len(health_file.file_descriptor_proto) == 1  # other files as they are
    # a reflection-only client reads what each field means, as the .proto says it
    (raw,) = described.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    message = [m.name for m in proto.message_type].index("SamplingParams")
    field = [f.name for f in proto.message_type[message].field].index("max_tokens")
    comments = {tuple(loc.path): loc.trailing_comments
                for loc in proto.source_code_info.location}
    assert comments[(4, message, 2, field)].strip() == "0 = 16"  # message_type, field


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def collect(stream) -> list:
    return [m async for m in stream]


def test_metrics_endpoint(engine):
    slow_down(engine, 0.005)

    async def main():
        async with serving(engine, metrics_port=free_port()) as c:
            for i, name in enumerate(("a", "b")):
                await register(c, name, nola_bytes(engine, 1 + i))
            await c.admin.PinAdapter(ref("a"))
            streams = [c.inference.GenerateStream(request(max_tokens=n, adapter=name))
                       for name, n in (("a", 40), ("b", 10))]  # b: cold, loaded meanwhile
            await asyncio.gather(*(collect(s) for s in streams))
            return await asyncio.to_thread(scrape, c.running.metrics_port)

    m = asyncio.run(main())

    def value(name, **labels):
        return m[(name, tuple(sorted(labels.items())))]

    assert value("nolaserve_requests_total", rpc="GenerateStream", code="OK") == 2
    assert value("nolaserve_requests_total", rpc="PinAdapter", code="OK") == 1
    count = value("nolaserve_batch_distinct_adapters_count")
    assert count > 0 and value("nolaserve_batch_distinct_adapters_bucket", le="1.0") < count
    assert value("nolaserve_batch_tokens_count") == count
    assert value("nolaserve_adapter_cache_misses_total", cache="slot") >= 2
    assert value("nolaserve_adapter_cache_misses_total", cache="host") >= 2
    assert value("nolaserve_adapter_materialize_seconds_count") == 2
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "request_latency_seconds"):
        assert value(f"nolaserve_{name}_count") == 2
    assert value("nolaserve_generation_tokens_total") == 50
    assert value("nolaserve_prompt_tokens_total") > 0
    assert value("nolaserve_requests_running") == value("nolaserve_requests_waiting") == 0
    assert value("nolaserve_kv_cache_blocks_used") == 0
    assert value("nolaserve_kv_cache_blocks_total") == engine.runner.num_kv_blocks
    assert (value("nolaserve_adapter_slots_total"), value("nolaserve_adapter_slots_pinned")) \
        == (4, 1)
    assert value("nolaserve_adapter_slots_used") == 2
    assert value("nolaserve_adapters_registered") == 2
    assert value("nolaserve_host_cache_bytes") > 0
    assert value("nolaserve_requests_parked_total") == 0  # 4 slots: nobody waited for one
    assert value("vllm:num_preemptions_total", model_name=engine.model_name, engine="0") == 0


def test_the_metrics_port_answers_only_at_slash_metrics():
    metrics = Metrics()
    port = metrics.serve_http(bind_tcp("127.0.0.1", 0, "--metrics-port"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?x=1", timeout=10) as r:
            assert b"# HELP nolaserve_requests_total" in r.read()
        for path in ("/", "/metrics/", "/healthz"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert e.value.code == 404
            assert e.value.read() == b"not found: the metrics are at /metrics\n"
    finally:
        metrics.close()


def test_tls(engine, tmp_path):
    """With tls_cert and tls_key the port speaks TLS only: a client trusting the certificate
    is served; a plaintext channel is refused and reaches neither service."""
    cert, key = self_signed(tmp_path)

    async def main():
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with serving(engine, credentials=creds, tls_cert=str(cert),
                           tls_key=str(key)) as c:
            info = await c.admin.GetServerInfo(admin_pb2.GetServerInfoRequest())
            out = await c.inference.Generate(request(max_tokens=2))
            target = f"127.0.0.1:{c.running.port}"
            async with grpc.aio.insecure_channel(target) as plain:
                await expect_code(Code.UNAVAILABLE, inference_pb2_grpc.InferenceStub(
                    plain).Generate(request(max_tokens=2)))
                await expect_code(Code.UNAVAILABLE, admin_pb2_grpc.AdminStub(
                    plain).GetServerInfo(admin_pb2.GetServerInfoRequest()))
            served = c.running.metrics.requests
            return info, out, {k: served.labels(k, "OK")._value.get()
                               for k in ("Generate", "GetServerInfo")}

    info, out, served = asyncio.run(main())
    assert info.num_layers == 2 and out.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert served == {"Generate": 1, "GetServerInfo": 1}  # the plaintext calls never ran


def self_signed(tmp_path):
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_free_text_metadata_is_bounded_at_registration(engine):
    """Issue #29: a 15 MiB description was accepted, then broke ListAdapters for everyone."""
    # a JSON escape of a lone surrogate in the header (safetensors cannot write one)
    lone_surrogate = nola_bytes(engine, 4, "QQQQQQ").replace(b"QQQQQQ", rb"\ud800")

    async def main():
        async with serving(engine) as c:
            await register(c, "ok", nola_bytes(engine, 1, "é" * 2048))  # 4,096 bytes: the limit
            huge = await expect_code(Code.INVALID_ARGUMENT,
                                     register(c, "huge", nola_bytes(engine, 2, "x" * (15 << 20))),
                                     "'description' has 15728640 bytes; the limit is 4096")
            over = await expect_code(Code.INVALID_ARGUMENT,
                                     register(c, "over", nola_bytes(engine, 3, "é" * 2049)),
                                     "description")
            lone = await expect_code(Code.INVALID_ARGUMENT,
                                     register(c, "lone", lone_surrogate))
            listed = await c.admin.ListAdapters(admin_pb2.ListAdaptersRequest())
            return huge, over, lone, listed

    huge, over, lone, listed = asyncio.run(main())
    assert len(huge) < 1100 and "shorten it" in huge
    assert [(a.adapter_id, len(a.description)) for a in listed.adapters] == [("ok", 2048)]


def test_listings_fit_the_message_limit_whatever_the_registry_holds(engine):
    """An older registry may hold a huge description: listing cuts it and pages by bytes,
    so one entry never breaks the listing, and the metrics count what the client got."""
    store = engine.store
    data = nola_bytes(engine, 1)
    for i in range(40):
        store.registry.register(f"old{i:02}", "nola", data, {
            "rank": 4, "description": "d" * (15 << 20 if i == 7 else 8000) + "\ud800"})
    limit = 64 << 10  # 40 entries of ~4 KiB each need about 3 pages

    async def main():
        async with serving(engine, max_message_bytes=limit, metrics_port=free_port()) as c:
            pages, token = [], ""
            while True:
                page = await c.admin.ListAdapters(admin_pb2.ListAdaptersRequest(
                    page_size=1000, page_token=token))
                pages.append(page)
                if not (token := page.next_page_token):
                    break
            one = await c.admin.GetAdapter(ref("old07"))
            return pages, one, await asyncio.to_thread(scrape, c.running.metrics_port)

    pages, one, metrics = asyncio.run(main())
    ids = [a.adapter_id for p in pages for a in p.adapters]
    assert ids == [f"old{i:02}" for i in range(40)] and len(pages) >= 3
    assert all(p.ByteSize() <= limit and p.total == 40 for p in pages)
    assert all(len(a.description.encode()) <= 4096 for p in pages for a in p.adapters)
    assert one.description.endswith(" [cut]") and len(one.description) <= 4096
    ok = ("nolaserve_requests_total", (("code", "OK"), ("rpc", "ListAdapters")))
    assert metrics[ok] == len(pages)


def test_a_listing_entry_over_the_limit_is_resource_exhausted(engine):
    engine.store.registry.register("big", "nola", nola_bytes(engine, 1),
                                   {"rank": 4, "description": "d" * 4096})

    async def main():
        async with serving(engine, max_message_bytes=4096, metrics_port=free_port()) as c:
            await expect_code(Code.RESOURCE_EXHAUSTED,
                              c.admin.ListAdapters(admin_pb2.ListAdaptersRequest()),
                              "raise max_message_bytes")
            return await asyncio.to_thread(scrape, c.running.metrics_port)

    metrics = asyncio.run(main())
    listed = {labels: v for (name, labels), v in metrics.items()
              if name == "nolaserve_requests_total" and ("rpc", "ListAdapters") in labels}
    assert listed == {(("code", "RESOURCE_EXHAUSTED"), ("rpc", "ListAdapters")): 1}
