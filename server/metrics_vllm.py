"""The request-level series under vLLM's names, types, buckets and labels (vLLM 0.32's
``PrometheusStatLogger``: ``model_name`` is the served base model, ``engine`` is "0"), so
vLLM's Grafana dashboard and tools that read vLLM's series work on a nolaserve replica.
Observed by ``RequestTimer`` beside the ``nolaserve_`` ones; with the vLLM backend, vLLM's
own series of these names are dropped (``NAMES`` joins ``metrics.VLLM_NAMES``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from .engine.engine_types import FinishReason

# vllm/v1/metrics/buckets.py (0.32)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LABELS = ["model_name", "engine"]
# vLLM's FinishReason strings ("stop" covers EOS and stop strings, "abort" a cancel)
FINISHED_REASON = {FinishReason.STOP: "stop", FinishReason.EOS: "stop",
                   FinishReason.LENGTH: "length", FinishReason.CANCELLED: "abort",
                   FinishReason.ERROR: "error"}
NAMES = {"vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
         "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
         "vllm:time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds",
         "vllm:e2e_request_latency_seconds", "vllm:request_prompt_tokens",
         "vllm:request_generation_tokens"}


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's ``request_tokens`` buckets: 1, 2, 5, 10, 20, 50, ... up to ``max_model_len``."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return [float(b) for b in out]
            out.append(m * scale)
        scale *= 10


class RequestSeries:
    """One server's vLLM-named request series, labelled with its base model's name."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int
                 ) -> None:
        labels, r = (model_name, "0"), registry

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r).labels(*labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=r)
        self.success = {reason: success.labels(*labels, reason)
                        for reason in dict.fromkeys(FINISHED_REASON.values())}
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        # the name vLLM's Grafana dashboard queries (vLLM <= 0.10's name for the same gaps)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.",
                                      ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt = histogram("vllm:request_prompt_tokens",
                                        "Number of prefill tokens processed.", tokens)
        self.request_generation = histogram("vllm:request_generation_tokens",
                                            "Number of generation tokens processed.", tokens)

    def token_gap(self, seconds: float, tokens: int) -> None:
        """``tokens`` new tokens came ``seconds`` after the previous ones: each counts as
        one gap of ``seconds / tokens`` (an output may carry several tokens)."""
        gap = seconds / tokens
        for _ in range(tokens):
            self.itl.observe(gap)
            self.tpot.observe(gap)

    def finished(self, reason: FinishReason | None, prompt_tokens: int,
                 completion_tokens: int, e2e: float, decode: float | None) -> None:
        """A request ended (``decode``: first token to last, None without a token)."""
        self.success[FINISHED_REASON.get(reason, "stop")].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(e2e)
        self.request_prompt.observe(prompt_tokens)
        self.request_generation.observe(completion_tokens)
        if decode is not None and completion_tokens > 1:
            self.request_tpot.observe(decode / (completion_tokens - 1))
