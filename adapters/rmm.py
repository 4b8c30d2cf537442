"""Reversible Model Merging (arXiv 2510.14163): n low-rank adapters become K shared basis
models plus K coefficients per task and (layer, module), in closed form and without data.

Per (layer, module), each task's scale is folded into its factors (``delta W = B' @ A'``),
the folded factors are flattened into the rows of ``X`` [n, D], and the top-K eigenvectors
``V`` [n, K] of the Gram matrix ``X @ X.T`` (float64) give the coefficients (row i is task
i) and the basis (``V.T @ X``). Task i is rebuilt as ``V[i] @ (V.T @ X)``: row i of the best
rank-K approximation of ``X`` in Frobenius norm, exact at ``K = n``.

This module holds the two file formats (see docs/adapter-format.md),
``nolaserve.rmm-basis`` and ``nolaserve.rmm-task``, and a task's materialization;
``rmm_build.py`` computes a basis and its tasks from source adapters.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import torch

from . import safetensors_io as st
from .errors import IncompatibleAdapterError, InvalidAdapterError
from .ids import check_adapter_id
from .spec import AdapterFactors, BaseModelSpec, ModuleBound, ModuleFactors, check_bounds

BASIS_FORMAT, TASK_FORMAT = "nolaserve.rmm-basis", "nolaserve.rmm-task"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
Key = tuple[int, str]  # (layer, module)


@dataclass
class RmmLayout:
    """What a basis and its tasks share: a dense grid of ``num_layers x target_modules``."""

    num_layers: int
    rank: int
    basis_size: int  # K
    target_modules: list[str]
    module_shapes: dict[str, tuple[int, int]]  # name -> (in, out)

    def layout(self) -> RmmLayout:
        """A copy of just the layout fields."""
        return RmmLayout(self.num_layers, self.rank, self.basis_size, list(self.target_modules),
                         dict(self.module_shapes))

    def grid(self) -> list[Key]:
        """Every ``(layer, module)`` of the layout, layer-major."""
        return [(i, name) for i in range(self.num_layers) for name in self.target_modules]

    def validate(self, spec: BaseModelSpec) -> None:
        spec.check_num_basis("basis_size", self.basis_size)
        spec.check_targets(self.num_layers, self.module_shapes, self.rank)

    def _metadata(self, fmt: str) -> dict[str, str]:
        return {
            "format": fmt, "format_version": "1", "num_layers": str(self.num_layers),
            "rank": str(self.rank), "basis_size": str(self.basis_size),
            "target_modules": json.dumps(self.target_modules),
            "module_shapes": json.dumps({k: list(v) for k, v in self.module_shapes.items()}),
        }

    @staticmethod
    def _read(meta: st.Metadata, fmt: str) -> dict:
        meta.check_format(fmt)
        targets = st.target_modules(meta)
        return dict(num_layers=meta.int("num_layers", 1, 1 << 16),
                    rank=meta.int("rank", 1, 1 << 16),
                    basis_size=meta.int("basis_size", 1, 1 << 20), target_modules=targets,
                    module_shapes=st.module_shapes(meta, targets))


@dataclass
class RmmBasis(RmmLayout):
    """K basis models: ``A[(i, name)]`` [K, r, in] and ``B[(i, name)]`` [K, out, r], float32.

    Treat as immutable: ``sha256`` is computed once, from the bytes the basis was read from,
    or from ``to_bytes()`` (deterministic) for a basis built in memory.
    """

    num_tasks: int
    A: dict[Key, torch.Tensor]
    B: dict[Key, torch.Tensor]
    _sha256: str = field(default="", init=False, repr=False, compare=False)

    kind = "rmm-basis"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.A.values()) + sum(t.nbytes for t in self.B.values())

    @property
    def sha256(self) -> str:
        """Hex sha256 of this basis's file bytes; tasks name it to refuse any other basis."""
        if not self._sha256:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    def to_bytes(self) -> bytes:
        tensors = {}
        for (i, name), a in self.A.items():
            tensors[f"layers.{i}.{name}.A"] = a
            tensors[f"layers.{i}.{name}.B"] = self.B[(i, name)]
        meta = {**self._metadata(BASIS_FORMAT), "num_tasks": str(self.num_tasks)}
        return st.write(tensors, meta)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "RMM basis", strict: bool = True) -> RmmBasis:
        metadata, tensors = st.read(data, what, strict)
        meta = st.Metadata(metadata, what, strict)
        lay = RmmLayout._read(meta, BASIS_FORMAT)
        k, r = lay["basis_size"], lay["rank"]
        basis = cls(**lay, num_tasks=meta.int("num_tasks", k, 1 << 20), A={}, B={})
        for key in basis.grid():
            n_in, n_out = basis.module_shapes[key[1]]
            p = f"layers.{key[0]}.{key[1]}"
            basis.A[key] = st.tensor(tensors, f"{p}.A", (k, r, n_in), what)
            basis.B[key] = st.tensor(tensors, f"{p}.B", (k, n_out, r), what)
        _no_extra(tensors, {f"layers.{i}.{m}.{x}" for i, m in basis.A for x in "AB"}, what)
        basis._sha256 = hashlib.sha256(data).hexdigest()
        return basis


@dataclass
class RmmTask(RmmLayout):
    """One task of a basis: ``coefficients`` [L, T, K] float32, and the basis it needs."""

    basis_sha256: str
    coefficients: torch.Tensor  # [L, T, K]
    basis_id: str = ""  # set by whoever registers the basis; "" until then

    kind = "rmm-task"

    @property
    def nbytes(self) -> int:
        return self.coefficients.nbytes

    def materialize(self, basis: RmmBasis, device: torch.device | str = "cpu") -> AdapterFactors:
        """Rebuild the task's factors from ``basis`` (scale 1.0): for each (i, t, name),
        ``A = torch.einsum("k,kri->ri", c[i, t], basis.A[i, name])`` [r, in] and
        ``B = torch.einsum("k,kor->or", c[i, t], basis.B[i, name])`` [out, r].

        A (layer, module) whose coefficients are all zero was absent from every source and
        is left out. Raises ``IncompatibleAdapterError`` unless ``basis`` is the one the task
        was built from (same layout and ``basis.sha256 == self.basis_sha256``).
        """
        self._check_basis(basis)
        c = self.coefficients.to(device)  # [L, T, K]
        present = c.ne(0).any(-1).tolist()  # [L][T]
        out = {}
        for i in range(self.num_layers):
            for t, name in enumerate(self.target_modules):
                if present[i][t]:
                    a = torch.einsum("k,kri->ri", c[i, t], basis.A[(i, name)].to(device))
                    b = torch.einsum("k,kor->or", c[i, t], basis.B[(i, name)].to(device))
                    out[(i, name)] = ModuleFactors(A=a, B=b, scale=1.0)
        return AdapterFactors(out)

    def check_bounds(self, basis: RmmBasis) -> None:
        """``InvalidAdapterError`` unless every module rebuilt from ``basis`` is bounded
        (``spec.check_bounds``): ``|A| <= sum_k |c_k| * max|basis.A[k]|``, same for B."""
        self._check_basis(basis)
        c = self.coefficients.double().abs()  # [L, T, K]
        bounds = []
        for i in range(self.num_layers):
            for t, name in enumerate(self.target_modules):
                a_max = basis.A[(i, name)].double().abs().flatten(1).amax(1)  # [K]
                b_max = basis.B[(i, name)].double().abs().flatten(1).amax(1)  # [K]
                bounds.append(ModuleBound(i, name, self.rank, float(c[i, t] @ a_max),
                                          float(c[i, t] @ b_max), 1.0))
        check_bounds(bounds, "RMM task")

    def _check_basis(self, basis: RmmBasis) -> None:
        pairs = {"num_layers": (self.num_layers, basis.num_layers),
                 "rank": (self.rank, basis.rank), "basis_size": (self.basis_size, basis.basis_size),
                 "target_modules": (self.target_modules, basis.target_modules),
                 "module_shapes": (self.module_shapes, basis.module_shapes)}
        for what, (mine, theirs) in pairs.items():
            if mine != theirs:
                raise IncompatibleAdapterError(
                    f"RMM task has {what} = {mine} but the basis has {theirs}; "
                    "give the task the basis it was built from")
        if basis.sha256 != self.basis_sha256:
            raise IncompatibleAdapterError(
                f"RMM task was built from basis sha256 {self.basis_sha256} but this basis has "
                f"sha256 {basis.sha256}; give the task the basis it was built from"
            )

    def to_bytes(self) -> bytes:
        meta = {**self._metadata(TASK_FORMAT), "basis_id": self.basis_id,
                "basis_sha256": self.basis_sha256}
        return st.write({"coefficients": self.coefficients}, meta)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "RMM task", strict: bool = True) -> RmmTask:
        metadata, tensors = st.read(data, what, strict)
        meta = st.Metadata(metadata, what, strict)
        lay = RmmLayout._read(meta, TASK_FORMAT)
        sha, basis_id = meta.str("basis_sha256"), meta.str("basis_id")
        if not _SHA256.fullmatch(sha):
            raise InvalidAdapterError(f"{what}: basis_sha256 must be 64 lowercase hex digits")
        if basis_id:
            check_adapter_id(basis_id)
        dims = (lay["num_layers"], len(lay["target_modules"]), lay["basis_size"])
        coefficients = st.tensor(tensors, "coefficients", dims, what)
        _no_extra(tensors, {"coefficients"}, what)
        return cls(**lay, basis_sha256=sha, coefficients=coefficients, basis_id=basis_id)


def _no_extra(tensors: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    extra = sorted(set(tensors) - expected)
    if extra:
        raise InvalidAdapterError(f"{what}: unexpected tensors {extra[:5]}"
                                  + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
