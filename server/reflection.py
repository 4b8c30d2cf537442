"""gRPC server reflection that carries the .proto files' comments: a client that knows the
API only through reflection (``grpcurl describe``) reads each field's meaning ("0 = 16",
"k in [0, 20]"), which the descriptors compiled into ``*_pb2`` modules leave out.

grpcio-reflection builds each ``FileDescriptorProto`` it serves with
``descriptor.CopyToProto``; the pool given here hands it file descriptors whose copy
gains the file's ``SourceCodeInfo`` (``nolaserve.v1.comments_pb2``, generated beside the
stubs).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

from nolaserve.v1 import comments_pb2


class _Documented:
    """A file descriptor whose ``CopyToProto`` includes its comments."""

    def __init__(self, file: object) -> None:
        self._file = file
        self.name = file.name

    @property
    def dependencies(self) -> list[_Documented]:
        return [_Documented(d) for d in self._file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802
        self._file.CopyToProto(proto)
        comments = comments_pb2.SOURCE_CODE_INFO.get(self.name)
        if comments is not None:
            proto.source_code_info.ParseFromString(comments)


class DocumentedPool:
    """The default descriptor pool, as reflection reads it, with commented files."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileByName(self, name: str) -> _Documented:  # noqa: N802
        return _Documented(self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _Documented:  # noqa: N802
        return _Documented(self._pool.FindFileContainingSymbol(symbol))

    def __getattr__(self, name: str) -> object:  # the extension lookups, unchanged
        return getattr(self._pool, name)


def enable(server: object, *services: str) -> None:
    """Reflection on ``server``, listing ``services`` and itself."""
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server,
                                        pool=DocumentedPool())
