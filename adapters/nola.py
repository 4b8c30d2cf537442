"""NOLA adapters (arXiv 2310.02556), format v1: a seed plus per-layer coefficients.

The random basis is never stored: it is regenerated from the seed with the portable Philox
scheme of ``philox.py`` and contracted with the coefficients while it streams by, so the
CPU path never holds a whole basis (see docs/adapter-format.md for the normative spec).
"""

from __future__ import annotations

import functools
import json
import math
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import cpu_threads, philox
from . import safetensors_io as st
from .errors import InvalidAdapterError
from .philox_layout import STREAM_BITS, STREAM_LIMIT_BITS
from .spec import (
    AdapterFactors,
    BaseModelSpec,
    DirectFactors,
    ModuleBound,
    ModuleFactors,
    SlotViews,
    check_bounds,
)

FORMAT = "nolaserve.nola"
KIND = "nola"
MAX_SEED = (1 << 63) - 1
MAX_REGEN_THREADS = 8  # CPU regeneration: streams contracted in parallel, one per thread


@dataclass
class NolaAdapter:
    seed: int
    rank: int
    lora_alpha: float
    target_modules: list[str]
    module_shapes: dict[str, tuple[int, int]]  # name -> (in, out)
    alpha: torch.Tensor  # [L, T, k] float32
    beta: torch.Tensor  # [L, T, l] float32
    base_model: str = ""
    description: str = ""

    kind = KIND

    @property
    def num_layers(self) -> int:
        return self.alpha.shape[0]

    @property
    def nbytes(self) -> int:
        return self.alpha.nbytes + self.beta.nbytes

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def stream(self, layer: int, target: int) -> int:
        """Stream of the A basis of (layer, target); the B basis is the next one."""
        return 2 * (layer * len(self.target_modules) + target)

    def validate(self, spec: BaseModelSpec) -> None:
        spec.check_num_basis("num_basis_a", self.alpha.shape[2])
        spec.check_num_basis("num_basis_b", self.beta.shape[2])
        spec.check_targets(self.num_layers, self.module_shapes, self.rank)

    def check_bounds(self) -> None:
        """``InvalidAdapterError`` unless every module is bounded (``spec.check_bounds``).
        Basis values lie in [-1, 1], so ``|A| <= sum|alpha[i, t]| / sqrt(k)`` and
        ``|B| <= sum|beta[i, t]| / sqrt(l)``."""
        a = self.alpha.double().abs().sum(-1) / math.sqrt(self.alpha.shape[2])  # [L, T]
        b = self.beta.double().abs().sum(-1) / math.sqrt(self.beta.shape[2])  # [L, T]
        a, b = a.tolist(), b.tolist()
        check_bounds([ModuleBound(i, name, self.rank, a[i][t], b[i][t], abs(self.scale))
                      for i in range(self.num_layers)
                      for t, name in enumerate(self.target_modules)], "NOLA adapter")

    def materialize(self, device: torch.device | str = "cpu",
                    executor: Executor | None = None) -> AdapterFactors:
        """Regenerate every (layer, module)'s ``A = alpha @ A_basis / sqrt(k)`` [r, in] and
        ``B = beta @ B_basis / sqrt(l)`` [out, r], streams in parallel on CPU: on
        ``executor``'s threads if given (the store's bounded ``materialize_threads``),
        else on a pool of one thread per core (at most ``MAX_REGEN_THREADS``)."""
        jobs = [(i, t, name) for i in range(self.num_layers)
                for t, name in enumerate(self.target_modules)]
        alpha, beta = self.alpha.to(device), self.beta.to(device)
        if alpha.device.type == "cuda" and (regen := _cuda_regenerate()) is not None:
            return self._regenerate_fused(regen, alpha, beta)

        def one(job: tuple[int, int, str]) -> ModuleFactors:
            i, t, name = job
            n_in, n_out = self.module_shapes[name]
            s = self.stream(i, t)
            a = philox.contract(self.seed, s, alpha[i, t], self.rank * n_in)
            b = philox.contract(self.seed, s + 1, beta[i, t], n_out * self.rank)
            return ModuleFactors(A=a.view(self.rank, n_in) / math.sqrt(alpha.shape[2]),
                                 B=b.view(n_out, self.rank) / math.sqrt(beta.shape[2]),
                                 scale=self.scale)

        if alpha.device.type != "cpu":
            results = list(map(one, jobs))
        elif executor is not None:
            results = list(executor.map(one, jobs))
        else:  # the C loop releases the GIL: streams regenerate in parallel
            workers = max(1, min(MAX_REGEN_THREADS, os.cpu_count() or 1, len(jobs)))
            with ThreadPoolExecutor(workers, thread_name_prefix="nola-regen",
                                    initializer=cpu_threads.serial) as pool:
                results = list(pool.map(one, jobs))
        return AdapterFactors({(i, name): f for (i, _, name), f in zip(jobs, results)})

    def _regenerate_fused(self, regen, alpha: torch.Tensor, beta: torch.Tensor
                          ) -> AdapterFactors:
        """Every module in one launch (``nola_triton.regenerate``), fp32 factors."""
        outs = {(i, name): (alpha.new_empty(self.rank, self.module_shapes[name][0]),
                            alpha.new_empty(self.module_shapes[name][1], self.rank))
                for i in range(self.num_layers) for name in self.target_modules}
        regen(self.seed, alpha, beta, list(outs.values()))
        return AdapterFactors({key: ModuleFactors(A=a, B=b, scale=self.scale)
                               for key, (a, b) in outs.items()})

    def direct(self) -> DirectFactors | None:
        """This adapter as ``DirectFactors``: ``nola_triton.regenerate`` writes every module
        into the slot's views in one launch, in the slot's dtype (no fp32 copy); None
        without triton."""
        if _cuda_regenerate() is None:
            return None
        ranks = {(i, name): self.rank for i in range(self.num_layers)
                 for name in self.target_modules}
        return DirectFactors(ranks, self.scale, self._write_views)

    def _write_views(self, views: SlotViews) -> None:
        device = next(iter(views.values()))[0].device
        outs = [views[(i, name)] for i in range(self.num_layers) for name in self.target_modules]
        _cuda_regenerate()(self.seed, self.alpha.to(device), self.beta.to(device), outs)

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT, "format_version": "1", "seed": str(self.seed),
            "rank": str(self.rank), "lora_alpha": repr(float(self.lora_alpha)),
            "num_basis_a": str(self.alpha.shape[2]), "num_basis_b": str(self.beta.shape[2]),
            "num_layers": str(self.num_layers), "target_modules": json.dumps(self.target_modules),
            "module_shapes": json.dumps({k: list(v) for k, v in self.module_shapes.items()}),
        }
        if self.base_model:
            meta["base_model"] = self.base_model
        if self.description:
            meta["description"] = self.description
        return st.write({"alpha": self.alpha, "beta": self.beta}, meta)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "NOLA adapter",
                   strict: bool = True) -> NolaAdapter:
        metadata, tensors = st.read(data, what, strict)
        meta = st.Metadata(metadata, what, strict)
        meta.check_format(FORMAT)
        targets = st.target_modules(meta)
        shapes = st.module_shapes(meta, targets)
        n_layers = meta.int("num_layers", 1, 1 << 16)
        k, l_ = meta.int("num_basis_a", 1, 1 << 20), meta.int("num_basis_b", 1, 1 << 20)
        dims = (n_layers, len(targets))
        adapter = cls(
            seed=meta.int("seed", 0, MAX_SEED), rank=meta.int("rank", 1, 1 << 16),
            lora_alpha=meta.float("lora_alpha"), target_modules=targets, module_shapes=shapes,
            alpha=st.tensor(tensors, "alpha", (*dims, k), what),
            beta=st.tensor(tensors, "beta", (*dims, l_), what),
            base_model=meta.text("base_model"), description=meta.text("description"),
        )
        _check_stream_space(adapter, what)
        if set(tensors) != {"alpha", "beta"}:
            extra = sorted(set(tensors) - {"alpha", "beta"})
            raise InvalidAdapterError(f"{what}: unexpected tensors {extra}")
        return adapter


@functools.cache
def _cuda_regenerate():
    """``nola_triton.regenerate`` (one launch per adapter), or None without triton;
    imported on first use so CPU-only processes never import triton."""
    try:
        from .nola_triton import regenerate
    except ImportError:
        return None
    return regenerate


def _check_stream_space(a: NolaAdapter, what: str) -> None:
    """Streams are < 2^24 and hold < 2^42 values each (the counter layout of the format)."""
    if 2 * a.num_layers * len(a.target_modules) > 1 << STREAM_LIMIT_BITS:
        raise InvalidAdapterError(f"{what}: num_layers * len(target_modules) is too large")
    k, l_ = a.alpha.shape[2], a.beta.shape[2]
    for n_in, n_out in a.module_shapes.values():
        if max(k * a.rank * n_in, l_ * n_out * a.rank) >= 1 << (STREAM_BITS + 2):
            raise InvalidAdapterError(f"{what}: a basis of this shape exceeds 2^42 values")


def random_nola(spec: BaseModelSpec, seed: int, *, targets: list[str] | None = None,
                rank: int = 8, num_basis: int = 256, lora_alpha: float = 16.0,
                coeff_std: float = 1.0) -> NolaAdapter:
    """A NOLA adapter with random coefficients drawn from ``seed`` (demos, tests, benchmarks)."""
    targets = targets or sorted(spec.module_shapes)
    gen = torch.Generator().manual_seed(seed)
    dims = (spec.num_layers, len(targets), num_basis)
    return NolaAdapter(
        seed=seed, rank=rank, lora_alpha=lora_alpha, target_modules=list(targets),
        module_shapes={t: spec.module_shapes[t] for t in targets},
        alpha=torch.randn(dims, generator=gen) * coeff_std,
        beta=torch.randn(dims, generator=gen) * coeff_std, base_model=spec.name,
    )
