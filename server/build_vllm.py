"""Assemble the vLLM backend (``engine: vllm``) from the one ``Config``: the base model's
spec read off a weightless (meta-device) copy, the same registry and ``AdapterStore`` as
the native engine, ``VllmLoras`` as the store's device side, and vLLM's ``AsyncLLM``.

Must run on the event loop that will serve (vLLM's client sockets belong to it); it
blocks that loop while vLLM starts, before any port serves.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from nolaserve.adapters.errors import ModelLoadError
from nolaserve.adapters.registry import Registry, open_registry
from nolaserve.adapters.spec import decoder_layers, model_spec
from nolaserve.adapters.store import AdapterStore

from .build import registry_path
from .config import Config
from .engine import model_loader as ml
from .engine import vllm_args
from .engine.engine_types import EngineLimits
from .engine.peft_dirs import PeftDirCache, default_root
from .engine.vllm_engine import VllmEngine
from .engine.vllm_loras import Version, VllmLoras
from .engine.vllm_stats import VllmStats

log = logging.getLogger("nolaserve.engine")


class AsyncLlmLoras:
    """``LoraBackend`` over ``AsyncLLM``'s add_lora / remove_lora."""

    def __init__(self) -> None:
        self.llm = None

    async def add(self, version: Version) -> None:
        from vllm.lora.request import LoRARequest

        await self.llm.add_lora(LoRARequest(version.name, version.lora_int_id, version.path))

    async def remove(self, lora_int_id: int) -> None:
        await self.llm.remove_lora(lora_int_id)


async def build_vllm_engine(config: Config, registry: Registry | None = None) -> VllmEngine:
    """A started ``VllmEngine`` for ``config`` (``registry`` overrides the config's). The
    slow parts (importing vLLM, describing the model, vLLM's start) run on threads, so
    that health answers NOT_SERVING meanwhile."""
    AsyncLLM = await asyncio.to_thread(_async_llm)  # noqa: N806 - a class
    cache_dir = Path(config.cache_dir).expanduser()
    model_dir, spec, fingerprint, prefix, tokenizer = await asyncio.to_thread(
        _describe_model, config, cache_dir)
    if registry is None:
        registry = open_registry(registry_path(config, cache_dir, fingerprint),
                                 scope=fingerprint)
    root = Path(config.peft_cache_dir).expanduser() if config.peft_cache_dir else default_root()
    dirs, backend = PeftDirCache(root, config.peft_cache_bytes), AsyncLlmLoras()
    max_loras = config.max_loras or config.num_slots
    store = AdapterStore(spec, registry, num_slots=max_loras,
                         host_max_entries=config.host_cache_entries,
                         host_max_bytes=config.host_cache_bytes,
                         slots=lambda s: VllmLoras(s, dirs, backend, max_loras,
                                                   vllm_args.lora_rank(config), prefix))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stats = VllmStats()
    args = vllm_args.engine_args(config, model_dir, device)
    args.served_model_name = spec.name  # vLLM's model_name label, as on nolaserve's series
    log.info("starting vLLM on %s (tensor parallel %d, pipeline parallel %d)", model_dir,
             config.tensor_parallel_size, config.pipeline_parallel_size)
    try:
        # (AsyncLLM starts its output handler on the first request, in the event loop)
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args,
                                      stat_loggers=[stats.logger_factory()])
    except BaseException:
        store.close()
        dirs.close()
        raise
    backend.llm = llm
    model_config = llm.model_config
    limits = EngineLimits.resolved(config.max_prompt_tokens, config.max_tokens_limit,
                          model_config.max_model_len, config.max_queued_requests,
                          model_config.get_vocab_size())
    served = str(model_config.dtype).removeprefix("torch.")
    return VllmEngine(llm, store, store.slots, tokenizer, limits, stats, served, device)


def _async_llm():
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise ModelLoadError(f"{vllm_args.INSTALL_HINT} ({e})") from None
    return AsyncLLM


def _describe_model(config: Config, cache_dir: Path):
    """``(checkpoint dir, spec, fingerprint, decoder-layer prefix, tokenizer)``; the spec
    and fingerprint come from a meta-device model (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = _checkpoint_dir(config.model, cache_dir / "models")
    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    names = (config.model,) if config.model else ml.model_names("")
    spec = model_spec(model, config.target_modules or None, max_rank=config.max_rank,
                      max_num_basis=config.max_num_basis, name=names[0],
                      fingerprint=ml.model_fingerprint(model), aliases=names[1:])
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return model_dir, spec, spec.fingerprint, prefix, AutoTokenizer.from_pretrained(model_dir)


def _checkpoint_dir(source: str, models_dir: Path) -> str:
    """A directory vLLM can load: the given one (or hub id); a GGUF file (the embedded
    SmolLM2 when ``source`` is "") is converted once, as the native engine does."""
    if source and not source.endswith(".gguf"):
        return source
    gguf = Path(source) if source else ml.default_model_path()
    converted = ml.gguf_cache_path(gguf, models_dir)
    if not converted.is_dir():
        ml.load_model(str(gguf), device="cpu", dtype="float32", cache_dir=models_dir)
    return str(converted)
