"""Proto messages <-> the engine's and the store's dataclasses. No I/O, no grpc calls."""

from __future__ import annotations

import importlib.metadata

from nolaserve.adapters.errors import short
from nolaserve.adapters.registry import AdapterRecord
from nolaserve.adapters.store import RmmResult
from nolaserve.v1 import admin_pb2, inference_pb2

from .config import Config
from .engine.engine import Engine, RequestOutput
from .engine.errors import InvalidRequestError, RequestTooLargeError
from .engine.sequence import FinishReason, SamplingParams

DEFAULT_MAX_TOKENS = 16
# A prompt longer than this many bytes per allowed token is refused before tokenizing:
# real text averages ~4 bytes per token; 32 leaves room for long runs of rare tokens.
PROMPT_BYTES_PER_TOKEN = 32
# Tool roles ("tool", with tool_calls on assistant messages) join this list together with
# tool-calling support; until then any other role is refused rather than rendered raw.
CHAT_ROLES = ("system", "user", "assistant")
_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}


def sampling_params(p: inference_pb2.SamplingParams) -> SamplingParams:
    """The proto's defaults applied: max_tokens 0 -> 16, unset temperature/top_p -> 1.0.
    Ranges are checked by the engine."""
    return SamplingParams(
        max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
    )


def check_prompt_size(request: inference_pb2.GenerateRequest, max_prompt_tokens: int) -> None:
    """``RequestTooLargeError`` unless the prompt (or all chat messages) is at most
    ``PROMPT_BYTES_PER_TOKEN * max_prompt_tokens`` bytes of UTF-8: checked before any
    tokenizing, which costs memory and CPU in proportion to the text."""
    limit = PROMPT_BYTES_PER_TOKEN * max_prompt_tokens
    if request.WhichOneof("input") == "messages":
        texts = [t for m in request.messages.messages for t in (m.role, m.content)]
    else:
        texts = [request.prompt]
    chars = sum(len(t) for t in texts)
    if chars > limit or (4 * chars > limit and sum(len(t.encode()) for t in texts) > limit):
        raise RequestTooLargeError(
            f"the prompt has more than {limit} bytes ({PROMPT_BYTES_PER_TOKEN} per token of "
            f"max_prompt_tokens = {max_prompt_tokens}): shorten it")


def prompt_token_ids(tokenizer, request: inference_pb2.GenerateRequest) -> list[int]:
    """Tokenize ``prompt``, or render ``messages`` with the chat template (generation
    prompt added) and tokenize that. Raises ``InvalidRequestError`` on a bad input.
    Call ``check_prompt_size`` first."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("set either prompt or messages in the GenerateRequest")
    if tokenizer is None:
        raise InvalidRequestError("this engine has no tokenizer; it cannot take text input")
    if which == "prompt":
        return list(tokenizer(request.prompt)["input_ids"])
    messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one chat message")
    for m in messages:
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequestError(
                f"chat role {short(m['role'])} is not supported: use one of "
                f"{', '.join(CHAT_ROLES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("the model's tokenizer has no chat template: send a "
                                  "plain prompt instead of messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_response(request_id: str, out: RequestOutput) -> inference_pb2.GenerateResponse:
    """One stream message; the last one carries finish_reason and usage."""
    response = inference_pb2.GenerateResponse(request_id=request_id, text=out.text,
                                              token_ids=out.token_ids)
    if out.finished:
        response.finish_reason = _FINISH[out.finish_reason]
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
    return response


def adapter_info(record: AdapterRecord, pinned: bool) -> admin_pb2.AdapterInfo:
    meta = record.metadata
    return admin_pb2.AdapterInfo(
        adapter_id=record.id, kind=record.kind, size_bytes=record.size, sha256=record.sha256,
        rank=int(meta.get("rank", 0)), target_modules=list(meta.get("target_modules", [])),
        created_at=record.created_at, description=str(meta.get("description", "")),
        base_model=str(meta.get("base_model", "")),
        basis_id=str(meta.get("basis_id", "") or record.parent or ""), pinned=pinned,
    )


def rmm_response(result: RmmResult, source_ids: list[str]) -> admin_pb2.BuildRmmBasisResponse:
    tasks = [admin_pb2.RmmTask(adapter_id=t.id, source_adapter_id=sid, relative_error=err)
             for t, sid, err in zip(result.tasks, source_ids, result.errors)]
    return admin_pb2.BuildRmmBasisResponse(basis_id=result.basis.id, tasks=tasks)


def server_info(engine: Engine, config: Config) -> admin_pb2.ServerInfo:
    """What the server runs: the base model, its adaptable linears, capacities, limits."""
    runner, limits = engine.runner, engine.limits
    spec = runner.spec
    store = engine.store
    return admin_pb2.ServerInfo(
        base_model=spec.name, dtype=str(runner.kv_cache.k.dtype).removeprefix("torch."),
        device=str(runner.device), num_layers=spec.num_layers,
        target_modules=[admin_pb2.ModuleShape(name=n, in_features=i, out_features=o)
                        for n, (i, o) in sorted(spec.module_shapes.items())],
        max_rank=spec.max_rank, num_slots=store.slots.num_slots if store else 0,
        host_cache_entries=store.host.max_entries if store else 0,
        host_cache_bytes=store.host.max_bytes if store else 0,
        max_prompt_tokens=min(limits.max_prompt_tokens, limits.max_model_len - 1),
        max_tokens_limit=limits.max_tokens_limit,
        max_queued_requests=limits.max_queued_requests,
        max_message_bytes=config.max_message_bytes, version=_version(),
    )


def _version() -> str:
    try:
        return importlib.metadata.version("nolaserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
