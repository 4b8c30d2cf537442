"""The tensor side of one engine step: fill the runner's ``StepBuffers`` with the scheduled
sequences (a decode step through ``DecodeStep``, at a fixed shape; any other packed into
one unpadded row, ``step_inputs``), run the (wrapped, otherwise unchanged) transformers
model over it, return the sampled rows' logits."""

from __future__ import annotations

import functools

import torch
from torch import nn

from nolaserve.adapters.gpu import triton_interpreted
from nolaserve.adapters.ops import step_backend
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec

from .attention import register_attention, torch_units
from .decode_step import DecodeStep
from .kv_cache import KVCache
from .lora_layers import LoraLinear, wrap_model
from .step_buffers import StepBuffers
from .step_inputs import StepBatch, plan_packed

__all__ = ["ModelRunner", "StepBatch"]

ATTENTION_BACKENDS = ("auto", "torch", "triton")


class ModelRunner:
    """Owns the KV cache and the ``StepBuffers`` (``step``) of up to ``max_num_seqs``
    sequences of up to ``max_model_len`` tokens (default: the model's
    ``max_position_embeddings``), wraps the model's target linears with ``LoraLinear``
    reading the adapter slots of ``pool`` (``None``: base model only) and selects the paged
    attention. Modifies ``model`` in place.

    ``attention``: ``auto`` (the Triton kernel on CUDA when triton imports, else torch),
    ``torch``, or ``triton`` (also on CPU tensors under ``TRITON_INTERPRET=1``)."""

    def __init__(self, model: nn.Module, spec: BaseModelSpec,
                 pool: SlotPool | None, num_kv_blocks: int,
                 block_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, attention: str = "auto",
                 enforce_eager: bool = False, max_num_seqs: int = 256,
                 max_model_len: int | None = None) -> None:
        model_dtype = next(model.parameters()).dtype
        if model_dtype != dtype:
            raise ValueError(f"the model is {model_dtype} but the KV cache would be {dtype}")
        self.model, self.spec = model.eval(), spec
        self.device = torch.device(device)
        self.pool = pool
        cfg = model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_kv_blocks, block_size,
                                self.num_kv_heads, self.head_dim, self.device, dtype)
        self.block_size, self.vocab_size = block_size, cfg.vocab_size
        self.kernel = attention_kernel(attention, self.device)
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.step = StepBuffers(max_num_seqs, -(-self.max_model_len // block_size),
                                self.kv_cache, self.kernel)
        self.lora_layers: list[LoraLinear] = []
        if self.pool is not None:
            self.lora_layers = wrap_model(model, spec, self.pool, self.step)
        model.set_attn_implementation(register_attention())
        self.enforce_eager = enforce_eager
        self.decode: DecodeStep | None = None  # made by warm_up, for the final cache

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def resize_kv_cache(self, num_blocks: int) -> None:
        """Replace the cache by one of ``num_blocks`` blocks (its contents are dropped):
        the engine sizes the cache after a profiling step on a small one."""
        c = self.kv_cache
        shape = c.k.shape
        # free the old ones first (the step and the graphs hold the cache)
        self.kv_cache = self.decode = self.step.cache = None
        self.kv_cache = KVCache(shape[0], num_blocks, c.block_size, shape[3], shape[4],
                                self.device, c.k.dtype)
        self.step.set_cache(self.kv_cache)

    def warm_up(self, max_num_seqs: int, max_num_batched_tokens: int,
                max_model_len: int, capture: bool = True) -> int:
        """Run one step of each shape the engine will run: the largest prefill and decode
        batches of 1, 2, 4, ... up to ``max_num_seqs`` sequences, each on adapter slots
        with every wrapped linear's low-rank path on, so that kernels compile and the slot
        pool is touched before the first request. Writes only into the KV cache (blocks
        that no sequence holds yet). Then, unless ``enforce_eager``, set up the decode path
        (``DecodeStep``) and, with ``capture`` on CUDA, capture its graphs. Returns the
        number of steps and graphs."""
        if max_num_seqs > self.step.max_rows or max_model_len > self.max_model_len:
            raise ValueError(f"warm-up for {max_num_seqs} sequences of {max_model_len} tokens "
                             f"exceeds the runner's {self.step.max_rows} of "
                             f"{self.max_model_len}")
        num_slots = self.pool.num_slots if self.pool is not None else 0
        batches = warm_up_batches(max_num_seqs, max_num_batched_tokens, max_model_len,
                                  self.num_kv_blocks, self.block_size, num_slots)
        for batch in batches:
            self.execute(batch, all_modules=True)
        if self.enforce_eager:
            return len(batches)
        self.decode = DecodeStep(self.model, self.step, max_num_seqs, graphs=capture,
                                 pool=self.pool)
        return len(batches) + self.decode.capture()

    def execute(self, batch: StepBatch, *, all_modules: bool = False) -> torch.Tensor:
        """Run one step; returns float32 logits ``[num_rows, vocab]``, in ``batch`` order one
        row per sequence with ``sample`` set, or one per new token with ``all_logits``.
        Writes the new tokens' keys and values into the cache. Raises ``ValueError`` on an
        inconsistent batch. ``all_modules``: run every wrapped linear's low-rank op, also
        for slots that adapt none of it (warm-up)."""
        batch.validate()
        if batch.num_seqs == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        self._check_adapter_slots(batch.adapter_slot)
        if self.decode is not None and not all_modules and not any(batch.all_logits) and \
                self.decode.takes(batch):
            self._check_decode_tables(batch)
            return self.decode.run(batch)
        step = self.step
        try:
            self._fill_packed(batch, all_modules)
            # no_grad, not inference_mode: the logits are ordinary tensors that callers may
            # modify in place, without a copy of [num_sampled, vocab].
            with torch.no_grad():
                out = self.model(input_ids=step.input_ids.view(1, -1),
                                 position_ids=step.positions.view(1, -1), use_cache=False,
                                 logits_to_keep=step.logits_rows, attn_metadata=step)
        finally:
            step.clear()
        return out.logits[0].to(torch.float32)  # [num_rows, vocab]

    def _fill_packed(self, batch: StepBatch, all_modules: bool) -> None:
        step = self.step
        with step.placing():
            plan = plan_packed(batch, step.tables, self.block_size, self.num_kv_blocks,
                               with_lora=self.pool is not None)
            modules = frozenset(self.spec.module_shapes) if all_modules else \
                self.pool.modules_of(set(plan.slots)) if plan.lora is not None else frozenset()
            step.fill_packed(plan, modules)
        if step.lora is not None:
            step.lora_backend = step_backend(step.lora, self.device)
        if self.kernel is None:
            step.attn_units = torch_units(step)

    def _check_decode_tables(self, batch: StepBatch) -> None:
        """``ValueError`` unless every block table covers its position with real blocks
        (what ``plan_attention`` checks on the packed path)."""
        bs, limit = self.block_size, self.num_kv_blocks
        for pos, table in zip(batch.start_pos, batch.block_table):
            used = table[:pos // bs + 1]
            if len(used) * bs <= pos or min(used) < 0 or max(used) >= limit:
                raise ValueError(f"block table {used} cannot hold position {pos} in "
                                 f"blocks [0, {limit})")

    def _check_adapter_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        lo, hi = min(slots), max(slots)
        limit = self.pool.num_slots if self.pool is not None else 0
        if lo < -1 or hi >= limit:
            raise ValueError(
                f"adapter slots must be -1 (base) or in [0, {limit}), got {lo}..{hi}"
                + ("" if self.pool is not None else "; this runner serves the base model only"))


def warm_up_batches(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                    num_blocks: int, block_size: int, num_slots: int) -> list[StepBatch]:
    """The steps of ``ModelRunner.warm_up``: the largest prefill (``max_num_batched_tokens``
    tokens in chunks of at most ``max_model_len - 1``, keeping every token's logits, as a
    step of prompt-logprobs chunks does: so the CUDA memory profile's peak includes them),
    then decode batches of 1, 2, 4, ... ``max_num_seqs`` sequences at position 0.
    Sequence ``i`` uses adapter slot ``i % num_slots`` (-1 without slots). Block ids wrap
    around a small cache (the values are never read back as anyone's context)."""
    next_block = iter(range(1 << 62))

    def table(positions: int) -> list[int]:
        return [next(next_block) % num_blocks for _ in range(-(-positions // block_size))]

    def slot(i: int) -> int:
        return i % num_slots if num_slots else -1

    prefill, left = StepBatch(), max_num_batched_tokens
    while left > 0 and prefill.num_seqs < max_num_seqs:
        n = min(left, max(1, max_model_len - 1))
        prefill.add([0] * n, 0, table(n), slot(prefill.num_seqs), all_logits=True)
        left -= n
    batches = [prefill]
    sizes = sorted({*(1 << k for k in range(max_num_seqs.bit_length())), max_num_seqs})
    for size in (s for s in sizes if s <= max_num_seqs):
        batches.append(StepBatch.from_seqs([([0], 0, table(1), slot(i), True)
                                            for i in range(size)]))
    return batches


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
