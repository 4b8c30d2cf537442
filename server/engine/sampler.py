"""Next-token sampling for a whole batch: greedy, temperature, top-k and top-p at once.

Every filter works on ``[N, V]`` tensors with one parameter per row; the only Python loop
is over rows that carry their own seeded ``torch.Generator``, so that a request's tokens
depend on its seed and its logits alone, never on what else is in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sequence import SamplingParams

# Below this temperature a row is sampled greedily: ``logits / 1e-40`` overflows to inf
# (and then NaN in softmax), and any temperature this small is argmax in all but ties.
GREEDY_EPS = 1e-5


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request RNG: ``None`` without a seed (the default RNG is used), else a
    ``torch.Generator`` on ``device`` seeded with ``seed``. Create one per request and keep
    it for the request's lifetime. The engine keeps it on the CPU, so a seed draws the same
    tokens on every device; ``Sampler`` then copies that row's probabilities to it."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """``logits[i] / temperature[i]``; greedy rows (``temperature < GREEDY_EPS``) are left
    unscaled so that no row divides by zero. ``logits`` [N, V], ``temperature`` [N]."""
    safe = torch.where(temperature < GREEDY_EPS, torch.ones_like(temperature), temperature)
    return logits / safe.unsqueeze(1)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Filtered copy of ``logits`` [N, V]: dropped entries become ``-inf``.

    Row ``i`` keeps every token whose logit is >= its ``top_k[i]``-th largest (ties at the
    boundary are all kept; ``top_k == 0`` is off), then, of those, the smallest set of most
    probable tokens whose probability sums to >= ``top_p[i]`` (``top_p >= 1`` is off). The
    most probable token is always kept. Equal logits are ordered by token index (stable
    sort), so the result of a row does not depend on the other rows.
    """
    use_k = bool((top_k > 0).any())
    use_p = bool((top_p < 1).any())
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=1, descending=True, stable=True)  # [N, V]
    if use_k:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(1, vocab)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if use_p:
        probs = sorted_logits.softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs  # mass of the more probable tokens
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Picks one token per row of a ``[N, V]`` logits batch.

    Rows with ``temperature == 0`` take ``argmax`` (ties go to the lowest index, as in
    transformers' greedy search). Other rows are divided by their temperature, filtered by
    top-k then top-p (:func:`apply_top_k_top_p`) and sampled from the softmax: rows with a
    generator one at a time with that generator, the rest together with the default RNG.
    """

    def sample(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        """One token id per row. ``generators[i]`` is row ``i``'s request RNG (see
        :func:`make_generator`) or ``None``."""
        _check_batch(logits, params, generators)
        logits = logits.float()
        greedy_ids = logits.argmax(dim=1)  # [N]
        temperature = _row_tensor([p.temperature for p in params], torch.float32, logits)
        greedy = temperature < GREEDY_EPS  # [N]
        if bool(greedy.all()):
            return greedy_ids.tolist()
        probs = self.probabilities(logits, params, temperature)
        sampled = _draw(probs, generators, [not g for g in greedy.tolist()])
        return torch.where(greedy, greedy_ids, sampled).tolist()

    def probabilities(
        self, logits: Tensor, params: list[SamplingParams], temperature: Tensor | None = None
    ) -> Tensor:
        """The distribution ``[N, V]`` that non-greedy rows are sampled from: softmax of the
        temperature-scaled, top-k/top-p filtered logits (filtered tokens have probability 0)."""
        if temperature is None:
            temperature = _row_tensor([p.temperature for p in params], torch.float32, logits)
        top_k = _row_tensor([p.top_k for p in params], torch.int64, logits)
        top_p = _row_tensor([p.top_p for p in params], torch.float32, logits)
        scaled = apply_temperature(logits.float(), temperature)
        return apply_top_k_top_p(scaled, top_k, top_p).softmax(dim=1)


def _draw(probs: Tensor, generators: list[torch.Generator | None], active: list[bool]) -> Tensor:
    """One sample per row of ``probs`` [N, V]; rows not ``active`` get 0 (they are greedy)."""
    out = torch.zeros(probs.shape[0], dtype=torch.int64, device=probs.device)
    unseeded = [i for i, (g, a) in enumerate(zip(generators, active)) if a and g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, (gen, act) in enumerate(zip(generators, active)):
        if act and gen is not None:
            pick = torch.multinomial(probs[i].to(gen.device), 1, generator=gen)
            out[i : i + 1] = pick.to(out.device)
    return out


def _row_tensor(values: list, dtype: torch.dtype, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)


def _check_batch(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, V] with V > 0, got shape {tuple(logits.shape)}")
    if not (len(params) == len(generators) == logits.shape[0]):
        raise ValueError(
            f"batch mismatch: {logits.shape[0]} logits rows, {len(params)} params, "
            f"{len(generators)} generators"
        )
