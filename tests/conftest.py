"""Shared test helpers: a tiny random Llama built in the test, and weight merging."""

from __future__ import annotations

import copy

import pytest
import torch

from nolaserve.adapters.spec import AdapterFactors, BaseModelSpec

TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    tie_word_embeddings=False,
)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.eval().float()


def spec_of(model, max_rank: int = 64) -> BaseModelSpec:
    """The BaseModelSpec of a transformers Llama-style model (all seven linears)."""
    layer = model.model.layers[0]
    shapes = {}
    for name in LINEARS:
        lin = layer.get_submodule(name)
        shapes[name] = (lin.in_features, lin.out_features)
    return BaseModelSpec(num_layers=len(model.model.layers), module_shapes=shapes,
                         max_rank=max_rank)


def merged(model, factors: AdapterFactors):
    """A copy of ``model`` with ``W += scale * B @ A`` applied for every factor."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (i, name), f in factors.modules.items():
            lin = out.model.layers[i].get_submodule(name)
            lin.weight += f.delta().to(lin.weight.dtype)
    return out


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()
