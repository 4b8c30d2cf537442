"""One registry per base model: the default registry's location follows the model's
fingerprint, every row records the fingerprint it was registered under, a shared file
lists only this model's adapters, old-schema files are upgraded in place and lose
nothing, and an adapter recorded for another base model is refused at registration."""

import asyncio
import copy
import re
import sqlite3

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from server_helpers import serving

from nolaserve.adapters.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
)
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.model_loader import model_fingerprint
from nolaserve.v1 import admin_pb2

OLD_SCHEMA = """
CREATE TABLE adapters (id TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, metadata TEXT NOT NULL, parent TEXT,
    created_at REAL NOT NULL);
INSERT INTO adapters VALUES ('old', 'nola', x'00', 1,
    '6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d', '{}', NULL, 1.0);
"""


@pytest.fixture(scope="module")
def small():
    return tiny_llama()


@pytest.fixture(scope="module")
def wide():
    return tiny_llama(hidden_size=96, intermediate_size=128)


def nola(spec: BaseModelSpec, seed: int = 1, base_model: str | None = None) -> bytes:
    adapter = random_nola(spec, seed=seed, rank=4, num_basis=16)
    if base_model is not None:
        adapter.base_model = base_model
    return adapter.to_bytes()


def test_fingerprint_ignores_dtype_and_follows_shapes(small, wide):
    import torch

    assert model_fingerprint(small) == model_fingerprint(copy.deepcopy(small).to(torch.bfloat16))
    assert model_fingerprint(small) == model_fingerprint(tiny_llama(seed=5))
    assert model_fingerprint(small) != model_fingerprint(wide)
    assert model_fingerprint(small) != model_fingerprint(tiny_llama(num_hidden_layers=3))


def test_two_models_get_two_default_registries(small, wide, tmp_path):
    a = make_engine(small, None, registry_path="", cache_dir=str(tmp_path))
    b = make_engine(wide, None, registry_path="", cache_dir=str(tmp_path))
    reg_a, reg_b = a.store.registry, b.store.registry
    assert reg_a.path != reg_b.path
    assert reg_a.path == str(tmp_path / "registries" / f"{a.store.spec.fingerprint}.db")
    a.store.register("only-a", nola(a.store.spec))
    assert reg_b.list()[0] == [] and reg_b.count() == 0
    again = make_engine(small, None, registry_path="", cache_dir=str(tmp_path))
    assert again.store.registry.path == reg_a.path
    assert [r.id for r in again.store.registry.list()[0]] == ["only-a"]
    assert again.store.registry.get("only-a").base_model_fingerprint == a.store.spec.fingerprint


def test_a_shared_registry_file_lists_only_this_models_adapters(small, wide, tmp_path):
    path = str(tmp_path / "shared.db")
    a = make_engine(small, None, registry_path=path)
    b = make_engine(wide, None, registry_path=path)
    a.store.register("x", nola(a.store.spec))
    b.store.register("y", nola(b.store.spec))
    assert [r.id for r in a.store.registry.list()[0]] == ["x"]
    assert [r.id for r in b.store.registry.list()[0]] == ["y"]
    assert (a.store.registry.count(), b.store.registry.count()) == (1, 1)
    with pytest.raises(AdapterNotFoundError, match="another base model"):
        b.store.registry.get("x")
    with pytest.raises(AdapterNotFoundError):
        b.store.registry.data("x")
    with pytest.raises(AdapterExistsError, match="another base model"):
        b.store.register("x", nola(b.store.spec), replace=True)
    with SqliteRegistry(path) as everything:  # unscoped: every row, as before scoping
        assert [r.id for r in everything.list()[0]] == ["x", "y"]


def test_an_old_schema_file_is_upgraded_in_place_and_loses_nothing(tmp_path):
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    with SqliteRegistry(path, scope="f1") as reg:
        assert reg.get("old").base_model_fingerprint is None  # visible to every model
        assert reg.data("old") == b"\x00" and reg.count() == 1
        reg.register("new", "nola", b"\x01")
        assert reg.verify() == []
    with SqliteRegistry(path, scope="f2") as other:
        assert [r.id for r in other.list()[0]] == ["old"]
    with SqliteRegistry(path) as reg:
        assert {r.id: r.base_model_fingerprint for r in reg.list()[0]} == {"old": None,
                                                                          "new": "f1"}


def test_an_adapter_of_another_base_model_is_refused_at_registration(small):
    engine = build_engine(Config(device="cpu", registry_path=":memory:", num_slots=2,
                                 max_rank=8, kv_cache_bytes=1 << 20, model="tiny-a"),
                          model=copy.deepcopy(small), tokenizer=None)
    spec = engine.store.spec
    assert spec.name == "tiny-a"
    with pytest.raises(IncompatibleAdapterError, match="made for base model 'tiny-b'"):
        engine.store.register("b", nola(spec, base_model="tiny-b"))
    engine.store.register("a", nola(spec, base_model="some/dir/Tiny-A"))  # same name
    engine.store.register("fp", nola(spec, base_model=spec.fingerprint))
    engine.store.register("unnamed", nola(spec, base_model=""))
    assert engine.store.registry.count() == 3

    async def main():
        async with serving(engine) as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.admin.RegisterAdapter(admin_pb2.RegisterAdapterRequest(
                    adapter_id="b", data=nola(spec, base_model="tiny-b")))
            shown = await c.admin.GetServerInfo(admin_pb2.GetServerInfoRequest())
            return info.value, shown.base_model_fingerprint

    error, shown = asyncio.run(main())
    assert shown == spec.fingerprint and re.fullmatch("[0-9a-f]{16}", shown)  # to write
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tiny-b" in error.details() and "tiny-a" in error.details()


def test_base_model_names_match_loosely_but_not_across_models():
    spec = BaseModelSpec(1, {"q": (4, 4)}, name="SmolLM2-135M-Instruct",
                         aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",), fingerprint="f")
    for same in ("SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct",
                 "/models/SmolLM2-135M-Instruct/", "f", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "/root/.cache/nolaserve/models/SmolLM2-135M-Instruct.Q4_1-42533a014905"):
        spec.check_base_model(same)
    for other in ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M-Instruct", "g"):
        with pytest.raises(IncompatibleAdapterError):
            spec.check_base_model(other)
    BaseModelSpec(1, {"q": (4, 4)}).check_base_model("anything")  # unnamed: no check


def test_the_old_shared_default_registry_is_pointed_to(small, tmp_path, caplog):
    with sqlite3.connect(tmp_path / "registry.db") as conn:
        conn.executescript(OLD_SCHEMA)
    with caplog.at_level("WARNING", logger="nolaserve.engine"):
        engine = make_engine(small, None, registry_path="", cache_dir=str(tmp_path))
    assert f"--registry-path {tmp_path / 'registry.db'}" in caplog.text
    assert engine.store.registry.path != str(tmp_path / "registry.db")
    old = make_engine(small, None, registry_path=str(tmp_path / "registry.db"))
    assert [r.id for r in old.store.registry.list()[0]] == ["old"]
