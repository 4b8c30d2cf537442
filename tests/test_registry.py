"""The registry contract, held by both backends alike (every test runs on SQLite and on
PostgreSQL): round trips, ids, duplicates and replace, pagination, RMM parents, atomic
batches, versions for change notification, durability across reopen and kill -9."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pg_helpers
import pytest

from nolaserve.adapters.errors import (
    AdapterDamagedError,
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    RegistryUnavailableError,
)
from nolaserve.adapters.registry import Registry, iter_all, open_registry
from nolaserve.adapters.registry_pg import PostgresRegistry
from nolaserve.adapters.registry_rows import NewAdapter, encode_token
from nolaserve.adapters.registry_schema import SCHEMA_VERSION


@dataclass
class Backend:
    """Where a test's registry lives: ``open()`` a new registry object over it (another
    process would do the same), ``sql()`` runs raw statements on it."""

    name: str
    url: str

    def open(self, scope: str | None = None) -> Registry:
        return open_registry(self.url, scope=scope)

    def sql(self, *statements: str) -> list:
        rows: list = []
        if self.name == "sqlite":
            import sqlite3

            with sqlite3.connect(self.url.removeprefix("sqlite://")) as conn:
                for s in statements:
                    rows = conn.execute(s).fetchall()
            return rows
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for s in statements:
                cur = conn.execute(s)
                rows = cur.fetchall() if cur.description else []
        return rows


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path / 'reg.db'}")
    return Backend("postgresql", request.getfixturevalue("pg_url"))


@pytest.fixture
def reg(backend):
    with backend.open() as r:
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


@pytest.mark.parametrize("adapter_id", ["a\ud800", "a b", "", None])
def test_ids_no_row_can_have_are_not_found_without_a_query(reg, adapter_id):
    """A lone surrogate (a JSON ``\\ud800`` model name) is not found: no driver encodes
    it, and it used to reach the client as the driver's codec error."""
    reg.register("a", "lora", b"d")
    for call in (reg.get, reg.data, reg.delete, reg.dependents):
        with pytest.raises(AdapterNotFoundError):
            call(adapter_id)
    assert adapter_id not in reg and reg.count() == 1


def test_duplicate_and_replace(reg):
    reg.register("a", "lora", b"one")
    with pytest.raises(AdapterExistsError, match="replace"):
        reg.register("a", "nola", b"two")
    assert reg.data("a") == b"one"
    rec = reg.register("a", "nola", b"two", {"v": 2}, replace=True)
    assert reg.get("a") == rec and rec.kind == "nola" and reg.data("a") == b"two"
    assert reg.count() == 1


def test_a_second_registry_object_sees_the_same_rows_and_ids(backend, reg):
    """Two processes (here two objects) on one database: one's writes are the other's
    reads, and a taken id is refused across them."""
    reg.register("shared", "lora", b"x")
    with backend.open() as other:
        assert other.data("shared") == b"x"
        with pytest.raises(AdapterExistsError):
            other.register("shared", "lora", b"y")
        other.delete("shared")
    assert "shared" not in reg


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


@pytest.mark.parametrize("adapter_id", ["", "-a", "a b", "a" * 129, "/x", "é"])
def test_invalid_ids_raise(reg, adapter_id):
    with pytest.raises(InvalidAdapterIdError):
        reg.register(adapter_id, "lora", b"d")
    assert reg.count() == 0


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


def test_pagination_order_is_bytewise(reg):
    """Both backends order ids the same way (PostgreSQL's collation must not reorder
    '-' and '_' or upper and lower case)."""
    ids = ["A", "B-1", "B_1", "a", "a-b", "a.b", "a/b", "a_b", "b"]
    reg.register_many([NewAdapter(i, "lora", b"x") for i in ids])
    assert [r.id for r in iter_all(reg, 2)] == sorted(ids)


@pytest.mark.parametrize("token", ["garbage!", "bm9wZQ==", "djE6IGJhZA=="])
def test_invalid_page_token(reg, token):
    with pytest.raises(InvalidAdapterError, match="page_token"):
        reg.list(10, token)


def test_the_token_of_no_id_starts_at_the_first_page(reg):
    """``encode_token("")`` ("djE6") is the first page's token: /v1/models hands it out
    after a first page that holds only the base model."""
    reg.register_many([NewAdapter(i, "lora", b"x") for i in "ab"])
    assert encode_token("") == "djE6" and reg.list(10, "djE6") == reg.list(10, "")


@pytest.mark.parametrize("size", [-1, 1001, 2.5, True])
def test_invalid_page_size(reg, size):
    with pytest.raises(InvalidAdapterError, match=rf"page_size must be 1\.\.1000, got {size}"):
        reg.list(size)


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
    with pytest.raises(AdapterInUseError,
                       match=r"adapter 'basis' is the basis of .*basis-t0.*and 2 more"):
        reg.delete("basis")
    with pytest.raises(AdapterInUseError, match="basis-t0"):
        reg.register("basis", "rmm-basis", b"new", replace=True)
    with pytest.raises(InvalidAdapterError, match="lora"):
        reg.register("t", "rmm-task", b"t", parent="lora1")
    reg.register_many(_basis_and_tasks("basis", 7), replace=True)  # with all of its tasks
    for i in range(7):
        reg.delete(f"basis-t{i}")
    reg.delete("basis")
    assert "basis" not in reg and reg.count() == 1


def test_scopes_share_one_database_without_seeing_each_other(backend):
    with backend.open("f1") as one, backend.open("f2") as two, backend.open() as every:
        one.register("mine", "lora", b"1")
        assert "mine" not in two and two.count() == 0 and every.count() == 1
        with pytest.raises(AdapterExistsError, match="another base model"):
            two.register("mine", "lora", b"2", replace=True)
        with pytest.raises(AdapterNotFoundError, match="no adapter 'mine' for this base "
                           "model: that id belongs to an adapter of another base model in "
                           "this registry"):
            two.data("mine")
        with pytest.raises(AdapterNotFoundError) as unknown:
            two.get("nope")  # in no scope: the plain message
        assert "another base model" not in str(unknown.value)
        assert one.get("mine").base_model_fingerprint == "f1"
        batch = one.register_many(_basis_and_tasks("b", 1))
        assert [r.base_model_fingerprint for r in batch] == ["f1", "f1"]


def test_every_write_bumps_a_version_in_commit_order(reg):
    start = reg.version()
    reg.register("a", "lora", b"1")
    reg.register_many(_basis_and_tasks("b", 2))
    reg.register("a", "lora", b"2", replace=True)
    reg.delete("a")
    changes, newest = reg.changes_since(start)
    assert [aid for aid, _ in changes] == ["b", "b-t0", "b-t1", "a"]  # newest per adapter
    versions = [v for _, v in changes]
    assert versions == sorted(versions) and newest == reg.version() == versions[-1]
    assert versions[0] == versions[2]  # one batch, one version
    assert reg.changes_since(newest) == ([], newest)


def test_concurrent_writers_never_commit_versions_out_of_order(backend, reg):
    """Writers on several objects (several replicas) at once: a poller that reads
    ``changes_since`` repeatedly sees every change exactly once, never one behind its
    cursor (the write lock serializes versions with commits)."""
    seen: list[str] = []
    done = threading.Event()

    def poll() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            changes, cursor = reg.changes_since(cursor)
            seen.extend(aid for aid, _ in changes)
            if finished:
                return

    def write(w: int) -> None:
        with backend.open() as mine:
            for i in range(15):
                mine.register(f"w{w}-{i}", "lora", os.urandom(64))

    poller = threading.Thread(target=poll)
    poller.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    poller.join()
    assert sorted(seen) == sorted(f"w{w}-{i}" for w in range(3) for i in range(15))


def test_schema_version_is_recorded(backend, reg):
    assert backend.sql("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    with backend.open():  # reopening migrates nothing and keeps the rows
        pass
    assert backend.sql("SELECT COUNT(*) FROM schema_version") == [(1,)]


def test_bytes_live_apart_from_the_rows_that_list_and_count_read(backend, reg):
    reg.register("a", "lora", b"payload")
    columns = backend.sql("SELECT * FROM adapters")
    assert columns and all(b"payload" not in (c if isinstance(c, bytes) else b"")
                           for c in columns[0])
    assert [bytes(r[0]) for r in backend.sql("SELECT data FROM adapter_blobs")] == [b"payload"]


def test_persistence_across_reopen(backend):
    with backend.open() as r:
        r.register_many(_basis_and_tasks("b", 2))
        r.register("x", "nola", b"\x00" * 10_000, {"k": [1, 2]})
        r.delete("b-t1")
    with backend.open() as r:
        assert r.count() == 3 and r.get("x").metadata == {"k": [1, 2]}
        assert r.data("x") == b"\x00" * 10_000 and r.dependents("b") == ["b-t0"]
        assert r.verify() == []


def test_verify_reports_rows_whose_bytes_do_not_match(backend, reg):
    reg.register("good", "lora", b"x")
    reg.register("bad", "lora", b"y")
    backend.sql(f"UPDATE adapters SET sha256 = '{hashlib.sha256(b'z').hexdigest()}' "
                "WHERE id = 'bad'")
    problems = reg.verify()
    assert len(problems) == 1 and "'bad'" in problems[0] and "sha256" in problems[0]


def test_damaged_bytes_are_never_served_as_the_adapter(backend, reg):
    """Bytes that no longer match their sha256 (a damaged file or database) raise
    AdapterDamagedError naming the adapter when read, not a silently different adapter;
    the other rows read as before."""
    reg.register("good", "lora", b"xy")
    reg.register("bad", "lora", b"yx")
    flipped = "X'7879'" if backend.name == "sqlite" else "'\\x7879'::bytea"  # b"xy"
    backend.sql(f"UPDATE adapter_blobs SET data = {flipped} WHERE id = 'bad'")
    with pytest.raises(AdapterDamagedError, match="adapter 'bad' do not match their sha256"):
        reg.data("bad")
    assert reg.data("good") == b"xy"


def _refuse_insert_of(backend: Backend, adapter_id: str) -> None:
    """A trigger that fails the insert of one row, as a full disk would."""
    if backend.name == "sqlite":
        backend.sql(f"CREATE TRIGGER refuse BEFORE INSERT ON adapters WHEN NEW.id = "
                    f"'{adapter_id}' BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        return
    backend.sql(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.id = "
        f"'{adapter_id}' THEN RAISE EXCEPTION 'disk full'; END IF; RETURN NEW; END $$ "
        "LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE INSERT ON adapters FOR EACH ROW "
        "EXECUTE FUNCTION refuse()")


def test_a_failure_between_two_inserts_of_a_batch_leaves_nothing(backend, reg):
    reg.register("before", "lora", b"x")
    before = reg.version()
    _refuse_insert_of(backend, "basis-t2")
    with pytest.raises(Exception, match="disk full"):
        reg.register_many(_basis_and_tasks("basis", 3))
    assert reg.count() == 1 and "basis" not in reg and "basis-t0" not in reg
    assert reg.version() == before  # no version announced for what was not stored
    assert backend.sql("SELECT id FROM adapter_blobs") == [("before",)]
    reg.register("after", "lora", b"y")  # no transaction was left open
    assert backend.sql("SELECT COUNT(*) FROM adapters") == [(2,)]


def test_threads_share_one_registry(reg):
    def work(t: int) -> None:
        for i in range(10):
            reg.register(f"t{t}-{i}", "lora", os.urandom(100))
            reg.get(f"t{t}-{i}")
            reg.list(10)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert reg.count() == 40 and reg.verify() == []


STORM = textwrap.dedent("""
    import os, sys
    from nolaserve.adapters.registry import open_registry
    from nolaserve.adapters.registry_rows import NewAdapter
    reg = open_registry(sys.argv[1])
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


def test_acknowledged_registrations_survive_sigkill(backend, tmp_path):
    with backend.open():  # create the schema before the storm
        pass
    script = tmp_path / "storm.py"
    script.write_text(STORM)
    proc = subprocess.Popen([sys.executable, str(script), backend.url], stdout=subprocess.PIPE,
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
    with backend.open() as r:
        assert r.verify() == []
        stored = {rec.id: rec.parent for rec in iter_all(r)}
    assert set(acked) <= set(stored)
    bases = [i for i in stored if i.startswith("basis-") and "-t" not in i]
    for b in bases:  # a basis is never present without all of its tasks, nor the reverse
        assert {f"{b}-t{j}" for j in range(3)} <= set(stored)
    assert all(p is None or p in stored for p in stored.values())
    assert len(stored) == len(bases) * 4 + sum(i.startswith("a-") for i in stored)


def test_open_registry_urls(tmp_path):
    path = tmp_path / "x.db"
    with open_registry(f"sqlite://{path}") as r:
        r.register("a", "lora", b"1")
    with open_registry(str(path)) as r:
        assert r.data("a") == b"1" and Path(r.path) == path
    with open_registry("sqlite:///:memory:") as r:
        assert r.count() == 0
    with pytest.raises(InvalidAdapterError, match="sqlite:///path"):
        open_registry("mysql://x")


def test_registry_check_command_takes_a_url(backend, reg, capsys):
    from nolaserve.clients.cli import main

    reg.register_many(_basis_and_tasks("b", 2))
    assert main(["registry", "check", backend.url]) == 0
    out = capsys.readouterr().out
    assert "3 adapters (rmm-basis 1, rmm-task 2)" in out and out.endswith("ok\n")
    backend.sql("UPDATE adapter_blobs SET data = data || data WHERE id = 'b'")
    assert main(["registry", "check", backend.url]) == 1
    assert "adapter 'b': stored bytes do not match" in capsys.readouterr().out


def test_registry_check_of_an_unreachable_database_says_so_in_a_line(capsys):
    """It ended in a traceback (an outside probe's database was down)."""
    from nolaserve.clients.cli import main

    assert main(["registry", "check", "postgresql://nobody@127.0.0.1:1/none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the adapter registry (PostgreSQL at 127.0.0.1:1/none) is "
                          "unreachable") and "Traceback" not in err


def test_registry_copy_to_an_unreachable_database_fails_in_a_line_naming_why(tmp_path,
                                                                           capsys):
    """With nothing to copy it said "copied 0 adapters" and exited 0; with adapters, the
    pool's warnings came before a message that said only "pool initialization incomplete"
    and advised about the replica's adapters (an outside probe)."""
    from nolaserve.clients.cli import main

    open_registry(str(tmp_path / "empty.db")).close()
    assert main(["registry", "copy", str(tmp_path / "empty.db"),
                 "postgresql://nobody@127.0.0.1:1/none"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: the adapter registry (PostgreSQL at 127.0.0.1:1/none) is "
                          "unreachable: connection failed: ") and "Connection refused" in err


def test_registry_check_of_a_damaged_file_says_restore_it(tmp_path, capsys):
    """It said to run `nolaserve registry check`, the command that was running."""
    from nolaserve.clients.cli import main

    (tmp_path / "bad.db").write_bytes(b"SQLite format 3\0" + b"x" * 4096)
    assert main(["registry", "check", str(tmp_path / "bad.db")]) == 1
    err = capsys.readouterr().err
    assert "damaged or not a registry; restore it" in err and "registry check" not in err


def test_registry_copy_moves_a_sqlite_registry_into_another_whole(backend, tmp_path, capsys):
    from nolaserve.clients.cli import main

    source = tmp_path / "source.db"
    with open_registry(str(source), scope="f1") as src:
        src.register_many(_basis_and_tasks("b", 2))
        src.register("x", "nola", b"\x01" * 100, {"rank": 2})
    with open_registry(str(source)) as src:
        src.register("old", "lora", b"o")  # unscoped, as before scoping
    assert main(["registry", "copy", str(source), backend.url]) == 0
    assert "copied 5 adapters, skipped 0" in capsys.readouterr().out
    assert main(["registry", "copy", str(source), backend.url]) == 0  # rerun: nothing new
    assert "copied 0 adapters, skipped 5" in capsys.readouterr().out
    with backend.open("f1") as dst, open_registry(str(source), scope="f1") as src:
        assert [r.id for r in iter_all(dst)] == ["b", "b-t0", "b-t1", "old", "x"]
        for r in iter_all(src):
            got = dst.get(r.id)
            assert (got.kind, got.sha256, got.metadata, got.parent,
                    got.base_model_fingerprint) == (r.kind, r.sha256, r.metadata, r.parent,
                                                    r.base_model_fingerprint)
            assert dst.data(r.id) == src.data(r.id)
    with backend.open("f2") as other:
        assert [r.id for r in iter_all(other)] == ["old"]  # scopes kept


def test_a_hung_database_is_unavailable_after_timeout_s_not_forever(pg_url):
    """An outside probe stopped PostgreSQL's processes: requests for adapters the replica
    held, and metrics scrapes, waited for as long as the database hung (150 s), though
    held adapters are to keep serving. A read now gives up after ``timeout_s``, and the
    next ones within ``retry_s`` at once; the database back, reads answer again."""
    with PostgresRegistry(pg_url, timeout_s=1.0, retry_s=0.5) as reg:
        reg.register("a", "lora", b"d")
        with pg_helpers.hung_postgres():
            start = time.monotonic()
            with pytest.raises(RegistryUnavailableError, match="no answer in 1 s"):
                reg.get("a")
            with pytest.raises(RegistryUnavailableError, match="no answer in 1 s"):
                reg.count()  # within retry_s: at once
            time.sleep(0.5)
            with pytest.raises(RegistryUnavailableError, match="no answer in 1 s"):
                reg.changes_since(0)  # the watcher's read: health turns NOT_SERVING
            assert time.monotonic() - start < 10  # not for as long as the database hangs
        deadline = time.monotonic() + 60
        while True:
            try:
                assert reg.get("a").id == "a" and reg.count() == 1
                break
            except RegistryUnavailableError:
                assert time.monotonic() < deadline, "the registry never came back"
                time.sleep(0.2)

