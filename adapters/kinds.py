"""What differs between adapter kinds, in one place: parsing the bytes of any kind, the
summary the registry keeps, the bounds check, materializing factors, and the estimated
cost of a load (which orders the admission's load queue)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import torch

from . import safetensors_io as st
from .errors import (
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    short,
)
from .lora import LoraAdapter
from .nola import NolaAdapter
from .registry_rows import AdapterRecord
from .rmm import BASIS_FORMAT, TASK_FORMAT, RmmBasis, RmmTask
from .spec import AdapterFactors, BaseModelSpec, DirectFactors

Adapter = NolaAdapter | LoraAdapter | RmmBasis | RmmTask
FORMATS: dict[str, type] = {
    "nolaserve.nola": NolaAdapter, "nolaserve.lora": LoraAdapter,
    BASIS_FORMAT: RmmBasis, TASK_FORMAT: RmmTask,
}
VALUE_BYTES = 4  # a float32 value: the unit of load costs is bytes of float32 values


def parse_adapter(data: bytes, strict: bool = True) -> Adapter:
    """Parse adapter file bytes of any kind; the ``format`` metadata key picks the kind.
    ``strict`` False: bytes the registry holds, read as they were accepted
    (``safetensors_io.Metadata``)."""
    fmt = st.read_format(data)
    if fmt not in FORMATS:
        raise InvalidAdapterError(
            f"unknown adapter format {short(fmt)}; expected one of {sorted(FORMATS)}"
        )
    return FORMATS[fmt].from_bytes(data, strict=strict)


def summary(adapter: Adapter) -> dict:
    """What the registry keeps next to the bytes, to answer GetAdapter without parsing."""
    out = {"rank": adapter.rank, "target_modules": list(adapter.target_modules),
           "num_layers": adapter.num_layers}
    for key in ("base_model", "description", "basis_id"):
        if getattr(adapter, key, ""):
            out[key] = getattr(adapter, key)
    return out


def check_bounds(adapter: Adapter, basis_of: Callable[[str], Adapter]) -> None:
    """Refuse an adapter whose materialized factors or delta could overflow; a task is
    checked with its basis (``basis_of(basis id)``), a basis only through its tasks."""
    if isinstance(adapter, RmmTask):
        adapter.check_bounds(basis_of(adapter.basis_id))
    elif not isinstance(adapter, RmmBasis):
        adapter.check_bounds()


def basis_not_served() -> IncompatibleAdapterError:
    return IncompatibleAdapterError("an RMM basis is not served by itself; request one of "
                                    "its tasks (ids '<basis id>/<source id>')")


def materialize(adapter: Adapter, device: torch.device | str,
                basis_of: Callable[[str], Adapter], regen: Executor | None) -> AdapterFactors:
    """The adapter's factors on ``device``; a NOLA basis regenerates on ``regen``'s threads
    (None: a pool per call)."""
    if isinstance(adapter, RmmBasis):
        raise basis_not_served()
    if isinstance(adapter, RmmTask):
        return adapter.materialize(basis_of(adapter.basis_id), device)
    if isinstance(adapter, NolaAdapter):
        return adapter.materialize(device, regen)
    return adapter.materialize(device)


def direct(adapter: Adapter) -> DirectFactors | None:
    """The adapter as ``DirectFactors`` (written straight into a slot) if its kind can
    be: NOLA regenerates on the device; LoRA and RMM keep the copy path (None)."""
    return adapter.direct() if isinstance(adapter, NolaAdapter) else None


def load_cost(adapter: Adapter) -> int:
    """About the bytes of float32 values that materializing ``adapter`` generates or
    reads: per (layer, module), NOLA regenerates ``k * r * in + l * out * r`` basis values,
    an RMM task sums ``K`` basis factors of ``r * (in + out)``, LoRA copies its factors.
    A basis is refused at once: cost 0. From shapes only: no tensor is read."""
    if isinstance(adapter, NolaAdapter):
        k, l_ = adapter.alpha.shape[2], adapter.beta.shape[2]
        per_layer = sum(adapter.rank * (k * adapter.module_shapes[t][0]
                                        + l_ * adapter.module_shapes[t][1])
                        for t in adapter.target_modules)
        return VALUE_BYTES * adapter.num_layers * per_layer
    if isinstance(adapter, RmmTask):
        per_layer = sum(adapter.rank * (n_in + n_out) for n_in, n_out in
                        (adapter.module_shapes[t] for t in adapter.target_modules))
        return VALUE_BYTES * adapter.num_layers * adapter.basis_size * per_layer
    if isinstance(adapter, LoraAdapter):
        return adapter.nbytes
    return 0


def worst_load_cost(spec: BaseModelSpec) -> int:
    """The cost of the costliest adapter ``spec`` admits (a NOLA adapter with ``max_rank``
    and ``max_num_basis`` on every module of every layer): for a load whose adapter is not
    parsed yet."""
    per_layer = sum(spec.max_rank * spec.max_num_basis * (n_in + n_out)
                    for n_in, n_out in spec.module_shapes.values())
    return VALUE_BYTES * spec.num_layers * per_layer


def basis_of_task(task: RmmTask, get: Callable[[str], AdapterRecord]) -> str:
    """The id of the registered basis ``task`` was built from (``get``: the registry's
    record lookup); refused unless that id holds exactly that basis."""
    if not task.basis_id:
        raise InvalidAdapterError("RMM task names no basis_id; register it with its basis")
    try:
        basis = get(task.basis_id)
    except AdapterNotFoundError:
        raise AdapterNotFoundError(
            f"RMM task names basis_id {short(task.basis_id)}, which is not registered: "
            "register that basis first") from None
    if basis.kind != "rmm-basis":
        raise IncompatibleAdapterError(
            f"RMM task names basis_id {short(task.basis_id)}, but that is a {basis.kind} "
            "adapter, not an rmm-basis; give the id of the basis the task was built from")
    if basis.sha256 != task.basis_sha256:
        raise IncompatibleAdapterError(
            f"RMM task was built from a basis with sha256 {task.basis_sha256[:12]}..., but "
            f"{short(task.basis_id)} has sha256 {basis.sha256[:12]}..."
        )
    return task.basis_id
