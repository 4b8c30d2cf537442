"""Build an RMM basis (arXiv 2510.14163): n source adapters compressed into K basis models
plus per-task coefficients, in closed form (one eigendecomposition per (layer, module));
the formats it returns are in ``rmm.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidAdapterError
from .ids import check_adapter_id
from .rmm import Key, RmmBasis, RmmLayout, RmmTask
from .spec import AdapterFactors, BaseModelSpec, ModuleFactors


@dataclass
class RmmBuild:
    """What ``build_rmm`` returns. ``errors[id]`` is the task's relative error of delta W."""

    basis: RmmBasis
    tasks: dict[str, RmmTask]
    errors: dict[str, float]


def build_rmm(sources: dict[str, AdapterFactors], basis_size: int,
              spec: BaseModelSpec | None = None, basis_id: str = "") -> RmmBuild:
    """Merge ``sources`` (same (layer, module) keys and ranks) into ``basis_size`` basis models.

    Per (layer, module), with ``s, A, B`` a source's scale and factors (ranks zero-padded to
    the largest rank, which leaves every delta unchanged)::

        A_ = abs(s) ** 0.5 * A; B_ = copysign(abs(s) ** 0.5, s) * B   # B_ @ A_ = s * B @ A
        X = torch.stack([torch.cat([A_.flatten(), B_.flatten()]) for each source])  # [n, D]
        V = top-K eigenvectors of X @ X.T (float64), columns by falling eigenvalue  # [n, K]
        basis = V.T @ X  # [K, D] -> A [K, r, in], B [K, out, r];  task i: V[i]  [K]

    ``errors[i] = sqrt(sum ||B~ @ A~ - s B @ A||_F^2) / sqrt(sum ||s B @ A||_F^2)`` over the
    task's modules, computed from the stored float32 basis and coefficients.
    """
    n = len(sources)
    if n < 1:
        raise InvalidAdapterError("build_rmm needs at least one source adapter")
    if not (isinstance(basis_size, int) and 1 <= basis_size <= n):
        raise InvalidAdapterError(
            f"basis_size = {basis_size} must be between 1 and the number of sources ({n})")
    if spec is not None:
        spec.check_num_basis("basis_size", basis_size)
    if basis_id:
        check_adapter_id(basis_id)
    layout, keys = _check_sources(sources, basis_size)
    if spec is not None:
        layout.validate(spec)
    basis = RmmBasis(**vars(layout.layout()), num_tasks=n, A={}, B={})
    coeff = torch.zeros(n, layout.num_layers, len(layout.target_modules), basis_size)
    num, den = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for key in layout.grid():
        n_in, n_out = layout.module_shapes[key[1]]
        if key not in keys:  # absent from every source: zero basis, zero coefficients
            basis.A[key] = torch.zeros(basis_size, layout.rank, n_in)
            basis.B[key] = torch.zeros(basis_size, n_out, layout.rank)
            continue
        v, basis.A[key], basis.B[key], err2, norm2 = _merge_module(sources, key, layout)
        coeff[:, key[0], layout.target_modules.index(key[1])] = v
        num, den = num + err2, den + norm2
    ids = list(sources)
    zero = [sid for sid, d in zip(ids, den.tolist()) if d == 0]
    if zero:
        raise InvalidAdapterError(f"sources {zero} have delta W = 0 everywhere; leave them out")
    tasks = {sid: RmmTask(**vars(layout.layout()), basis_sha256=basis.sha256,
                          coefficients=coeff[j].clone(), basis_id=basis_id)
             for j, sid in enumerate(ids)}
    errors = dict(zip(ids, (num / den).sqrt().tolist()))
    return RmmBuild(basis=basis, tasks=tasks, errors=errors)


def _merge_module(sources: dict[str, AdapterFactors], key: Key, layout: RmmLayout
                  ) -> tuple[torch.Tensor, ...]:
    """For one (layer, module): coefficients [n, K], basis A [K, r, in] and B [K, out, r]
    (float32, as stored), and per task ``||B~ A~ - s B A||_F^2`` and ``||s B A||_F^2`` [n]."""
    k, r = layout.basis_size, layout.rank
    a, b = _folded(sources, key, r)  # [n, r, in], [n, out, r] float64
    x = torch.cat([a.flatten(1), b.flatten(1)], 1)  # [n, D]
    v64 = _top_eigenvectors(x @ x.T, k)  # [n, K]
    v, base = v64.float(), (v64.T @ x).float()  # [n, K], [K, D]
    basis_a = base[:, : a[0].numel()].reshape(k, r, a.shape[2])
    basis_b = base[:, a[0].numel() :].reshape(k, b.shape[1], r)
    at = torch.einsum("nk,kri->nri", v.double(), basis_a.double())  # [n, r, in]
    bt = torch.einsum("nk,kor->nor", v.double(), basis_b.double())  # [n, out, r]
    err2 = _frob2_of_product(torch.cat([bt, -b], 2), torch.cat([at, a], 1))
    return v, basis_a, basis_b, err2, _frob2_of_product(b, a)


def _some(pairs: list, n: int = 3) -> str:
    """``"60 ((1, 'mlp.up_proj'), (2, 'mlp.up_proj'), ...)"``: a count and the first few."""
    if not pairs:
        return "0"
    shown = ", ".join(repr(p) for p in pairs[:n])
    return f"{len(pairs)} ({shown}{', ...' if len(pairs) > n else ''})"


def _check_sources(sources: dict[str, AdapterFactors], k: int) -> tuple[RmmLayout, set[Key]]:
    """The dense layout the sources fit, or ``InvalidAdapterError`` saying what differs."""
    for sid, src in sources.items():
        if not isinstance(src, AdapterFactors):
            raise InvalidAdapterError(f"source {sid!r} must be AdapterFactors, got {type(src)}")
    first_id, first = next(iter(sources.items()))
    keys = set(first.modules)
    if not keys:
        raise InvalidAdapterError(f"source {first_id!r} adapts no module")
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[Key, int] = {}
    for sid, src in sources.items():
        if set(src.modules) != keys:
            missing, extra = sorted(keys - set(src.modules)), sorted(set(src.modules) - keys)
            raise InvalidAdapterError(
                f"source {sid!r} must adapt the same (layer, module) pairs as {first_id!r} "
                f"(one basis serves them all): {_some(missing)} missing, {_some(extra)} extra")
        for key, f in src.modules.items():
            _check_factors(sid, key, f, shapes, ranks)
    layout = RmmLayout(num_layers=max(i for i, _ in keys) + 1, rank=max(ranks.values()),
                       basis_size=k, target_modules=sorted(shapes), module_shapes=shapes)
    return layout, keys


def _check_factors(sid: str, key: object, f: ModuleFactors, shapes: dict[str, tuple[int, int]],
                   ranks: dict[Key, int]) -> None:
    where = f"source {sid!r} at {key!r}"
    if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int)
            and key[0] >= 0 and isinstance(key[1], str) and key[1]):
        raise InvalidAdapterError(f"{where}: keys must be (layer >= 0, module name)")
    a, b = f.A, f.B
    if not (a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1] >= 1
            and a.is_floating_point() and b.is_floating_point()):
        raise InvalidAdapterError(f"{where}: need float A [r, in] and B [out, r], got "
                                  f"{list(a.shape)} and {list(b.shape)}")
    shape = (a.shape[1], b.shape[0])
    if shapes.setdefault(key[1], shape) != shape:
        raise InvalidAdapterError(f"{where}: module shape [in, out] = {list(shape)} but "
                                  f"{list(shapes[key[1]])} elsewhere")
    if ranks.setdefault(key, a.shape[0]) != a.shape[0]:
        raise InvalidAdapterError(f"{where}: rank {a.shape[0]} but {ranks[key]} in other "
                                  "sources; every source needs the same rank per module")
    if not (math.isfinite(f.scale) and bool(a.isfinite().all()) and bool(b.isfinite().all())):
        raise InvalidAdapterError(f"{where}: factors or scale contain NaN or Inf")


def _folded(sources: dict[str, AdapterFactors], key: Key, r: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-folded factors of every source, zero-padded to rank ``r``: [n, r, in], [n, out, r]."""
    a_list, b_list = [], []
    for src in sources.values():
        f = src.modules[key]
        root = math.sqrt(abs(f.scale))
        pad = r - f.rank
        a_list.append(torch.nn.functional.pad(root * f.A.double().cpu(), (0, 0, 0, pad)))
        b_list.append(torch.nn.functional.pad(math.copysign(root, f.scale) * f.B.double().cpu(),
                                              (0, pad)))
    return torch.stack(a_list), torch.stack(b_list)


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors of the K largest eigenvalues [n, K], each signed so its largest entry
    is positive (a deterministic basis for the same sources)."""
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    v = vecs[:, -k:].flip(1)
    peak = v.abs().argmax(0)
    return v * v[peak, torch.arange(k)].sign()


def _frob2_of_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(p @ q).square().sum((-2, -1))`` for p [n, out, m], q [n, m, in], without forming
    the [out, in] product: ||Qp Rp Rq^T Qq^T||_F = ||Rp @ Rq^T||_F (two thin QRs)."""
    rp = torch.linalg.qr(p, mode="r").R  # [n, min(out, m), m]
    rq = torch.linalg.qr(q.mT, mode="r").R  # [n, min(in, m), m]
    return (rp @ rq.mT).square().sum((-2, -1))
