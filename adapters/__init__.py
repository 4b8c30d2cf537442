"""Adapter core: formats, materialization, registry, caches and the batched low-rank op.

- ``nola``, ``lora``, ``rmm``: the adapter formats (docs/adapter-format.md);
  ``peft_import``: PEFT LoRA directories; ``philox``: portable basis regeneration.
- ``registry`` (SQLite), ``cache`` (host LRU), ``slot_table`` + ``slots`` (device pool),
  tied together by ``store.AdapterStore``.
- ``ops.add_lora``: the batched low-rank op every adapted linear calls.
"""
