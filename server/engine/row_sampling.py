"""The engine's sampling of a step: one token per sequence, or the failure of that row
alone, read back from the device in one copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nolaserve.adapters.errors import Status, short

from .sampler import Sampler
from .sequence import Sequence


@dataclass(frozen=True)
class RowFailure:
    """Why one row of a step got no token; the engine fails that request with it."""

    message: str
    code: Status


class RowSampler(Sampler):
    """``Sampler`` plus the rules of a step: a row with NaN/Inf logits fails alone, and if
    the batched draw raises, the rows are drawn one by one."""

    def sample_rows(self, logits: torch.Tensor, seqs: list[Sequence],
                    generators: list[torch.Generator | None]) -> list[int | RowFailure]:
        """A token or a ``RowFailure`` per row. The tokens and the finite check come back
        in one device-to-host copy, the step's only sync."""
        # One reduction instead of isfinite over [N, V]: a NaN or an infinity makes the
        # row's sum non-finite (so would |logits| ~1e34, as unusable as an infinity).
        finite = torch.isfinite(logits.sum(dim=1))
        try:
            ids = self.sample_ids(logits, [s.params for s in seqs], generators)
        except Exception:
            return [self._sample_one(logits[i:i + 1], s, g) if ok else non_finite(s)
                    for i, (s, g, ok) in enumerate(zip(seqs, generators, finite.tolist()))]
        tokens, ok = torch.stack([ids, finite.long()]).tolist()
        return [t if good else non_finite(s) for t, good, s in zip(tokens, ok, seqs)]

    def _sample_one(self, row: torch.Tensor, seq: Sequence,
                    generator: torch.Generator | None) -> int | RowFailure:
        try:
            return self.sample(row, [seq.params], [generator])[0]
        except Exception as e:
            return RowFailure(f"internal error sampling this request: {e!r:.200}",
                              Status.INTERNAL)


def non_finite(seq: Sequence) -> RowFailure:
    """The failure of a row whose logits hold NaN or Inf: the adapter's fault (named) or,
    for the base model, an internal error."""
    token = len(seq.output_token_ids)
    if seq.adapter_id is None:
        return RowFailure(f"internal error: the base model produced NaN or Inf logits at "
                          f"output token {token}", Status.INTERNAL)
    return RowFailure(f"adapter {short(seq.adapter_id)} produced NaN or Inf logits at output "
                      f"token {token}: its weights are numerically unusable with this model; "
                      "re-register a bounded version", Status.FAILED_PRECONDITION)
