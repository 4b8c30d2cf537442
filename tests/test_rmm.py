"""RMM: closed-form basis + coefficients, its optimality, and the two strict file formats."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random

import numpy as np
import pytest
import torch

from nolaserve.adapters import safetensors_io as st
from nolaserve.adapters.errors import (
    IncompatibleAdapterError,
    InvalidAdapterError,
)
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.rmm import RmmBasis, RmmTask
from nolaserve.adapters.rmm_build import build_rmm
from nolaserve.adapters.spec import AdapterFactors, BaseModelSpec, ModuleFactors

SHAPES = {"self_attn.q_proj": (32, 16), "self_attn.o_proj": (16, 32)}  # name -> (in, out)
SPEC = BaseModelSpec(num_layers=2, module_shapes=SHAPES, max_num_basis=16)
SCALES = (1.0, -2.0, 0.5, 3.0, -0.25)


def lora(seed: int, scale: float, rank: int = 4, layers=(0, 1)) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    return AdapterFactors({
        (i, name): ModuleFactors(A=torch.randn(rank, n_in, generator=g),
                                 B=torch.randn(n_out, rank, generator=g), scale=scale)
        for i in layers for name, (n_in, n_out) in SHAPES.items()})


def lora_sources() -> dict[str, AdapterFactors]:
    return {f"lora-{j}": lora(j, s) for j, s in enumerate(SCALES)}


def nola_sources() -> dict[str, AdapterFactors]:
    return {f"nola-{j}": random_nola(SPEC, 100 + j, rank=4, num_basis=16).materialize()
            for j in range(4)}


SOURCES = {"lora": lora_sources, "nola": nola_sources}


def folded(f: ModuleFactors) -> np.ndarray:
    """[A'; B'] flattened, with ``B' @ A' = s B @ A`` (numpy, float64)."""
    a, b, s = f.A.double().numpy(), f.B.double().numpy(), f.scale
    return np.concatenate([math.sqrt(abs(s)) * a.ravel(), math.copysign(math.sqrt(abs(s)), s)
                           * b.ravel()])


def stacked(factors: list[AdapterFactors], key) -> np.ndarray:  # [n, D]
    return np.stack([folded(f.modules[key]) for f in factors])


def rebuilt(build, basis=None) -> dict[str, AdapterFactors]:
    return {sid: t.materialize(basis or build.basis) for sid, t in build.tasks.items()}


def numpy_error(src: AdapterFactors, rec: AdapterFactors) -> float:
    num = den = 0.0
    for key, f in src.modules.items():
        want = f.scale * f.B.double().numpy() @ f.A.double().numpy()
        r = rec.modules[key]
        got = r.scale * r.B.double().numpy() @ r.A.double().numpy()
        num += np.linalg.norm(got - want) ** 2
        den += np.linalg.norm(want) ** 2
    return math.sqrt(num / den)


@pytest.mark.parametrize("kind", SOURCES)
def test_exact_at_full_basis(kind):
    sources = SOURCES[kind]()
    build = build_rmm(sources, len(sources), SPEC)
    assert max(build.errors.values()) < 1e-5
    for sid, rec in rebuilt(build).items():
        assert set(rec.modules) == set(sources[sid].modules)
        for key, f in sources[sid].modules.items():
            np.testing.assert_allclose(folded(rec.modules[key]), folded(f), atol=1e-4)
            torch.testing.assert_close(rec.modules[key].delta(), f.delta(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_equals_truncated_svd_and_numpy_error(kind, k):
    sources = SOURCES[kind]()
    build = build_rmm(sources, k)
    rec = rebuilt(build)
    for key in sources[next(iter(sources))].modules:
        x = stacked(list(sources.values()), key)
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vt[:k]
        got = stacked([rec[sid] for sid in sources], key)
        np.testing.assert_allclose(got, best, atol=1e-5 * np.linalg.norm(x))
    for sid, src in sources.items():
        assert build.errors[sid] == pytest.approx(numpy_error(src, rec[sid]), rel=1e-6)


def test_factor_error_non_increasing_and_delta_error_vanishes():
    sources = lora_sources()
    keys = list(sources["lora-0"].modules)
    prev, errors = None, []
    for k in range(1, len(sources) + 1):
        build = build_rmm(sources, k)
        rec = rebuilt(build)
        dist = np.array([sum(np.sum((folded(rec[sid].modules[key]) - folded(src.modules[key]))
                                    ** 2) for key in keys) for sid, src in sources.items()])
        if prev is not None:
            assert np.all(dist <= prev * (1 + 1e-6) + 1e-9)
        prev = dist
        errors.append(sum(build.errors.values()))
    assert errors[-1] < 1e-4 < errors[-2] < errors[0]


def test_delta_error_of_one_task_can_grow_with_k():
    """Only the stacked factors are approximated optimally; delta W = B @ A is bilinear in
    them, so one task's delta-W error may grow with K (here task 0: K = 1 -> 2)."""
    rows = [[1.0, -1.0, -1.0], [3.0, 3.0, 2.0], [-2.0, 2.0, -2.0]]  # [A (1x2) | B (1x1)]
    sources = {f"t{j}": AdapterFactors({(0, "m"): ModuleFactors(
        torch.tensor([r[:2]]), torch.tensor([r[2:]]), 1.0)}) for j, r in enumerate(rows)}
    e1, e2 = build_rmm(sources, 1).errors, build_rmm(sources, 2).errors
    assert e2["t0"] > e1["t0"] + 0.05 and e2["t1"] < e1["t1"] and e2["t2"] < e1["t2"]


def test_sparse_keys_and_mixed_ranks_stay_exact():
    def one(seed: int, scale: float) -> AdapterFactors:
        f = lora(seed, scale, layers=(1,))
        q = f.modules[(1, "self_attn.q_proj")]
        f.modules[(1, "self_attn.q_proj")] = ModuleFactors(q.A[:2], q.B[:, :2], q.scale)
        return f

    sources = {"a": one(1, 2.0), "b": one(2, -1.0), "c": one(3, 0.3)}
    build = build_rmm(sources, 3, SPEC)
    assert build.basis.num_layers == 2 and build.basis.rank == 4
    assert not build.basis.A[(0, "self_attn.q_proj")].any()
    for sid, rec in rebuilt(build).items():
        assert set(rec.modules) == set(sources[sid].modules)
        for key, f in sources[sid].modules.items():
            torch.testing.assert_close(rec.modules[key].delta(), f.delta(), atol=1e-4, rtol=1e-4)


def test_bytes_round_trip():
    build = build_rmm(lora_sources(), 3, SPEC, basis_id="basis-1")
    data = build.basis.to_bytes()
    assert data == build.basis.to_bytes()  # deterministic, so sha256 is stable
    assert build.basis.sha256 == hashlib.sha256(data).hexdigest()
    basis = RmmBasis.from_bytes(data)
    assert basis.kind == "rmm-basis" and basis.layout() == build.basis.layout()
    assert basis.num_tasks == 5 and basis.sha256 == build.basis.sha256
    assert basis.nbytes == build.basis.nbytes == 2 * 2 * 3 * 4 * (32 + 16) * 4
    for key in build.basis.A:
        assert torch.equal(basis.A[key], build.basis.A[key])
        assert torch.equal(basis.B[key], build.basis.B[key])
    basis.validate(SPEC)
    for sid, task in build.tasks.items():
        again = RmmTask.from_bytes(task.to_bytes())
        assert again.kind == "rmm-task" and again.layout() == task.layout()
        assert (again.basis_id, again.basis_sha256) == ("basis-1", build.basis.sha256)
        assert torch.equal(again.coefficients, task.coefficients) and again.nbytes == 2 * 2 * 3 * 4
        again.validate(SPEC)
        rec = again.materialize(basis)
        assert build.errors[sid] == pytest.approx(numpy_error(lora_sources()[sid], rec), rel=1e-6)


def test_materialize_refuses_another_basis():
    sources = lora_sources()
    build = build_rmm(sources, 3)
    task = build.tasks["lora-0"]
    other = build_rmm({sid: sources[sid] for sid in list(sources)[1:]}, 3).basis  # same layout
    with pytest.raises(IncompatibleAdapterError, match="sha256"):
        task.materialize(other)
    with pytest.raises(IncompatibleAdapterError, match="basis_size"):
        task.materialize(build_rmm(sources, 2).basis)
    wider = build_rmm({f"r5-{j}": lora(j, 1.0, rank=5) for j in range(3)}, 3).basis
    with pytest.raises(IncompatibleAdapterError, match="rank"):
        task.materialize(wider)
    lying = RmmTask.from_bytes(rewrite(task.to_bytes(), {"rank": "5"}))  # rank is metadata only
    with pytest.raises(IncompatibleAdapterError, match="rank"):
        lying.materialize(build.basis)
    with pytest.raises(IncompatibleAdapterError, match="basis_size"):
        task.validate(BaseModelSpec(2, SHAPES, max_num_basis=2))


@pytest.mark.parametrize("k", [0, 6, -1, 2.0])
def test_bad_basis_size(k):
    with pytest.raises(InvalidAdapterError, match="basis_size"):
        build_rmm(lora_sources(), k)


def test_bad_sources():
    good = lora_sources()
    with pytest.raises(InvalidAdapterError, match="at least one"):
        build_rmm({}, 1)
    with pytest.raises(IncompatibleAdapterError, match="max_num_basis"):
        build_rmm(good, 3, BaseModelSpec(2, SHAPES, max_num_basis=2))
    with pytest.raises(InvalidAdapterError, match="number of sources"):  # K > n comes first
        build_rmm(good, 2**32 - 1, BaseModelSpec(2, SHAPES, max_num_basis=2))
    with pytest.raises(IncompatibleAdapterError, match="self_attn"):
        build_rmm(good, 3, BaseModelSpec(2, {"self_attn.q_proj": (32, 16)}))
    with pytest.raises(InvalidAdapterError, match="same rank"):
        build_rmm({**good, "r8": lora(9, 1.0, rank=8)}, 2)
    with pytest.raises(InvalidAdapterError, match="same .layer, module. pairs"):
        build_rmm({**good, "one-layer": lora(9, 1.0, layers=(0,))}, 2)
    nan = lora(9, 1.0)
    nan.modules[(1, "self_attn.o_proj")].A[0, 0] = float("nan")
    with pytest.raises(InvalidAdapterError, match="NaN"):
        build_rmm({**good, "nan": nan}, 2)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        build_rmm({**good, "inf": lora(9, float("inf"))}, 2)
    with pytest.raises(InvalidAdapterError, match="delta W = 0"):
        build_rmm({**good, "zero": lora(9, 0.0)}, 2)
    with pytest.raises(InvalidAdapterError, match="AdapterFactors"):
        build_rmm({**good, "raw": {}}, 2)


def rewrite(data: bytes, meta: dict | None = None, tensors: dict | None = None) -> bytes:
    m, t = st.read(data)
    return st.write({k: v for k, v in {**t, **(tensors or {})}.items() if v is not None},
                    {k: v for k, v in {**m, **(meta or {})}.items() if v is not None})


def files():
    build = build_rmm(lora_sources(), 2)
    return [(RmmBasis, build.basis.to_bytes(), "layers.1.self_attn.o_proj.B"),
            (RmmTask, build.tasks["lora-1"].to_bytes(), "coefficients")]


@pytest.mark.parametrize("cls, data, name", files(), ids=["basis", "task"])
def test_strict_parsing(cls, data, name):
    t = st.read(data)[1][name]
    bad = [({"format": "nolaserve.nola"}, None), ({"format_version": "2"}, None),
           ({"rank": None}, None), ({"num_layers": "3"}, None), ({"target_modules": "[]"}, None),
           ({"module_shapes": '{"self_attn.q_proj": [32, 16]}'}, None),
           ({"basis_size": "x"}, None), (None, {name: None}), (None, {"extra": torch.zeros(1)}),
           (None, {name: t.double()}), (None, {name: t[:1]}),
           (None, {name: torch.full_like(t, float("inf"))})]
    if cls is RmmTask:
        bad += [({"basis_sha256": "00"}, None), ({"basis_id": "bad id"}, None)]
    else:
        bad += [({"num_tasks": "1"}, None)]
    for meta, tensors in bad:
        with pytest.raises(InvalidAdapterError):
            cls.from_bytes(rewrite(data, meta, tensors))


@pytest.mark.parametrize("cls, data, name", files(), ids=["basis", "task"])
def test_truncated_or_mutated_bytes_raise_only_invalid(cls, data, name):
    for n in (0, 7, 8, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidAdapterError):
            cls.from_bytes(data[:n])
    rng = random.Random(0)
    header = int.from_bytes(data[:8], "little") + 8
    for _ in range(300):
        mutated = bytearray(data)
        pos = rng.randrange(header) if rng.random() < 0.8 else rng.randrange(len(data))
        mutated[pos] = rng.randrange(256)
        with contextlib.suppress(InvalidAdapterError):  # a mutated float may still parse
            cls.from_bytes(bytes(mutated))


def test_same_modules_error_names_a_few_mismatches_and_a_count():
    many = tuple(range(30))
    sources = {"wide": lora(1, 1.0, layers=many), "narrow": lora(2, 1.0, layers=(0,))}
    with pytest.raises(InvalidAdapterError) as info:
        build_rmm(sources, 1)
    text = str(info.value)
    missing = (len(many) - 1) * len(SHAPES)
    assert f"{missing} ((1, " in text and ", ...) missing, 0 extra" in text
    assert text.count("(") < 12  # a few pairs, not all of them
