"""The tensor side of one engine step: pack the scheduled sequences into one unpadded row,
run the (wrapped, otherwise unchanged) transformers model over it, return sampled logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nolaserve.adapters.ops import LoraBatch
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec

from .attention import AttentionMetadata, KVCache, register_attention
from .lora_layers import LoraLinear, wrap_model


@dataclass
class StepBatch:
    """One step's scheduled sequences as plain lists, entry ``i`` describing sequence ``i``.

    ``token_ids[i]``: the new tokens to compute (prompt chunk or last sampled token);
    ``start_pos[i]``: tokens already in the KV cache before this step;
    ``block_table[i]``: KV block ids covering positions ``[0, start_pos + len(token_ids))``;
    ``adapter_slot[i]``: slot-pool slot, ``-1`` for the base model;
    ``sample[i]``: produce logits at the sequence's last new token.
    """

    token_ids: list[list[int]] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    block_table: list[list[int]] = field(default_factory=list)
    adapter_slot: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)

    @classmethod
    def from_seqs(cls, seqs: list[tuple[list[int], int, list[int], int, bool]]) -> StepBatch:
        """From ``(token_ids, start_pos, block_table, adapter_slot, sample)`` tuples."""
        batch = cls()
        for seq in seqs:
            batch.add(*seq)
        return batch

    def add(self, token_ids: list[int], start_pos: int, block_table: list[int],
            adapter_slot: int = -1, sample: bool = True) -> None:
        """Append one sequence."""
        self.token_ids.append(token_ids)
        self.start_pos.append(start_pos)
        self.block_table.append(block_table)
        self.adapter_slot.append(adapter_slot)
        self.sample.append(sample)

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def validate(self) -> None:
        """Raise ``ValueError`` on ragged fields, empty token lists or negative positions."""
        n = self.num_seqs
        lengths = {len(self.start_pos), len(self.block_table), len(self.adapter_slot),
                   len(self.sample)}
        if lengths != {n}:
            raise ValueError(f"StepBatch fields have different lengths: {lengths | {n}}")
        if any(not t for t in self.token_ids) or any(s < 0 for s in self.start_pos):
            raise ValueError("every sequence needs >= 1 new token and start_pos >= 0")


@dataclass(eq=False)
class StepContext:
    """The current step's per-layer inputs, owned by the runner and refilled every step.

    The ``LoraLinear`` wrappers hold this object and read ``lora_batch``; ``attn`` reaches
    the attention function as the ``attn_metadata`` keyword of the model forward. Both are
    ``None`` between steps.
    """

    lora_batch: LoraBatch | None = None
    active_modules: frozenset[str] = frozenset()  # modules some slot of the step adapts
    attn: AttentionMetadata | None = None


class ModelRunner:
    """Owns the KV cache and the step context, wraps the model's target linears with
    ``LoraLinear`` reading the adapter slots of ``pool`` (``None``: base model only) and
    selects the paged attention. Modifies ``model`` in place."""

    def __init__(self, model: nn.Module, spec: BaseModelSpec,
                 pool: SlotPool | None, num_kv_blocks: int,
                 block_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
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
        # Packed order: decode sequences (1 new token) first, then prefill chunks, each
        # group by adapter slot, so decode rows are one slice and LoRA segments are contiguous.
        q_lens = [len(t) for t in batch.token_ids]
        order = sorted(range(batch.num_seqs), key=lambda i: (q_lens[i] > 1, batch.adapter_slot[i]))
        ids: list[int] = []
        positions: list[int] = []
        adapter_slot: list[int] = []  # per token; KV slots are the attention metadata's
        last_row = [0] * batch.num_seqs
        for i in order:
            s, q = batch.start_pos[i], q_lens[i]
            ids += batch.token_ids[i]
            positions += range(s, s + q)
            adapter_slot += [batch.adapter_slot[i]] * q
            last_row[i] = len(ids) - 1
        keep = [last_row[i] for i in range(batch.num_seqs) if batch.sample[i]]
        dev = self.device
        ctx = self.ctx
        try:
            ctx.attn = AttentionMetadata.build(
                self.kv_cache, [q_lens[i] for i in order], [batch.start_pos[i] for i in order],
                [batch.block_table[i] for i in order], dev)
            if self.pool is not None and max(adapter_slot, default=-1) >= 0:
                ctx.lora_batch = LoraBatch.from_token_slot(torch.tensor(adapter_slot, device=dev))
                ctx.active_modules = self.pool.modules_of(set(adapter_slot) - {-1})
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([ids], device=dev),  # [1, T]
                    position_ids=torch.tensor([positions], device=dev),  # [1, T]
                    use_cache=False,
                    logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
                    attn_metadata=ctx.attn,
                )
        finally:
            ctx.attn = ctx.lora_batch = None
            ctx.active_modules = frozenset()
        # A copy made outside inference mode: callers may modify it in place.
        return out.logits[0].to(torch.float32, copy=True)  # [num_sampled, vocab]

    def _check_adapter_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        lo, hi = min(slots), max(slots)
        limit = self.pool.num_slots if self.pool is not None else 0
        if lo < -1 or hi >= limit:
            raise ValueError(
                f"adapter slots must be -1 (base) or in [0, {limit}), got {lo}..{hi}"
                + ("" if self.pool is not None else "; this runner serves the base model only"))
