"""Adapter core: formats, materialization, registry, caches and the batched low-rank op."""
