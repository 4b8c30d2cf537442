"""Reversible Model Merging (arXiv 2510.14163): n low-rank adapters become K shared basis
models plus K coefficients per task and (layer, module), in closed form and without data.

Per (layer, module), each task's scale is folded into its factors (``delta W = B' @ A'``),
the folded factors are flattened into the rows of ``X`` [n, D], and the top-K eigenvectors
``V`` [n, K] of the Gram matrix ``X @ X.T`` (float64) give the coefficients (row i is task
i) and the basis (``V.T @ X``). Task i is rebuilt as ``V[i] @ (V.T @ X)``: row i of the best
rank-K approximation of ``X`` in Frobenius norm, exact at ``K = n``. Two file formats (see
docs/adapter-format.md): ``nolaserve.rmm-basis`` and ``nolaserve.rmm-task``.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    def from_bytes(cls, data: bytes, what: str = "RMM basis") -> RmmBasis:
        metadata, tensors = st.read(data, what)
        meta = st.Metadata(metadata, what)
        lay = RmmLayout._read(meta, BASIS_FORMAT)
        k, r = lay["basis_size"], lay["rank"]
        basis = cls(**lay, num_tasks=meta.int("num_tasks", k, 1 << 20), A={}, B={})
        for key in _grid(basis):
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
    def from_bytes(cls, data: bytes, what: str = "RMM task") -> RmmTask:
        metadata, tensors = st.read(data, what)
        meta = st.Metadata(metadata, what)
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
    if spec is not None:
        spec.check_num_basis("basis_size", basis_size)
    if not (isinstance(basis_size, int) and 1 <= basis_size <= n):
        raise InvalidAdapterError(
            f"basis_size = {basis_size} must be between 1 and the number of sources ({n})")
    if basis_id:
        check_adapter_id(basis_id)
    layout, keys = _check_sources(sources, basis_size)
    if spec is not None:
        layout.validate(spec)
    basis = RmmBasis(**vars(layout.layout()), num_tasks=n, A={}, B={})
    coeff = torch.zeros(n, layout.num_layers, len(layout.target_modules), basis_size)
    num, den = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for key in _grid(layout):
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
                f"source {sid!r} must adapt the same (layer, module) pairs as {first_id!r}: "
                f"missing {missing}, extra {extra}")
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


def _grid(layout: RmmLayout) -> list[Key]:
    return [(i, name) for i in range(layout.num_layers) for name in layout.target_modules]


def _no_extra(tensors: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    extra = sorted(set(tensors) - expected)
    if extra:
        raise InvalidAdapterError(f"{what}: unexpected tensors {extra[:5]}"
                                  + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
