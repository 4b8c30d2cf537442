"""Assemble an ``Engine`` from the one ``Config``: model, adapter store, KV cache,
scheduler and admission."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nolaserve.adapters.registry import Registry, open_registry
from nolaserve.adapters.spec import model_spec
from nolaserve.adapters.store import AdapterStore

from .config import Config
from .engine.admission import AdapterAdmission
from .engine.attention import servable_context
from .engine.block_manager import BlockManager
from .engine.engine import Engine
from .engine.engine_types import EngineLimits
from .engine.memory import KVSizing, bytes_per_block, size_kv_cache
from .engine.model_loader import (
    check_device,
    load_model,
    model_fingerprint,
    model_names,
    resolve_device_dtype,
)
from .engine.model_runner import ModelRunner
from .engine.scheduler import Scheduler

log = logging.getLogger("nolaserve.engine")


def build_engine(config: Config, model=None, tokenizer=None,
                 registry: Registry | None = None) -> Engine:
    """An engine for ``config``; ``model``/``tokenizer``/``registry`` override what the
    config would load (tests pass tiny models and in-memory registries)."""
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    check_device(device)
    cache_dir = Path(config.cache_dir).expanduser()
    names = model_names(config.model, model)
    if model is None:
        model, tokenizer = load_model(config.model or None, device=device, dtype=dtype,
                                      cache_dir=cache_dir / "models")
    model = model.to(device=device, dtype=dtype).eval()
    fingerprint = model_fingerprint(model)
    spec = model_spec(model, config.target_modules or None, max_rank=config.max_rank,
                      max_num_basis=config.max_num_basis, name=names[0] if names else "",
                      fingerprint=fingerprint, aliases=names[1:])
    if registry is None:
        registry = open_registry(registry_path(config, cache_dir, fingerprint),
                                 scope=fingerprint)
    store = AdapterStore(spec, registry, num_slots=config.num_slots, device=device,
                         dtype=dtype, host_max_entries=config.host_cache_entries,
                         host_max_bytes=config.host_cache_bytes,
                         materialize_threads=config.materialize_threads,
                         warm_cache_bytes=config.warm_cache_bytes)
    text = model.config.get_text_config()
    max_model_len = servable_context(text)
    if max_model_len < text.max_position_embeddings:
        log.warning("the model's sliding window is %d tokens: max_model_len capped from %d "
                    "to %d (paged attention serves full attention only)", max_model_len,
                    text.max_position_embeddings, max_model_len)
    runner = ModelRunner(model, spec, store.slots, _warm_up_blocks(config), config.block_size,
                         device, dtype, enforce_eager=config.enforce_eager,
                         max_num_seqs=config.max_num_seqs, max_model_len=max_model_len)
    _size_kv_cache(config, runner, text, dtype, max_model_len)
    start = time.perf_counter()
    # On CPU nothing compiles: a one-block prefill stands for the prefill bucket (the full
    # max_num_batched_tokens one is the profiling forward on CUDA).
    prefill = config.max_num_batched_tokens if runner.device.type == "cuda" else \
        min(config.max_num_batched_tokens, config.block_size)
    steps = runner.warm_up(config.max_num_seqs, prefill, max_model_len)
    log.info("warm-up: %d steps%s in %.2f s", steps, " and graphs (one per shape bucket)"
             if runner.device.type == "cuda" and not config.enforce_eager else "",
             time.perf_counter() - start)
    admission = AdapterAdmission(store, config.admission_aging_steps,
                                 quantum_steps=config.admission_quantum_steps)
    # batch-invariant: a cached prefix's KV came from other chunks and batches: no caching
    caching = config.enable_prefix_caching and not config.batch_invariant
    scheduler = Scheduler(BlockManager(runner.num_kv_blocks, config.block_size, caching),
                          config.max_num_seqs, config.max_num_batched_tokens, admission.ready,
                          fixed_chunks=config.batch_invariant,
                          adapter_overdue=admission.overdue,
                          prefix_identity=admission.cache_identity if caching else None)
    limits = EngineLimits.resolved(config.max_prompt_tokens, config.max_tokens_limit,
                          max_model_len, config.max_queued_requests, runner.vocab_size)
    return Engine(runner, tokenizer, scheduler, admission, limits, _eos_ids(model, tokenizer),
                  batch_invariant=config.batch_invariant)


def registry_path(config: Config, cache_dir: Path, fingerprint: str) -> str:
    """``registry_url`` or ``registry_path`` if set, else
    ``<cache_dir>/registries/<fingerprint>.db``: one default registry per base model. The
    registry is scoped to the fingerprint either way (``Registry``), so a shared file or
    database lists only what this model can serve."""
    if config.registry_url:
        return config.registry_url
    if config.registry_path:
        return config.registry_path
    legacy = cache_dir / "registry.db"  # the one shared default before per-model registries
    if legacy.is_file():
        log.warning("adapters registered before per-model registries are in %s; serve them "
                    "with --registry-path %s (the file is upgraded in place, nothing is lost)",
                    legacy, legacy)
    (cache_dir / "registries").mkdir(parents=True, exist_ok=True)
    return str(cache_dir / "registries" / f"{fingerprint}.db")


def _warm_up_blocks(config: Config) -> int:
    """A cache just large enough for the warm-up steps (the real one is sized after)."""
    return -(-config.max_num_batched_tokens // config.block_size) + config.max_num_seqs + 1


def _size_kv_cache(config: Config, runner: ModelRunner, text, dtype,
                   max_model_len: int) -> KVSizing:
    """Size the cache from memory (``memory.size_kv_cache``: the warm-up steps are the
    profiling forward on CUDA), resize the runner's and log what fits."""
    def profile() -> None:
        runner.warm_up(config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                       capture=False)

    sizing = size_kv_cache(
        kv_cache_bytes=config.kv_cache_bytes, device=runner.device,
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_fraction=config.cpu_kv_cache_fraction, block_size=config.block_size,
        bytes_per_block=bytes_per_block(text, config.block_size, dtype),
        max_seqs=config.max_num_seqs, max_model_len=max_model_len, profile=profile)
    runner.resize_kv_cache(sizing.num_blocks)
    log.info("KV cache: %d blocks of %d tokens, %.1f MiB (%s); the longest context that "
             "fits is %d tokens (max_model_len %d)", sizing.num_blocks, sizing.block_size,
             runner.kv_cache.nbytes / 2**20, sizing.source,
             min(sizing.max_tokens, max_model_len), max_model_len)
    return sizing


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
