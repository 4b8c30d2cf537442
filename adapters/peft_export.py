"""Write any adapter's materialized factors as a PEFT LoRA directory
(``adapter_config.json`` + ``adapter_model.safetensors``), the form other engines load
(vLLM's ``LoRARequest(path)``), with the same ``delta W``:

    delta W = scale * B @ A  ==  (scale * B) @ A  with PEFT's  lora_alpha = r  (scaling 1)

Every module is padded with zero rows/columns to the adapter's largest rank, so one ``r``
holds for the whole file (a zero rank-1 component adds nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import safetensors_io as st
from .spec import AdapterFactors

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def peft_tensors(factors: AdapterFactors, layer_prefix: str = "model.layers",
                 dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT state-dict keys -> tensors, and the common rank ``r`` they are padded to."""
    rank = factors.rank
    tensors: dict[str, torch.Tensor] = {}
    for (layer, name), f in sorted(factors.modules.items()):
        a = torch.zeros(rank, f.A.shape[1], dtype=torch.float64)  # [r, in]
        b = torch.zeros(f.B.shape[0], rank, dtype=torch.float64)  # [out, r]
        a[:f.rank] = f.A.double()
        b[:, :f.rank] = f.scale * f.B.double()
        key = f"base_model.model.{layer_prefix}.{layer}.{name}"
        tensors[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
    return tensors, rank


def write_peft_dir(factors: AdapterFactors, directory: str | os.PathLike[str], *,
                   base_model: str = "", layer_prefix: str = "model.layers",
                   dtype: torch.dtype = torch.float32) -> int:
    """Write ``factors`` as a PEFT LoRA directory at ``directory`` (created); returns the
    bytes written. ``target_modules`` are the leaf names (``q_proj``), as PEFT saves them."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors, rank = peft_tensors(factors, layer_prefix, dtype)
    weights = st.write(tensors, {"format": "pt"})
    modules = sorted({name.rsplit(".", 1)[-1] for _, name in factors.modules})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": max(rank, 1),
              "lora_alpha": max(rank, 1), "lora_dropout": 0.0, "bias": "none",
              "target_modules": modules, "base_model_name_or_path": base_model,
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}
    text = json.dumps(config, indent=1).encode()
    (path / WEIGHTS_FILE).write_bytes(weights)
    (path / CONFIG_FILE).write_bytes(text)
    return len(weights) + len(text)
