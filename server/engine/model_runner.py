"""The tensor side of one engine step: pack the scheduled sequences into one unpadded row
(``step_inputs``), run the (wrapped, otherwise unchanged) transformers model over it,
return the sampled rows' logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from nolaserve.adapters.gpu import triton_interpreted
from nolaserve.adapters.ops import Backend, LoraBatch, MultiBackend, step_backends
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec

from .attention import AttentionMetadata, register_attention
from .kv_cache import KVCache
from .lora_layers import LoraLinear, wrap_model
from .step_inputs import HostStaging, StepBatch, StepInputs, build_step_inputs

__all__ = ["ModelRunner", "StepBatch", "StepContext"]

ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass(eq=False)
class StepContext:
    """The current step's per-layer inputs, owned by the runner and refilled every step.

    The ``LoraLinear`` wrappers hold this object and read ``lora_batch`` and the backends
    chosen for the step; ``attn`` reaches the attention function as the ``attn_metadata``
    keyword of the model forward. All are empty between steps.
    """

    lora_batch: LoraBatch | None = None
    active_modules: frozenset[str] = frozenset()  # modules some slot of the step adapts
    attn: AttentionMetadata | None = None
    lora_backend: Backend | None = None
    lora_multi_backend: MultiBackend | None = None
    shared: dict = field(default_factory=dict)  # outputs of SharedInput groups, this step

    def clear(self) -> None:
        self.lora_batch = self.attn = self.lora_backend = self.lora_multi_backend = None
        self.active_modules = frozenset()
        self.shared.clear()


class ModelRunner:
    """Owns the KV cache and the step context, wraps the model's target linears with
    ``LoraLinear`` reading the adapter slots of ``pool`` (``None``: base model only) and
    selects the paged attention. Modifies ``model`` in place.

    ``attention``: ``auto`` (the Triton kernel on CUDA when triton imports, else torch),
    ``torch``, or ``triton`` (also on CPU tensors under ``TRITON_INTERPRET=1``)."""

    def __init__(self, model: nn.Module, spec: BaseModelSpec,
                 pool: SlotPool | None, num_kv_blocks: int,
                 block_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, attention: str = "auto") -> None:
        model_dtype = next(model.parameters()).dtype
        if model_dtype != dtype:
            raise ValueError(f"the model is {model_dtype} but the KV cache would be {dtype}")
        self.model, self.spec = model.eval(), spec
        self.device = torch.device(device)
        self.pool = pool
        self.ctx = StepContext()
        self.lora_layers: list[LoraLinear] = []
        if self.pool is not None:
            self.lora_layers = wrap_model(model, spec, self.pool, self.ctx)
        model.set_attn_implementation(register_attention())
        cfg = model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_kv_blocks, block_size,
                                self.num_kv_heads, self.head_dim, self.device, dtype)
        self.block_size, self.vocab_size = block_size, cfg.vocab_size
        self.kernel = attention_kernel(attention, self.device)
        self.staging = HostStaging(self.device)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; returns float32 logits ``[num_sampled, vocab]``, one row per
        sequence with ``sample`` set, in ``batch`` order. Writes the new tokens' keys and
        values into the cache. Raises ``ValueError`` on an inconsistent batch."""
        batch.validate()
        if batch.num_seqs == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        self._check_adapter_slots(batch.adapter_slot)
        inputs = build_step_inputs(batch, self.kv_cache, self.staging, self.kernel,
                                   with_lora=self.pool is not None)
        try:
            self._fill_context(inputs)
            with torch.inference_mode():
                out = self.model(input_ids=inputs.input_ids, position_ids=inputs.positions,
                                 use_cache=False, logits_to_keep=inputs.logits_rows,
                                 attn_metadata=inputs.attn)
        finally:
            self.ctx.clear()
        # A copy made outside inference mode: callers may modify it in place.
        return out.logits[0].to(torch.float32, copy=True)  # [num_sampled, vocab]

    def _fill_context(self, inputs: StepInputs) -> None:
        ctx = self.ctx
        ctx.attn = inputs.attn
        if inputs.lora is not None:
            ctx.lora_batch = inputs.lora
            ctx.lora_backend, ctx.lora_multi_backend = step_backends(inputs.lora, self.device)
            ctx.active_modules = self.pool.modules_of(set(inputs.slots))

    def _check_adapter_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        lo, hi = min(slots), max(slots)
        limit = self.pool.num_slots if self.pool is not None else 0
        if lo < -1 or hi >= limit:
            raise ValueError(
                f"adapter slots must be -1 (base) or in [0, {limit}), got {lo}..{hi}"
                + ("" if self.pool is not None else "; this runner serves the base model only"))


def attention_kernel(choice: str, device: torch.device):
    """The Triton paged-attention launcher for ``choice`` on ``device``, or None for the
    torch path. Raises ``ValueError`` for an unknown choice or ``triton`` where it cannot
    run."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return None
    kernel = _triton_kernel()
    if kernel is None and choice == "triton":
        raise ValueError("attention 'triton' needs the triton package")
    if choice == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError("attention 'triton' needs a CUDA device or TRITON_INTERPRET=1")
    return kernel


@functools.cache
def _triton_kernel():
    try:
        from .paged_triton import paged_attention
    except ImportError:
        return None
    return paged_attention
