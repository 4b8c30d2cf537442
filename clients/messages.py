"""The client's value types and their proto conversions (no logic beyond that).

Imports neither torch nor the server: a client machine needs grpcio and protobuf only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict, TypeVar

import grpc

from nolaserve.v1 import admin_pb2, inference_pb2

T = TypeVar("T")
ChatMessage = Mapping[str, str] | tuple[str, str]  # {"role": ..., "content": ...} or (role, text)


class SamplingExtras(TypedDict, total=False):
    """The optional sampling keywords of ``generate`` (inference.proto's SamplingParams);
    ``json_schema`` is a schema as a dict or JSON text; at most one of ``json_schema``,
    ``json_object``, ``regex``, ``choice`` and ``grammar`` (an EBNF grammar;
    StructuredOutput's ``format``)."""

    logprobs: int
    prompt_logprobs: int
    logit_bias: Mapping[int, float]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    min_p: float
    stop_token_ids: list[int]
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    truncate_prompt_tokens: int
    truncation_side: str
    logprob_token_ids: list[int]
    allowed_token_ids: list[int]
    bad_words: list[str]
    cache_salt: str
    json_schema: Mapping[str, Any] | str
    json_object: bool
    regex: str
    choice: list[str]
    grammar: str
    add_special_tokens: bool  # GenerateRequest's: unset = true for a prompt, false for chat
    n: int  # completions of the prompt (at most 16): GenerateResult.choices, StreamChunk.index
    stream_interval: int  # generate_stream: a chunk for every this many tokens


class NolaserveError(grpc.RpcError):
    """A failed RPC: ``code`` is the status code name (``"NOT_FOUND"``; an attribute, not
    grpc's ``code()`` method), ``status_code`` the ``grpc.StatusCode``, ``message`` the
    server's details; ``str(e)`` is ``"NOT_FOUND: adapter 'x' is not registered"``. It is a
    ``grpc.RpcError``, and the original one is ``__cause__``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status_code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` in the block as ``NolaserveError``."""
    try:
        yield
    except NolaserveError:  # built before it was sent
        raise
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        raise NolaserveError(code.name, _with_hint(details or "")) from e


_TRANSPORT_HINTS = (  # (text of a failed connection, what to fix)
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS at this address: connect "
                             "without tls_root_cert"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate does not verify against "
                                  "tls_root_cert: pass the root certificate that signed it, "
                                  "and a target whose name the certificate holds"),
    ("Socket closed", "the server closed the connection: if it speaks TLS, pass its root "
                      "certificate as tls_root_cert"),
)


def _with_hint(details: str) -> str:
    """``details`` of a failed connection, with what to fix where it is a TLS mismatch."""
    if not details.startswith("failed to connect"):
        return details
    hint = next((fix for text, fix in _TRANSPORT_HINTS if text in details), None)
    return f"{details} ({hint})" if hint else details


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those served from the prefix cache


@dataclass
class TokenLogprob:
    """A token's logprob, the ``top`` most likely ``(token id, logprob)`` there, and its
    ``rank`` (1 = the likeliest; 0: the server did not say)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0


@dataclass
class GenerateResult:
    """A whole completion. ``finish_reason``: length | stop | eos | cancelled."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    cached_tokens: int = 0  # of prompt_tokens, those served from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked: one per token
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 2..
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    index: int = 0  # which of n completions
    choices: list[GenerateResult] = field(default_factory=list)  # n > 1: each completion;
    # the result itself then has only request_id and the usage of them all


@dataclass
class StreamChunk:
    """New text and token ids; ``finish_reason`` and ``usage`` are set on the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # first chunk only
    stop_reason: str | int | None = None  # last chunk: as ``GenerateResult.stop_reason``
    index: int = 0  # which of n completions (their chunks interleave)


@dataclass
class AdapterInfo:
    """A registered adapter. ``kind``: nola | lora | rmm-task | rmm-basis."""

    adapter_id: str
    kind: str
    size_bytes: int
    sha256: str
    rank: int
    target_modules: list[str]
    created_at: float  # unix seconds
    description: str
    base_model: str
    basis_id: str  # rmm-task: its basis
    pinned: bool


@dataclass
class RmmTask:
    adapter_id: str  # "<basis_id>/<source id>"
    source_adapter_id: str
    relative_error: float  # ||dW~ - dW||_F / ||dW||_F


@dataclass
class RmmResult:
    basis_id: str
    tasks: list[RmmTask]


@dataclass
class ModuleShape:
    name: str  # relative to a decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass
class ServerInfo:
    """The base model, its adaptable linears and the server's limits."""

    base_model: str
    dtype: str
    device: str
    num_layers: int
    max_rank: int
    num_slots: int
    host_cache_entries: int
    host_cache_bytes: int
    max_prompt_tokens: int
    max_tokens_limit: int
    max_queued_requests: int
    max_message_bytes: int
    version: str
    target_modules: list[ModuleShape] = field(default_factory=list)
    kv_cache_blocks: int = 0
    block_size: int = 0
    max_context_tokens: int = 0
    base_model_fingerprint: str = ""  # what an adapter file's base_model may also name
    max_num_basis: int = 0  # 0: a server from before it said


def _copy(cls: type[T], message: object, **extra: object) -> T:
    """``cls`` built from the same-named fields of ``message`` (``extra`` wins)."""
    values = {f.name: getattr(message, f.name) for f in fields(cls) if f.name not in extra}
    return cls(**values, **extra)


def finish_reason(value: int) -> str | None:
    """``FINISH_REASON_LENGTH`` -> ``"length"``; unspecified (not finished) -> None."""
    if value == inference_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def generate_result(r: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(text=r.text, token_ids=list(r.token_ids),
                          finish_reason=finish_reason(r.finish_reason) or "",
                          prompt_tokens=r.usage.prompt_tokens,
                          completion_tokens=r.usage.completion_tokens, request_id=r.request_id,
                          cached_tokens=r.usage.cached_tokens,
                          stop_reason=_stop_reason(r), index=r.index,
                          choices=[generate_result(c) for c in r.choices], **_logprobs(r))


def stream_chunk(r: inference_pb2.GenerateResponse) -> StreamChunk:
    usage = Usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_tokens) \
        if r.HasField("usage") else None
    return StreamChunk(text=r.text, token_ids=list(r.token_ids),
                       finish_reason=finish_reason(r.finish_reason), usage=usage,
                       stop_reason=_stop_reason(r), index=r.index, **_logprobs(r))


def _stop_reason(r: inference_pb2.GenerateResponse) -> str | int | None:
    which = r.WhichOneof("stop_reason")
    return None if which is None else getattr(r, which)


def _logprobs(r: inference_pb2.GenerateResponse) -> dict[str, list[TokenLogprob]]:
    def entries(es) -> list[TokenLogprob]:
        return [TokenLogprob(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top],
                             e.rank)
                for e in es]

    return {"logprobs": entries(r.logprobs), "prompt_logprobs": entries(r.prompt_logprobs)}


def adapter_info(m: admin_pb2.AdapterInfo) -> AdapterInfo:
    return _copy(AdapterInfo, m, target_modules=list(m.target_modules))


def rmm_result(m: admin_pb2.BuildRmmBasisResponse) -> RmmResult:
    return RmmResult(basis_id=m.basis_id, tasks=[_copy(RmmTask, t) for t in m.tasks])


def server_info(m: admin_pb2.ServerInfo) -> ServerInfo:
    return _copy(ServerInfo, m, target_modules=[_copy(ModuleShape, t) for t in m.target_modules])


def built(message: type, **fields: Any) -> Any:
    """``message(**fields)``, or ``NolaserveError`` (INVALID_ARGUMENT) naming the field the
    message type cannot hold (a negative count, a number over its range, text that is not
    UTF-8) instead of protobuf's own error, which names none."""
    try:
        return message(**fields)
    except (ValueError, TypeError, UnicodeError) as e:
        why = str(e)
        for name, value in fields.items():
            try:
                message(**{name: value})
            except (ValueError, TypeError, UnicodeError) as one:
                why = f"{name}={str(value)[:40]!r}: {one}"
                break
        raise NolaserveError("INVALID_ARGUMENT", why) from None


def _chat(messages: Sequence[ChatMessage]) -> inference_pb2.ChatMessages:
    if isinstance(messages, str | bytes | Mapping):
        raise NolaserveError("INVALID_ARGUMENT", "messages must be a list of chat messages "
                             "({'role': ..., 'content': ...}), not one string or message")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (
            tuple(m) if isinstance(m, Sequence) and not isinstance(m, str) and len(m) == 2
            else (None, None))
        if not (isinstance(role, str) and isinstance(content, str)):
            raise NolaserveError("INVALID_ARGUMENT", f"messages[{i}] needs a 'role' and a "
                                 "'content', both strings")
        out.append(built(inference_pb2.ChatMessage, role=role, content=content))
    return inference_pb2.ChatMessages(messages=out)


def generate_request(prompt: str | None, messages: Sequence[ChatMessage] | None,
                     adapter_id: str, max_tokens: int, temperature: float | None,
                     top_p: float | None, top_k: int, seed: int | None, stop: str | Sequence[str],
                     ignore_eos: bool, request_id: str,
                     extras: SamplingExtras | None = None) -> inference_pb2.GenerateRequest:
    """The request for exactly one of ``prompt`` and ``messages``; None leaves a sampling
    field unset (the server's default)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    if isinstance(max_tokens, int) and max_tokens < 1:  # 0 would be the server's default
        raise NolaserveError("INVALID_ARGUMENT", f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(extras and extras.get("n"), int) and extras["n"] < 1:  # 0: the default, 1
        raise NolaserveError("INVALID_ARGUMENT", f"n must be >= 1, got {extras['n']}")
    if not isinstance(stop, str) and not (isinstance(stop, Sequence) and
                                          all(isinstance(s, str) for s in stop)):
        raise NolaserveError("INVALID_ARGUMENT", f"stop must be a string or a list of "
                             f"strings, got {str(stop)[:40]!r}")
    extras = dict(extras or {})
    special = extras.pop("add_special_tokens", None)
    optional = {"temperature": temperature, "top_p": top_p, "seed": seed}
    sampling = built(
        inference_pb2.SamplingParams, max_tokens=max_tokens,
        top_k=0 if top_k == -1 else top_k, ignore_eos=ignore_eos,  # -1: off, as vLLM's
        stop=[stop] if isinstance(stop, str) else list(stop),  # a string: one stop string
        **{k: v for k, v in optional.items() if v is not None}, **_extras(extras))
    input_ = {"prompt": prompt} if prompt is not None else {"messages": _chat(messages or ())}
    if special is not None:
        input_["add_special_tokens"] = special
    return built(inference_pb2.GenerateRequest, adapter_id=adapter_id, sampling=sampling,
                 request_id=request_id, **input_)


def _extras(extras: SamplingExtras) -> dict[str, Any]:
    """``SamplingExtras`` as SamplingParams fields; ``TypeError`` for an unknown name."""
    unknown = set(extras) - set(SamplingExtras.__annotations__)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}: use "
                        f"{', '.join(SamplingExtras.__annotations__)}")
    formats = {"json_schema", "json_object", "regex", "choice", "grammar"}
    fields_ = {k: v for k, v in extras.items() if k not in formats}
    asked = [k for k in extras if k in formats and extras[k] not in (None, False)]
    if len(asked) > 1:
        raise TypeError(f"{asked} each constrain the output: pass one of them")
    if asked:
        fields_["structured"] = inference_pb2.StructuredOutput(**_format(asked[0],
                                                                         extras[asked[0]]))
    return fields_


def _format(name: str, value: Any) -> dict[str, Any]:
    """One StructuredOutput ``format`` field from its ``SamplingExtras`` value."""
    if name == "json_schema" and not isinstance(value, str):
        return {name: json.dumps(value)}
    if name == "choice":
        return {name: inference_pb2.Choices(values=list(value))}
    return {name: value}
