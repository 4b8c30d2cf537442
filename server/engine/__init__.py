"""Continuous-batching engine: many adapters share every forward pass of one base model.

Pure-Python bookkeeping (``sequence``, ``block_manager``, ``scheduler``) is kept apart from
the tensor code (``model_loader``, ``attention``, ``lora_layers``, ``model_runner``,
``sampler``); ``engine`` ties them together.
"""
