"""Benchmarks that import the engine, the adapter store or the kernels directly, run as
``python -m nolaserve.benchmarks.<name>``: ``adapters`` (materialization, registration),
``engine`` (tok/s over 1 .. 1,000 adapters), ``gpu`` (Triton kernels, regeneration),
``micro`` (ops, memory, gRPC registration), ``isolation`` (token gaps while the registry
is busy), ``batch_invariance`` (solo vs batched greedy outputs) and ``compare``
(against HF PEFT and vLLM, whose side runs in ``vllm_worker``). They sit above every
other package; the gRPC load generator ``nolaserve bench`` speaks only the API and
stays in ``nolaserve.clients``."""
