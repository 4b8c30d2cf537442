"""The SQLite adapter registry: round trips, ids, pagination, RMM parents, durability."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nolaserve.adapters.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
)
from nolaserve.adapters.ids import ADAPTER_ID_PATTERN
from nolaserve.adapters.registry import Registry, iter_all
from nolaserve.adapters.registry_rows import NewAdapter


@pytest.fixture
def reg():
    with Registry() as r:
        yield r


def _basis_and_tasks(basis: str, n: int) -> list[NewAdapter]:
    items = [NewAdapter(basis, "rmm-basis", b"B" * 64, {"K": 8})]
    items += [NewAdapter(f"{basis}-t{i}", "rmm-task", b"T%d" % i, {}, basis) for i in range(n)]
    return items


def test_round_trip(reg):
    data = os.urandom(1000)
    before = time.time()
    rec = reg.register("team/a-1", "nola", data, {"rank": 4, "note": "x"})
    assert rec.size == 1000 and rec.sha256 == hashlib.sha256(data).hexdigest()
    assert reg.get("team/a-1") == rec
    assert reg.data("team/a-1") == data
    assert reg.contains("team/a-1") and "team/a-1" in reg and "other" not in reg
    assert reg.count() == 1
    assert reg.get("team/a-1").metadata == {"rank": 4, "note": "x"}
    assert before <= reg.get("team/a-1").created_at <= time.time()


def test_not_found_messages(reg):
    for call in (reg.get, reg.data, reg.delete, reg.dependents):
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            call("nope")


def test_duplicate_and_replace(reg):
    reg.register("a", "lora", b"one")
    with pytest.raises(AdapterExistsError, match="replace"):
        reg.register("a", "nola", b"two")
    assert reg.data("a") == b"one"
    rec = reg.register("a", "nola", b"two", {"v": 2}, replace=True)
    assert reg.get("a") == rec and rec.kind == "nola" and reg.data("a") == b"two"
    assert reg.count() == 1


@pytest.mark.parametrize("bad", [
    dict(kind="peft"), dict(metadata=[1]), dict(metadata={"x": float("nan")}),
    dict(data="text"), dict(parent="basis"), dict(kind="rmm-task"),
])
def test_invalid_rows(reg, bad):
    reg.register("basis", "rmm-basis", b"b")
    args = dict(adapter_id="x", kind="lora", data=b"d", metadata={}) | bad
    with pytest.raises(InvalidAdapterError):
        reg.register(**args)
    assert "x" not in reg


@settings(max_examples=60, deadline=None)
@given(st.from_regex(ADAPTER_ID_PATTERN, fullmatch=True))
def test_valid_ids_round_trip(adapter_id):
    with Registry() as r:
        r.register(adapter_id, "lora", adapter_id.encode())
        assert r.get(adapter_id).id == adapter_id
        assert r.data(adapter_id) == adapter_id.encode()
        assert [x.id for x in r.list()[0]] == [adapter_id]


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=140), st.sampled_from(["", "-a", ".a", "a b", "a\n", "é",
                                                          "a" * 129, "/x", "a\x00"])))
def test_invalid_ids_raise(adapter_id):
    if ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        return
    with Registry() as r:
        with pytest.raises(InvalidAdapterIdError):
            r.register(adapter_id, "lora", b"d")
        assert r.count() == 0


def test_pagination_walks_everything_once(reg):
    ids = sorted(f"ad-{i:03d}" for i in range(57))
    reg.register_many([NewAdapter(i, "lora", i.encode()) for i in ids])
    for size in (1, 7, 57, 100):
        seen, token, pages = [], "", 0
        while True:
            page, token = reg.list(size, token)
            seen += [r.id for r in page]
            pages += 1
            if not token:
                break
        assert seen == ids and pages == -(-57 // size)
    assert [r.id for r in iter_all(reg, 10)] == ids
    assert len(reg.list(0)[0]) == 57  # 0 means the default page size (100)


def test_pagination_sees_inserts_behind_and_ahead(reg):
    reg.register_many([NewAdapter(f"m{i}", "lora", b"x") for i in range(4)])
    page, token = reg.list(2)
    reg.register("a0", "lora", b"x")  # behind the cursor: not seen
    reg.register("z0", "lora", b"x")  # ahead: seen
    rest = [r.id for r in iter_all_from(reg, token)]
    assert [r.id for r in page] == ["m0", "m1"] and rest == ["m2", "m3", "z0"]


def iter_all_from(reg, token):
    while True:
        page, token = reg.list(2, token)
        yield from page
        if not token:
            return


@pytest.mark.parametrize("token", ["garbage!", "bm9wZQ==", "djE6IGJhZA==", "djE6"])
def test_invalid_page_token(reg, token):
    with pytest.raises(InvalidAdapterError, match="page_token"):
        reg.list(10, token)


@pytest.mark.parametrize("size", [-1, 1001, 2.5, True])
def test_invalid_page_size(reg, size):
    with pytest.raises(InvalidAdapterError, match="page_size"):
        reg.list(size)


def test_page_size_bound_and_strict_tokens(reg):
    """1000 is a valid page size; a valid token with junk appended is refused, not read
    past."""
    assert reg.list(1000) == ([], "")
    reg.register_many([NewAdapter(i, "lora", b"x") for i in ("a", "b", "c")])
    page, token = reg.list(1)
    assert [r.id for r in page] == ["a"] and token
    assert [r.id for r in reg.list(1, token)[0]] == ["b"]
    with pytest.raises(InvalidAdapterError, match="page_token"):
        reg.list(1, token + "!!")


def test_verify_reports_rows_whose_bytes_do_not_match(tmp_path):
    path = tmp_path / "reg.db"
    with Registry(path) as r:
        r.register("good", "lora", b"x")
        r.register("bad", "lora", b"y")
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE adapters SET sha256 = ? WHERE id = 'bad'",
                         (hashlib.sha256(b"z").hexdigest(),))
        problems = r.verify()
        assert len(problems) == 1 and "'bad'" in problems[0] and "sha256" in problems[0]


def test_register_many_is_all_or_nothing(reg):
    reg.register("taken", "lora", b"x")
    batch = _basis_and_tasks("basis", 3) + [NewAdapter("taken", "lora", b"y")]
    with pytest.raises(AdapterExistsError):
        reg.register_many(batch)
    assert reg.count() == 1 and reg.data("taken") == b"x"
    with pytest.raises(InvalidAdapterError, match="duplicate"):
        reg.register_many([NewAdapter("d", "lora", b"1"), NewAdapter("d", "lora", b"2")])
    bad_parent = _basis_and_tasks("basis", 2) + [
        NewAdapter("orphan", "rmm-task", b"t", {}, "missing")]
    with pytest.raises(AdapterNotFoundError, match="missing"):
        reg.register_many(bad_parent)
    assert reg.count() == 1
    records = reg.register_many(_basis_and_tasks("basis", 3))
    assert [r.id for r in records] == ["basis", "basis-t0", "basis-t1", "basis-t2"]
    assert [r.parent for r in records] == [None, "basis", "basis", "basis"]
    assert records == [reg.get(r.id) for r in records]
    assert reg.count() == 5


def test_parent_protection(reg):
    reg.register_many(_basis_and_tasks("basis", 7))
    reg.register("lora1", "lora", b"l")
    assert reg.dependents("basis") == [f"basis-t{i}" for i in range(7)]
    assert reg.get("basis-t0").parent == "basis"
    with pytest.raises(AdapterInUseError, match=r"basis-t0.*and 2 more"):
        reg.delete("basis")
    with pytest.raises(AdapterInUseError, match="basis-t0"):
        reg.register("basis", "rmm-basis", b"new", replace=True)
    with pytest.raises(InvalidAdapterError, match="lora"):
        reg.register("t", "rmm-task", b"t", parent="lora1")
    # replacing the basis together with all of its tasks is allowed
    reg.register_many(_basis_and_tasks("basis", 7), replace=True)
    for i in range(7):
        reg.delete(f"basis-t{i}")
    reg.delete("basis")
    assert "basis" not in reg and reg.count() == 1


def test_persistence_across_reopen(tmp_path):
    path = tmp_path / "reg.db"
    with Registry(path) as r:
        r.register_many(_basis_and_tasks("b", 2))
        r.register("x", "nola", b"\x00" * 10_000, {"k": [1, 2]})
        r.delete("b-t1")
    with Registry(str(path)) as r:
        assert r.count() == 3 and r.get("x").metadata == {"k": [1, 2]}
        assert r.data("x") == b"\x00" * 10_000 and r.dependents("b") == ["b-t0"]
        assert r.verify() == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_every_connection_is_wal_with_synchronous_full(tmp_path):
    """Power-loss durability: WAL alone survives kill -9, but only synchronous=FULL fsyncs
    the WAL on every commit. The pragma is per connection, so check the registry's own."""
    with Registry(tmp_path / "reg.db") as r:
        assert r._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
        assert r._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failure_between_two_inserts_of_a_batch_leaves_nothing(tmp_path):
    """A batch fails after its first rows are written (here a trigger refuses the last row,
    as a full disk would): none of the batch is stored, for this or any other connection,
    and the registry stays usable."""
    path = tmp_path / "reg.db"
    with Registry(path) as r:
        r.register("before", "lora", b"x")
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON adapters "
                         "WHEN NEW.id = 'basis-t2' BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            r.register_many(_basis_and_tasks("basis", 3))
        assert r.count() == 1 and "basis" not in r and "basis-t0" not in r
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT id FROM adapters").fetchall() == [("before",)]
        r.register("after", "lora", b"y")  # no transaction was left open
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 2


def test_a_failed_delete_leaves_the_row(tmp_path):
    path = tmp_path / "reg.db"
    with Registry(path) as r:
        r.register("a", "lora", b"x")
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE DELETE ON adapters "
                         "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            r.delete("a")
        assert r.data("a") == b"x"
        r.register("b", "lora", b"y")
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 2


def test_threads_share_one_registry(reg):
    def work(t: int) -> None:
        for i in range(25):
            reg.register(f"t{t}-{i}", "lora", os.urandom(100))
            reg.get(f"t{t}-{i}")
            reg.list(10)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert reg.count() == 100 and reg.verify() == []


STORM = textwrap.dedent("""
    import os, sys
    from nolaserve.adapters.registry import Registry
    from nolaserve.adapters.registry_rows import NewAdapter
    reg = Registry(sys.argv[1])
    i = 0
    while True:
        if i % 5 == 4:
            b = f"basis-{i}"
            items = [NewAdapter(b, "rmm-basis", os.urandom(50_000))]
            items += [NewAdapter(f"{b}-t{j}", "rmm-task", os.urandom(300), {}, b)
                      for j in range(3)]
            reg.register_many(items)
            print(*[x.id for x in items], flush=True)
        else:
            reg.register(f"a-{i}", "lora", os.urandom(1000 + i * 7919 % 60_000), {"i": i})
            print(f"a-{i}", flush=True)
        i += 1
""")


def test_acknowledged_registrations_survive_sigkill(tmp_path):
    db, script = tmp_path / "storm.db", tmp_path / "storm.py"
    script.write_text(STORM)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acked: list[str] = []
    enough = threading.Event()  # 60 acknowledged, or the storm died (stdout closed)

    def read() -> None:
        for line in proc.stdout:
            acked.extend(line.split())
            if len(acked) >= 60:
                enough.set()
        enough.set()

    reader = threading.Thread(target=read)
    reader.start()
    enough.wait()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    assert len(acked) >= 60, proc.stderr.read()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, sha256, size, data, parent FROM adapters").fetchall()
    stored = {i: (sha, parent) for i, sha, size, data, parent in rows}
    assert all(hashlib.sha256(d).hexdigest() == sha and len(d) == n for _, sha, n, d, _ in rows)
    assert set(acked) <= set(stored)
    bases = [i for i in stored if i.startswith("basis-") and "-t" not in i]
    for b in bases:  # a basis is never present without all of its tasks, nor the reverse
        assert {f"{b}-t{j}" for j in range(3)} <= set(stored)
    assert all(p is None or p in stored for _, p in stored.values())
    assert len(stored) == len(bases) * 4 + sum(i.startswith("a-") for i in stored)
    with Registry(db) as r:
        assert r.verify() == [] and r.count() == len(rows)


def test_registry_check_command_verifies_every_row(tmp_path, capsys):
    from nolaserve.clients.cli import main

    path = tmp_path / "reg.db"
    with Registry(path) as r:
        r.register_many(_basis_and_tasks("b", 2))
        r.register("x", "nola", b"\x01" * 100)
    assert main(["registry", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 adapters (nola 1, rmm-basis 1, rmm-task 2)" in out and out.endswith("ok\n")
    with sqlite3.connect(path) as conn:  # one flipped byte in a stored file
        conn.execute("UPDATE adapters SET data = ? WHERE id = 'x'", (b"\x02" + b"\x01" * 99,))
    assert main(["registry", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "adapter 'x': stored bytes do not match their size or sha256" in out
    assert main(["registry", "check", str(tmp_path / "missing.db")]) == 1
    assert not (tmp_path / "missing.db").exists()  # checking never creates a registry
