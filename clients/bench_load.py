"""Workloads and statistics of ``nolaserve bench`` (pure Python and numpy; no torch).

Two ways to pick each request's adapter out of ``n``:

- S-LoRA's synthetic trace (``S-LoRA/benchmarks/trace.py``, ``generate_requests``): the
  adapter index is ``int(n * X)`` with ``X ~ numpy power(alpha)``, the density
  ``alpha * x**(alpha - 1)`` on ``[0, 1]`` (``X = U**(1/alpha)``). ``alpha = 1`` is uniform;
  the smaller ``alpha``, the more requests go to the low indices (adapter 0 is the hottest).
- Punica's batch spreads (``punica/tests/test_sgmv.py``, ``get_lora_lens``): requests come
  in groups of ``batch`` that arrive together, and a group is split into segments of one
  adapter each: ``distinct`` (one request per adapter), ``uniform`` (ceil(sqrt(batch))
  near-equal segments), ``skewed`` (segments of 1 and batch - 1), ``identical`` (one).

Inter-arrival times are Gamma with mean ``1/rate`` and coefficient of variation ``cv``
(shape ``1/cv**2``, scale ``1/(rate*shape)``; ``cv = 1`` is Poisson, ``cv = 0`` a fixed
interval). Input and output lengths are uniform integers in ``[lo, hi]``, both ends included
(S-LoRA's ``randint`` leaves ``hi`` out).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

SPREADS = ("distinct", "uniform", "skewed", "identical")


@dataclass
class Workload:
    """One run's trace parameters; ``spread=None`` is the S-LoRA power-law trace."""

    num_adapters: int
    rate: float  # requests per second
    num_requests: int
    alpha: float = 1.0
    cv: float = 1.0
    input_range: tuple[int, int] = (8, 64)
    output_range: tuple[int, int] = (8, 64)
    spread: str | None = None
    batch: int = 8  # group size of a spread
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_adapters < 1 or self.num_requests < 1 or self.batch < 1:
            raise ValueError("num_adapters, num_requests and batch must be >= 1")
        if not (self.rate > 0 and self.alpha > 0 and self.cv >= 0):
            raise ValueError(f"need rate > 0, alpha > 0, cv >= 0; got rate={self.rate}, "
                             f"alpha={self.alpha}, cv={self.cv}")
        for name, (lo, hi) in (("input", self.input_range), ("output", self.output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} length range wants 1 <= lo <= hi, got {lo}, {hi}")
        if self.spread is not None and self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {self.spread!r}")


@dataclass
class TraceRequest:
    index: int
    arrival: float  # seconds after the start of the run
    adapter: int  # index into the run's adapter ids
    input_len: int
    output_len: int


def gamma_intervals(rng: np.random.Generator, rate: float, cv: float, size: int
                    ) -> np.ndarray:
    """Inter-arrival times with mean ``1/rate`` and coefficient of variation ``cv``."""
    if cv == 0:
        return np.full(size, 1.0 / rate)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size)


def power_adapters(rng: np.random.Generator, num_adapters: int, alpha: float, size: int
                   ) -> np.ndarray:
    """S-LoRA's adapter indices ``int(n * X)``, ``X ~ power(alpha)``, in ``[0, n)``."""
    ind = (rng.power(alpha, size) * num_adapters).astype(int)
    return np.minimum(ind, num_adapters - 1)  # X == 1.0 has probability 0, but is possible


def spread_lens(batch: int, spread: str) -> list[int]:
    """Punica's segment lengths: how many requests of a group of ``batch`` share each
    adapter (``sum(lens) == batch``)."""
    if spread == "identical":
        return [batch]
    if spread == "distinct":
        return [1] * batch
    if spread == "uniform":
        n = math.ceil(math.sqrt(batch))
        return [batch // n + (1 if i < batch % n else 0) for i in range(n)]
    if spread == "skewed":
        return [batch] if batch < 3 else [1, batch - 1]
    raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")


def spread_adapters(num_adapters: int, batch: int, spread: str, size: int) -> list[int]:
    """Adapter indices of ``size`` requests in groups of ``batch``; a group's segments get
    consecutive adapters (mod n), the next group starts where the last one stopped, so a
    group holds ``min(len(segments), n)`` distinct adapters."""
    out: list[int] = []
    nxt = 0
    while len(out) < size:
        for length in spread_lens(batch, spread):
            out += [nxt % num_adapters] * length
            nxt += 1
    return out[:size]


def make_trace(w: Workload) -> list[TraceRequest]:
    """The requests of one run, ordered by arrival time."""
    rng = np.random.default_rng(w.seed)
    if w.spread is None:
        adapters = power_adapters(rng, w.num_adapters, w.alpha, w.num_requests).tolist()
        arrivals = np.cumsum(gamma_intervals(rng, w.rate, w.cv, w.num_requests))
    else:
        adapters = spread_adapters(w.num_adapters, w.batch, w.spread, w.num_requests)
        num_groups = -(-w.num_requests // w.batch)
        group_times = np.cumsum(gamma_intervals(rng, w.rate / w.batch, w.cv, num_groups))
        arrivals = np.repeat(group_times, w.batch)[:w.num_requests]
    inputs = rng.integers(w.input_range[0], w.input_range[1], w.num_requests, endpoint=True)
    outputs = rng.integers(w.output_range[0], w.output_range[1], w.num_requests,
                           endpoint=True)
    return [TraceRequest(i, float(arrivals[i]), int(adapters[i]), int(inputs[i]),
                         int(outputs[i])) for i in range(w.num_requests)]


def dummy_prompt(num_tokens: int) -> str:
    """About ``num_tokens`` tokens of text (S-LoRA's ``"Hello " * n``)."""
    return "Hello " * num_tokens


@dataclass
class RequestResult:
    """One request's timings (``time.perf_counter()`` seconds) and outcome; ``error`` is
    the status code name of a failed request."""

    sent: float
    token_times: list[float]  # arrival of each chunk that carried tokens, one per token
    done: float
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """``(last - first) / (n - 1)``; None below two tokens."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{p}": percentile(values, p) for p in (50, 90, 99)} | {
        "mean": sum(values) / len(values) if values else None}


def summarize(results: list[RequestResult], slo_ttft: float, slo_tpot: float,
              start: float | None = None) -> dict[str, object]:
    """Throughput over the run's span (``start``, the trace's time zero, or else the first
    send, to the last completion), TTFT/TPOT
    quantiles of the successful requests (seconds), SLO attainment over all requests (a
    failed one misses; one with a single token meets the TPOT part), errors by code."""
    ok = [r for r in results if r.error is None]
    first = min(r.sent for r in results) if start is None and results else start
    span = max(r.done for r in results) - first if results else 0.0
    tokens = sum(len(r.token_times) for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    met = sum(1 for r in ok if r.ttft is not None and r.ttft <= slo_ttft
              and (r.tpot is None or r.tpot <= slo_tpot))
    per_s = (lambda x: x / span) if span > 0 else (lambda x: 0.0)
    return {
        "requests": len(results), "ok": len(ok), "duration_s": span,
        "output_tokens": tokens, "req_per_s": per_s(len(ok)), "tok_per_s": per_s(tokens),
        "ttft_s": _quantiles(ttfts), "tpot_s": _quantiles(tpots),
        "slo_attainment": met / len(results) if results else 0.0,
        "errors": dict(Counter(r.error for r in results if r.error is not None)),
    }
