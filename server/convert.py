"""Proto messages <-> the engine's and the store's dataclasses. No I/O, no grpc calls."""

from __future__ import annotations

import importlib.metadata
import json
import sys

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.adapters.registry_rows import AdapterRecord
from nolaserve.adapters.safetensors_io import cut_text
from nolaserve.adapters.store import RmmResult
from nolaserve.v1 import admin_pb2, inference_pb2

from .chat import ChatMessage, ChatOptions
from .config import Config
from .engine.engine import Engine
from .engine.engine_types import RequestOutput, TokenLogprob
from .engine.sequence import FinishReason, SamplingParams, StructuredSpec
from .generation import MAX_N, GenerateRequest

DEFAULT_MAX_TOKENS = 16
_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}


def sampling_params(p: inference_pb2.SamplingParams) -> SamplingParams:
    """The proto's defaults applied: max_tokens 0 -> 16, unset temperature/top_p/
    repetition_penalty -> 1.0. Ranges are checked by the engine, as for HTTP."""
    return SamplingParams(
        max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        logit_bias=dict(p.logit_bias),
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=(p.repetition_penalty if p.HasField("repetition_penalty")
                            else 1.0),
        min_tokens=p.min_tokens,
        structured=structured_spec(p.structured) if p.HasField("structured") else None,
        min_p=p.min_p,
        stop_token_ids=list(p.stop_token_ids),
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=(p.skip_special_tokens if p.HasField("skip_special_tokens")
                             else True),
        spaces_between_special_tokens=(p.spaces_between_special_tokens if p.HasField(
            "spaces_between_special_tokens") else True),
        truncate_prompt_tokens=(p.truncate_prompt_tokens
                                if p.HasField("truncate_prompt_tokens") else None),
        allowed_token_ids=list(p.allowed_token_ids) or None,
        bad_words=list(p.bad_words),
        cache_salt=p.cache_salt if p.HasField("cache_salt") else None,
        truncation_side=p.truncation_side or "left",
        logprob_token_ids=list(p.logprob_token_ids) or None,
        stream_interval=p.stream_interval or None,
    )


def structured_spec(s: inference_pb2.StructuredOutput) -> StructuredSpec:
    """``InvalidRequestError`` for a StructuredOutput that asks for nothing."""
    which = s.WhichOneof("format")
    if which == "json_schema" and s.json_schema.strip():
        return StructuredSpec(s.json_schema)
    if which == "json_object" and s.json_object:
        return StructuredSpec()
    if which == "regex" and s.regex:
        return StructuredSpec(regex=s.regex)
    if which == "choice":
        return StructuredSpec(choice=tuple(s.choice.values))  # the engine checks them
    if which == "grammar" and s.grammar.strip():
        return StructuredSpec(grammar=s.grammar)
    raise InvalidRequestError(
        "sampling.structured asks for nothing: set json_schema to a JSON schema, "
        "json_object to true, regex, choice or grammar, or leave structured unset for free "
        "text")


def generate_request(request: inference_pb2.GenerateRequest) -> GenerateRequest:
    """The front-end-neutral request: ``adapter_id`` names the model (see
    ``generation.resolve_adapter``), ``prompt`` or chat ``messages`` the input."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("set either prompt or messages in the GenerateRequest")
    messages, chat = None, ChatOptions()
    if which == "messages":
        messages = [ChatMessage(m.role, m.content) for m in request.messages.messages]
        chat = chat_options(request.messages)
    return GenerateRequest(model=request.adapter_id,
                           prompt=request.prompt if which == "prompt" else None,
                           messages=messages, params=sampling_params(request.sampling),
                           chat=chat, add_special_tokens=(
                               request.add_special_tokens
                               if request.HasField("add_special_tokens") else None))


def chat_options(m: inference_pb2.ChatMessages) -> ChatOptions:
    """``ChatMessages``' rendering fields; ``InvalidRequestError`` when
    ``chat_template_kwargs`` is not a JSON object."""
    kwargs, example = {}, 'a JSON object, such as {"enable_thinking": false}'
    if m.chat_template_kwargs:
        try:
            kwargs = json.loads(m.chat_template_kwargs)
        except RecursionError:
            raise InvalidRequestError(f"chat_template_kwargs nests too deep to parse: send "
                                      f"{example}", "chat_template_kwargs") from None
        except ValueError as e:  # a syntax error, or an integer past Python's digit limit
            why = (f"a number of more than {sys.get_int_max_str_digits()} digits"
                   if "digits" in str(e) else e)
            raise InvalidRequestError(f"chat_template_kwargs is not JSON ({why}): "
                                      f"send {example}", "chat_template_kwargs") from None
        if not isinstance(kwargs, dict):
            raise InvalidRequestError(f"chat_template_kwargs must be {example}",
                                      "chat_template_kwargs")
    return ChatOptions(m.add_generation_prompt if m.HasField("add_generation_prompt") else True,
                       m.continue_final_message, kwargs,
                       [dict(d.fields) for d in m.documents] or None)


def num_completions(request: inference_pb2.GenerateRequest) -> int:
    """``sampling.n`` (0 = 1), at most ``MAX_N``."""
    n = request.sampling.n or 1
    if n > MAX_N:
        raise InvalidRequestError(f"sampling.n = {n}: a request makes at most {MAX_N} "
                                  "completions; send several requests", "n")
    return n


def generate_response(request_id: str, out: RequestOutput, index: int = 0
                      ) -> inference_pb2.GenerateResponse:
    """One stream message of completion ``index``; its last one carries finish_reason
    and usage."""
    response = inference_pb2.GenerateResponse(request_id=request_id, text=out.text,
                                              token_ids=out.token_ids, index=index)
    if isinstance(out.stop_reason, str):
        response.stop_string = out.stop_reason
    elif out.stop_reason is not None:
        response.stop_token_id = out.stop_reason
    if out.finished:
        response.finish_reason = _FINISH[out.finish_reason]
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
        response.usage.cached_tokens = out.cached_tokens
    response.logprobs.extend(token_logprob(e) for e in out.logprobs or ())
    response.prompt_logprobs.extend(token_logprob(e) for e in out.prompt_logprobs or ()
                                    if e is not None)
    return response


def completions_response(request_id: str, outs: list[RequestOutput]
                         ) -> inference_pb2.GenerateResponse:
    """``Generate`` with ``sampling.n > 1``: each completion (all its outputs joined) as a
    choice; the usage of them all, the prompt counted once, its cached tokens those
    cached before it came (the choices' least)."""
    choices = [generate_response(request_id, out, i) for i, out in enumerate(outs)]
    return inference_pb2.GenerateResponse(
        request_id=request_id, choices=choices, usage=inference_pb2.Usage(
            prompt_tokens=outs[0].prompt_tokens,
            completion_tokens=sum(out.completion_tokens for out in outs),
            cached_tokens=min(out.cached_tokens for out in outs)))


def token_logprob(entry: TokenLogprob) -> inference_pb2.TokenLogprob:
    return inference_pb2.TokenLogprob(
        token_id=entry.token_id, logprob=entry.logprob,
        top=[inference_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top],
        rank=entry.rank or 0)


def adapter_info(record: AdapterRecord, pinned: bool) -> admin_pb2.AdapterInfo:
    """The record as AdapterInfo; free text is cut to the registration limits, so a huge
    description an older registry holds cannot break a listing."""
    meta = record.metadata
    return admin_pb2.AdapterInfo(
        adapter_id=record.id, kind=record.kind, size_bytes=record.size, sha256=record.sha256,
        rank=int(meta.get("rank", 0)), target_modules=list(meta.get("target_modules", [])),
        created_at=record.created_at,
        description=cut_text("description", str(meta.get("description", ""))),
        base_model=cut_text("base_model", str(meta.get("base_model", ""))),
        basis_id=str(meta.get("basis_id", "") or record.parent or ""), pinned=pinned,
    )


def rmm_response(result: RmmResult, source_ids: list[str]) -> admin_pb2.BuildRmmBasisResponse:
    tasks = [admin_pb2.RmmTask(adapter_id=t.id, source_adapter_id=sid, relative_error=err)
             for t, sid, err in zip(result.tasks, source_ids, result.errors)]
    return admin_pb2.BuildRmmBasisResponse(basis_id=result.basis.id, tasks=tasks)


def server_info(engine: Engine, config: Config) -> admin_pb2.ServerInfo:
    """What the server runs: the base model, its adaptable linears, capacities, limits."""
    limits, spec, store = engine.limits, engine.spec, engine.store
    dtype, device = engine.placement
    host_entries, host_bytes = store.host_limits if store else (0, 0)
    blocks = engine.stats.kv_blocks_total  # block_size: the native engine's (vLLM: its own)
    return admin_pb2.ServerInfo(
        base_model=spec.name, dtype=dtype, device=device, num_layers=spec.num_layers,
        target_modules=[admin_pb2.ModuleShape(name=n, in_features=i, out_features=o)
                        for n, (i, o) in sorted(spec.module_shapes.items())],
        max_rank=spec.max_rank, num_slots=store.num_slots if store else 0,
        host_cache_entries=host_entries, host_cache_bytes=host_bytes,
        max_prompt_tokens=min(limits.max_prompt_tokens, limits.max_model_len - 1),
        max_tokens_limit=limits.max_tokens_limit,
        max_queued_requests=limits.max_queued_requests,
        max_message_bytes=config.max_message_bytes, version=_version(),
        kv_cache_blocks=blocks, block_size=config.block_size,
        max_context_tokens=min(limits.max_model_len, blocks * config.block_size),
        base_model_fingerprint=spec.fingerprint, max_num_basis=spec.max_num_basis,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("nolaserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
