"""Batched low-rank ops.

``add_lora(y, x, A, B, scale, token_slot)`` adds, for every token ``i`` with
``token_slot[i] >= 0``, ``(x[i] @ A[s].T) @ B[s].T * scale[s]`` (``s = token_slot[i]``)
to ``y[i]`` in place; ``-1`` adds nothing. See ``add_lora`` for shapes and
``LoraBatch`` for the per-step batch description that every layer's call shares.
"""

from .batch import LoraBatch
from .dispatch import BACKENDS, Backend, add_lora, choose_backend
from .torch_lora import gather_bmm, reference, segment

__all__ = [
    "BACKENDS",
    "Backend",
    "LoraBatch",
    "add_lora",
    "choose_backend",
    "gather_bmm",
    "reference",
    "segment",
]
