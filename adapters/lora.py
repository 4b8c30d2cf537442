"""LoRA adapters: format v1 and the import of PEFT LoRA directories.

Each adapted (layer, module) holds the factors of ``delta W = scale * B @ A`` with ``A``
[r, in] and ``B`` [out, r] (PEFT orientation); ranks may differ per (layer, module) and a
missing pair means no delta (see docs/adapter-format.md for the normative spec).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from . import safetensors_io as st
from .errors import IncompatibleAdapterError, InvalidAdapterError, short
from .spec import AdapterFactors, BaseModelSpec, ModuleBound, ModuleFactors, check_bounds

FORMAT = "nolaserve.lora"
KIND = "lora"
MAX_LAYERS = 1 << 16
_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(.+)\.(lora_A|lora_B|scale)")


@dataclass
class LoraAdapter:
    """A LoRA adapter on CPU in float32: ``factors`` maps ``(layer, module)`` to
    ``delta W = scale * B @ A``; a (layer, module) without factors has no delta."""

    target_modules: list[str]
    module_shapes: dict[str, tuple[int, int]]  # name -> (in, out)
    num_layers: int
    factors: AdapterFactors
    base_model: str = ""
    description: str = ""

    kind = KIND

    @property
    def rank(self) -> int:
        """The largest rank of any (layer, module)."""
        return self.factors.rank

    @property
    def nbytes(self) -> int:
        """Bytes of the A and B factors."""
        return self.factors.nbytes

    def validate(self, spec: BaseModelSpec) -> None:
        """Raise ``IncompatibleAdapterError`` unless layers, shapes and rank fit ``spec``."""
        spec.check_targets(self.num_layers, self.module_shapes, self.rank)
        layers = sorted({i for i, _ in self.factors.modules if not 0 <= i < spec.num_layers})
        if layers:
            raise IncompatibleAdapterError(
                f"adapter adapts layers {layers} but the base model has {spec.num_layers}"
            )

    def check_bounds(self) -> None:
        """``InvalidAdapterError`` unless every module's factors and delta are bounded
        (``spec.check_bounds``): the maxima of |A| and |B| are read directly."""
        check_bounds([ModuleBound(i, name, f.rank, float(f.A.abs().max()),
                                  float(f.B.abs().max()), abs(f.scale))
                      for (i, name), f in sorted(self.factors.modules.items())], "LoRA adapter")

    def materialize(self, device: torch.device | str = "cpu") -> AdapterFactors:
        """Copies of the factors on ``device`` (the adapter itself stays on CPU)."""
        return AdapterFactors({
            key: ModuleFactors(A=f.A.to(device, copy=True), B=f.B.to(device, copy=True),
                               scale=f.scale)
            for key, f in self.factors.modules.items()
        })

    def to_bytes(self) -> bytes:
        """The adapter as a ``nolaserve.lora`` v1 safetensors file."""
        meta = {
            "format": FORMAT, "format_version": "1", "num_layers": str(self.num_layers),
            "target_modules": json.dumps(self.target_modules),
            "module_shapes": json.dumps({k: list(v) for k, v in self.module_shapes.items()}),
        }
        if self.base_model:
            meta["base_model"] = self.base_model
        if self.description:
            meta["description"] = self.description
        tensors = {}
        for (i, name), f in sorted(self.factors.modules.items()):
            prefix = f"layers.{i}.{name}."
            tensors[prefix + "lora_A"] = f.A.float()
            tensors[prefix + "lora_B"] = f.B.float()
            tensors[prefix + "scale"] = torch.tensor([f.scale], dtype=torch.float32)
        return st.write(tensors, meta)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "LoRA adapter",
                   strict: bool = True) -> LoraAdapter:
        """Parse a ``nolaserve.lora`` v1 file; any defect raises ``InvalidAdapterError``."""
        metadata, tensors = st.read(data, what, strict)
        meta = st.Metadata(metadata, what, strict)
        meta.check_format(FORMAT)
        targets = st.target_modules(meta)
        shapes = st.module_shapes(meta, targets)
        n_layers = meta.int("num_layers", 1, MAX_LAYERS)
        keys = set()
        for name in tensors:
            m = _NAME.fullmatch(name)
            if not m:
                raise InvalidAdapterError(f"{what}: unexpected tensor {short(name)}")
            i, module = int(m[1]), m[2]
            if i >= n_layers:
                raise InvalidAdapterError(
                    f"{what}: tensor {short(name)} has layer index {i} >= num_layers {n_layers}"
                )
            if module not in shapes:
                raise InvalidAdapterError(
                    f"{what}: tensor {short(name)} names module {short(module)}, not in "
                    f"target_modules"
                )
            keys.add((i, module))
        if not keys:
            raise InvalidAdapterError(f"{what}: holds no LoRA factors")
        modules = {key: _read_module(tensors, key, shapes[key[1]], what) for key in sorted(keys)}
        return cls(targets, shapes, n_layers, AdapterFactors(modules),
                   base_model=meta.text("base_model"), description=meta.text("description"))


def _read_module(tensors: dict[str, torch.Tensor], key: tuple[int, str],
                 shape: tuple[int, int], what: str) -> ModuleFactors:
    prefix = f"layers.{key[0]}.{key[1]}."
    a, b = tensors.get(prefix + "lora_A"), tensors.get(prefix + "lora_B")
    for part, t in (("lora_A", a), ("lora_B", b)):
        if t is None or t.dim() != 2:
            raise InvalidAdapterError(f"{what}: tensor {short(prefix + part)} is missing or not "
                                      f"2-D")
    r = check_rank(a.shape[0], b.shape[1], prefix, what)
    n_in, n_out = shape
    scale = st.tensor(tensors, prefix + "scale", (1,), what)
    return ModuleFactors(A=st.tensor(tensors, prefix + "lora_A", (r, n_in), what),
                         B=st.tensor(tensors, prefix + "lora_B", (n_out, r), what),
                         scale=float(scale[0]))


def check_rank(rank_a: int, rank_b: int, where: str, what: str) -> int:
    if rank_a != rank_b:
        raise InvalidAdapterError(
            f"{what}: {where}: rank mismatch, lora_A has rank {rank_a} but lora_B has {rank_b}"
        )
    if rank_a == 0:
        raise InvalidAdapterError(f"{what}: {where}: rank 0 (empty lora_A and lora_B)")
    return rank_a
