import pytest
import torch

from nolaserve.adapters import safetensors_io as st
from nolaserve.adapters.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidAdapterIdError,
)
from nolaserve.adapters.kinds import parse_adapter
from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import AdapterFactors, BaseModelSpec, ModuleFactors
from nolaserve.adapters.store import AdapterStore

SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (8, 8), "v": (8, 4)}, max_rank=8)


@pytest.fixture
def store(tmp_path):
    return AdapterStore(SPEC, SqliteRegistry(tmp_path / "reg.db"), num_slots=3)


def nola_bytes(seed: int, **kw) -> bytes:
    return random_nola(SPEC, seed, rank=4, num_basis=16, **kw).to_bytes()


def lora_bytes(seed: int, rank: int = 2) -> bytes:
    g = torch.Generator().manual_seed(seed)
    mods = {(i, m): ModuleFactors(torch.randn(rank, n_in, generator=g),
                                  torch.randn(n_out, rank, generator=g), 0.5)
            for i in range(2) for m, (n_in, n_out) in SPEC.module_shapes.items()}
    return LoraAdapter(target_modules=["q", "v"], module_shapes=SPEC.module_shapes,
                       num_layers=2, factors=AdapterFactors(mods)).to_bytes()


def slot_delta(store: AdapterStore, slot: int, layer: int, module: str) -> torch.Tensor:
    A, B, scale = store.slots.buffers(layer, module)
    return scale[slot].double() * B[slot].double() @ A[slot].double()


def test_register_and_serve_each_kind(store):
    for i, data in enumerate([nola_bytes(1), lora_bytes(2)]):
        rec = store.register(f"a{i}", data)
        assert rec.kind == ["nola", "lora"][i] and rec.size == len(data)
        assert rec.metadata["target_modules"] == ["q", "v"]
        want = parse_adapter(data).materialize()
        slot = store.acquire(f"a{i}")
        for (layer, m), f in want.modules.items():
            torch.testing.assert_close(slot_delta(store, slot, layer, m), f.delta())
        store.release(slot)
    assert [r.id for r in store.registry.list()[0]] == ["a0", "a1"]


def test_bad_registrations_leave_nothing_behind(store):
    store.register("keep", nola_bytes(1))
    bad = [
        ("x", b"not safetensors", InvalidAdapterError, "too short|truncated"),
        ("x", st.write({"t": torch.zeros(1)}, {"format": "nolaserve.gguf"}),
         InvalidAdapterError, "unknown adapter format"),
        ("bad id!", nola_bytes(2), InvalidAdapterIdError, "invalid adapter id"),
        ("x", random_nola(BaseModelSpec(2, {"q": (8, 9)}), 3).to_bytes(),
         IncompatibleAdapterError, "shape"),
        ("x", random_nola(SPEC, 3, rank=9).to_bytes(), IncompatibleAdapterError, "max_rank"),
        ("keep", nola_bytes(4), AdapterExistsError, "keep"),
    ]
    for adapter_id, data, error, match in bad:
        with pytest.raises(error, match=match):
            store.register(adapter_id, data)
    assert store.registry.count() == 1 and store.registry.get("keep").sha256


def test_replace_serves_new_weights_and_lets_old_users_finish(store):
    store.register("a", nola_bytes(1))
    old_slot = store.acquire("a")
    old = slot_delta(store, old_slot, 0, "q").clone()
    store.register("a", nola_bytes(2), replace=True)
    new_slot = store.acquire("a")
    assert new_slot != old_slot
    torch.testing.assert_close(slot_delta(store, old_slot, 0, "q"), old)  # in flight: intact
    want = parse_adapter(nola_bytes(2)).materialize().modules[(0, "q")].delta()
    torch.testing.assert_close(slot_delta(store, new_slot, 0, "q"), want)
    store.release(old_slot)
    store.release(new_slot)


def test_delete_and_unknown(store):
    store.register("a", nola_bytes(1))
    store.delete("a")
    for call in (store.acquire, store.pin, store.delete):
        with pytest.raises(AdapterNotFoundError):
            call("a")


def test_rmm_build_serves_tasks_and_protects_basis(store):
    ids = ["n1", "n2", "l3"]
    for sid, data in zip(ids, [nola_bytes(1), nola_bytes(2), lora_bytes(3, rank=4)]):
        store.register(sid, data)
    result = store.build_rmm(ids, basis_size=3, basis_id="base")
    assert result.basis.kind == "rmm-basis" and [t.id for t in result.tasks] == [
        "base/n1", "base/n2", "base/l3"]
    assert max(result.errors) < 1e-5
    for sid in ids:
        want = store.factors(sid)
        slot = store.acquire(f"base/{sid}")
        for (layer, m), f in want.modules.items():
            torch.testing.assert_close(slot_delta(store, slot, layer, m), f.delta(),
                                       rtol=1e-4, atol=1e-5)
        store.release(slot)
    with pytest.raises(IncompatibleAdapterError, match="request one of its tasks"):
        store.acquire("base")
    with pytest.raises(AdapterInUseError):
        store.delete("base")
    lossy = store.build_rmm(ids, basis_size=1, basis_id="small")
    assert all(e > 0 for e in lossy.errors)


def test_rmm_task_upload_needs_its_basis(store):
    for sid, data in zip(["a", "b"], [nola_bytes(1), nola_bytes(2)]):
        store.register(sid, data)
    store.build_rmm(["a", "b"], basis_size=2, basis_id="B1")
    store.build_rmm(["a", "b"], basis_size=1, basis_id="B2")
    with pytest.raises(AdapterExistsError, match="'B1' is already registered: pick another"):
        store.build_rmm(["a", "b"], basis_size=1, basis_id="B1")  # no replace to advise
    with pytest.raises(InvalidAdapterIdError, match="the task id .* would have 129 characters; "
                       "at most 128: use a shorter basis id"):
        store.build_rmm(["a", "b"], basis_size=1, basis_id="b" * 127)  # it named no field
    # an outside probe was told to use a basis id of at most -9873 characters, and of a
    # task id for a source id with a newline
    for source in ("x" * 10000, "a\n"):
        with pytest.raises(InvalidAdapterIdError, match="^source adapter: invalid adapter id"):
            store.build_rmm(["a", source], basis_size=1, basis_id="B3")
    with pytest.raises(InvalidAdapterIdError, match="^basis_id: invalid adapter id ''"):
        store.build_rmm(["a", "b"], basis_size=1, basis_id="")
    with pytest.raises(IncompatibleAdapterError, match="source adapter 'B1' is an RMM basis: "
                       "build from its tasks"):  # it was told to request a task
        store.build_rmm(["a", "B1"], basis_size=1, basis_id="B5")
    store.register("B4/a", nola_bytes(3))  # a task id taken by a plain adapter: no basis
    with pytest.raises(AdapterExistsError, match="'B4/a' is already registered: pick another "
                       "basis id, or delete it first"):
        store.build_rmm(["a", "b"], basis_size=1, basis_id="B4")
    task = store.registry.data("B1/a")
    store.register("copy", task)  # same basis: fine
    other = parse_adapter(store.registry.data("B2/a"))
    other.basis_id = "B1"  # claims the wrong basis: sha256 differs
    with pytest.raises(IncompatibleAdapterError, match="sha256"):
        store.register("liar", other.to_bytes())
    other.basis_id = "nope"
    with pytest.raises(AdapterNotFoundError, match="RMM task names basis_id 'nope', which is "
                       "not registered: register that basis first"):
        store.register("orphan", other.to_bytes())
    store.register("n", nola_bytes(3))
    other.basis_id, other.basis_sha256 = "n", store.registry.get("n").sha256
    with pytest.raises(IncompatibleAdapterError, match="RMM task names basis_id 'n', but that "
                       "is a nola adapter, not an rmm-basis"):
        store.register("on-nola", other.to_bytes())


def test_registrations_survive_reopen(tmp_path):
    first = AdapterStore(SPEC, SqliteRegistry(tmp_path / "r.db"), num_slots=2)
    first.register("a", nola_bytes(1))
    first.registry.close()
    again = AdapterStore(SPEC, SqliteRegistry(tmp_path / "r.db"), num_slots=2)
    assert again.registry.get("a").kind == "nola" and again.acquire("a") >= 0


def test_numbers_the_format_refuses_are_refused_at_registration_only(store):
    """A file whose ``rank`` is "04" (``lora_alpha`` "1_6") is refused now; one that the
    registry took before that check still serves (``parse_adapter(strict=False)``): nothing
    registered is lost to it."""
    metadata, tensors = st.read(nola_bytes(1))
    loose = st.write(tensors, {**metadata, "rank": "04", "lora_alpha": "1_6"})
    with pytest.raises(InvalidAdapterError, match="rank.*leading zeros"):
        store.register("new", loose)
    store.registry.register("old", "nola", loose)  # as an older server accepted it
    old = store.parsed("old")
    assert (old.rank, old.lora_alpha) == (4, 16.0)
    assert store.factors("old").modules


def test_duplicate_header_keys_are_refused_at_registration_only(store):
    """A header that writes a key twice is refused now; one the registry took before that
    check is read as it was accepted: the last one wins."""
    data = nola_bytes(1)
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode().replace('"__metadata__":{', '"__metadata__":{"seed":"99",')
    twice = len(header).to_bytes(8, "little") + header.encode() + data[8 + n :]
    with pytest.raises(InvalidAdapterError, match="header holds the key 'seed' twice"):
        store.register("new", twice)
    store.registry.register("old", "nola", twice)  # as an older server accepted it
    assert store.parsed("old").seed == 1 and store.factors("old").modules


def test_magnitude_bound_is_float16_max_and_checked_at_registration_only(store):
    """|A| = 65530 is refused (it would overflow float16, whose max is 65504); 65504 passes;
    a file the registry took under the old bound 2^16 still serves."""
    def lora_with(a00: float) -> bytes:
        lora = LoraAdapter.from_bytes(lora_bytes(1))
        lora.factors.modules[(0, "q")].A[0, 0] = a00
        return lora.to_bytes()
    with pytest.raises(InvalidAdapterError, match=r"layer 0 module 'q': \|A\| may reach "
                       r"65530, above the bound 65504"):
        store.register("over", lora_with(65530.0))
    with pytest.raises(InvalidAdapterError, match="65504.0078125, above the bound 65504;"):
        store.register("just-over", lora_with(65504.0078125))  # float32 above 65504
    store.registry.register("old", "lora", lora_with(65530.0))
    assert store.factors("old").modules[(0, "q")].A[0, 0] == 65530.0


def test_concurrent_retries_of_the_same_bytes_all_succeed(store):
    """Registering the same bytes under one id is a retry, also when the retries overlap
    (the first commits while the others are past their own same-bytes check): each gets
    the record, none ALREADY_EXISTS; other bytes still do."""
    import threading
    data, results, start = nola_bytes(1), [], threading.Barrier(8)

    def register():
        start.wait()
        try:
            results.append(store.register("same", data).sha256)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            results.append(e)

    threads = [threading.Thread(target=register) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and isinstance(results[0], str), results
    with pytest.raises(AdapterExistsError):
        store.register("same", nola_bytes(2))
