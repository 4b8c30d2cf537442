"""A fake nolaserve gRPC server with canned answers, for the client and CLI tests."""

from __future__ import annotations

import datetime
import hashlib
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32)}


@dataclass
class Fake:
    """What the fake server saw: (rpc, authorization header) per call and every request."""

    auth: list[tuple[str, str | None]] = field(default_factory=list)
    requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    adapters: dict[str, admin_pb2.AdapterInfo] = field(default_factory=dict)

    def see(self, rpc: str, context: grpc.ServicerContext) -> None:
        self.auth.append((rpc, dict(context.invocation_metadata()).get("authorization")))


class FakeInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    def Generate(self, request, context):
        self.fake.see("Generate", context)
        self.fake.requests.append(request)
        if request.adapter_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not registered")
        text = request.prompt or request.messages.messages[-1].content
        return inference_pb2.GenerateResponse(
            request_id=request.request_id, text=f"echo:{text}", token_ids=[1, 2, 3],
            finish_reason=(inference_pb2.FINISH_REASON_CANCELLED  # a draining server's
                           if request.adapter_id == "drained" else
                           inference_pb2.FINISH_REASON_LENGTH),
            usage=inference_pb2.Usage(prompt_tokens=len(text), completion_tokens=3))

    def GenerateStream(self, request, context):
        self.fake.see("GenerateStream", context)
        self.fake.requests.append(request)
        yield inference_pb2.GenerateResponse(text="hel", token_ids=[1])
        if request.adapter_id == "missing":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
        yield inference_pb2.GenerateResponse(text="lo", token_ids=[2])
        yield inference_pb2.GenerateResponse(
            text="!", token_ids=[3], finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=inference_pb2.Usage(prompt_tokens=4, completion_tokens=3))


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    def _get(self, rpc, request, context):
        self.fake.see(rpc, context)
        if request.adapter_id not in self.fake.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"adapter {request.adapter_id!r} is not registered")
        return self.fake.adapters[request.adapter_id]

    def RegisterAdapter(self, request, context):
        self.fake.see("RegisterAdapter", context)
        if request.adapter_id in self.fake.adapters and not request.replace:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request.adapter_id!r} exists")
        info = admin_pb2.AdapterInfo(
            adapter_id=request.adapter_id, kind="nola", size_bytes=len(request.data),
            sha256=hashlib.sha256(request.data).hexdigest(), rank=8, created_at=1.5,
            target_modules=["self_attn.q_proj", "self_attn.v_proj"])
        self.fake.adapters[request.adapter_id] = info
        return info

    def GetAdapter(self, request, context):
        return self._get("GetAdapter", request, context)

    def ListAdapters(self, request, context):
        self.fake.see("ListAdapters", context)
        ids, start = sorted(self.fake.adapters), int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return admin_pb2.ListAdaptersResponse(
            adapters=[self.fake.adapters[i] for i in ids[start:end]], total=len(ids),
            next_page_token=str(end) if end < len(ids) else "")

    def DeleteAdapter(self, request, context):
        del self.fake.adapters[self._get("DeleteAdapter", request, context).adapter_id]
        return admin_pb2.DeleteAdapterResponse()

    def PinAdapter(self, request, context):
        self._get("PinAdapter", request, context).pinned = True
        return self.fake.adapters[request.adapter_id]

    def UnpinAdapter(self, request, context):
        self._get("UnpinAdapter", request, context).pinned = False
        return self.fake.adapters[request.adapter_id]

    def BuildRmmBasis(self, request, context):
        self.fake.see("BuildRmmBasis", context)
        tasks = [admin_pb2.RmmTask(adapter_id=f"{request.basis_id}/{s}", source_adapter_id=s,
                                   relative_error=0.125 * request.basis_size)
                 for s in request.source_adapter_ids]
        return admin_pb2.BuildRmmBasisResponse(basis_id=request.basis_id, tasks=tasks)

    def GetServerInfo(self, request, context):
        self.fake.see("GetServerInfo", context)
        modules = [admin_pb2.ModuleShape(name=n, in_features=i, out_features=o)
                   for n, (i, o) in SHAPES.items()]
        return admin_pb2.ServerInfo(base_model="tiny-llama", dtype="float32", device="cpu",
                                    num_layers=2, target_modules=modules, max_rank=16,
                                    num_slots=4, version="0.1.0")


def start_fake(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, str, Fake]:
    """A started fake server on a free loopback port: (server, target, what it saw)."""
    fake = Fake()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(fake), server)
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(fake), server)
    status = health.HealthServicer()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = (server.add_secure_port("localhost:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, f"{'localhost' if credentials else '127.0.0.1'}:{port}", fake


def self_signed_cert() -> tuple[bytes, bytes]:
    """A PEM certificate for localhost and its key (needs the cryptography package)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
