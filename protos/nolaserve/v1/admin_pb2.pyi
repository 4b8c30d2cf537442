from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "data", "replace")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    data: bytes
    replace: bool
    def __init__(self, adapter_id: _Optional[str] = ..., data: _Optional[bytes] = ..., replace: _Optional[bool] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "kind", "size_bytes", "sha256", "rank", "target_modules", "created_at", "description", "base_model", "basis_id", "pinned")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASIS_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    kind: str
    size_bytes: int
    sha256: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    description: str
    base_model: str
    basis_id: str
    pinned: bool
    def __init__(self, adapter_id: _Optional[str] = ..., kind: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., description: _Optional[str] = ..., base_model: _Optional[str] = ..., basis_id: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token", "total")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    next_page_token: str
    total: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BuildRmmBasisRequest(_message.Message):
    __slots__ = ("source_adapter_ids", "basis_size", "basis_id")
    SOURCE_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    BASIS_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASIS_ID_FIELD_NUMBER: _ClassVar[int]
    source_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    basis_size: int
    basis_id: str
    def __init__(self, source_adapter_ids: _Optional[_Iterable[str]] = ..., basis_size: _Optional[int] = ..., basis_id: _Optional[str] = ...) -> None: ...

class RmmTask(_message.Message):
    __slots__ = ("adapter_id", "source_adapter_id", "relative_error")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    source_adapter_id: str
    relative_error: float
    def __init__(self, adapter_id: _Optional[str] = ..., source_adapter_id: _Optional[str] = ..., relative_error: _Optional[float] = ...) -> None: ...

class BuildRmmBasisResponse(_message.Message):
    __slots__ = ("basis_id", "tasks")
    BASIS_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    basis_id: str
    tasks: _containers.RepeatedCompositeFieldContainer[RmmTask]
    def __init__(self, basis_id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[RmmTask, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleShape(_message.Message):
    __slots__ = ("name", "in_features", "out_features")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    in_features: int
    out_features: int
    def __init__(self, name: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("base_model", "dtype", "device", "num_layers", "target_modules", "max_rank", "num_slots", "host_cache_entries", "host_cache_bytes", "max_prompt_tokens", "max_tokens_limit", "max_queued_requests", "max_message_bytes", "version", "kv_cache_blocks", "block_size", "max_context_tokens", "base_model_fingerprint", "max_num_basis")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BASIS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    dtype: str
    device: str
    num_layers: int
    target_modules: _containers.RepeatedCompositeFieldContainer[ModuleShape]
    max_rank: int
    num_slots: int
    host_cache_entries: int
    host_cache_bytes: int
    max_prompt_tokens: int
    max_tokens_limit: int
    max_queued_requests: int
    max_message_bytes: int
    version: str
    kv_cache_blocks: int
    block_size: int
    max_context_tokens: int
    base_model_fingerprint: str
    max_num_basis: int
    def __init__(self, base_model: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_layers: _Optional[int] = ..., target_modules: _Optional[_Iterable[_Union[ModuleShape, _Mapping]]] = ..., max_rank: _Optional[int] = ..., num_slots: _Optional[int] = ..., host_cache_entries: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., version: _Optional[str] = ..., kv_cache_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., base_model_fingerprint: _Optional[str] = ..., max_num_basis: _Optional[int] = ...) -> None: ...
