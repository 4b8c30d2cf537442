"""What only the SQLite backend has (the contract both hold is tests/test_registry.py):
every valid id round trips, WAL with synchronous=FULL, SQLite's own integrity check, files
of older schemas migrated in place, and the ``registry check`` command."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nolaserve.adapters.errors import (
    InvalidAdapterError,
    InvalidAdapterIdError,
    RegistrySchemaError,
    RegistryUnavailableError,
)
from nolaserve.adapters.ids import ADAPTER_ID_PATTERN
from nolaserve.adapters.registry import iter_all
from nolaserve.adapters.registry_rows import NewAdapter
from nolaserve.adapters.registry_schema import SCHEMA_VERSION
from nolaserve.adapters.registry_sqlite import SqliteRegistry as Registry

V1_FILE = """
CREATE TABLE adapters (id TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, metadata TEXT NOT NULL, parent TEXT,
    created_at REAL NOT NULL);
CREATE INDEX adapters_parent ON adapters(parent) WHERE parent IS NOT NULL;
INSERT INTO adapters VALUES ('b', 'rmm-basis', x'0102', 2,
    'a12871fee210fb8619291eaea194581cbd2531e4b23759d225f6806923f63222', '{}', NULL, 1.0);
INSERT INTO adapters VALUES ('b/t', 'rmm-task', x'03', 1,
    '084fed08b978af4d7d196a7446a86b58009e636b611db16211b65a9aadff29c5', '{"r": 1}', 'b', 2.0);
"""


def _basis_and_tasks(basis: str, n: int) -> list[NewAdapter]:
    items = [NewAdapter(basis, "rmm-basis", b"B" * 64, {"K": 8})]
    items += [NewAdapter(f"{basis}-t{i}", "rmm-task", b"T%d" % i, {}, basis) for i in range(n)]
    return items


@pytest.fixture
def reg():
    with Registry() as r:
        yield r


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


def test_every_connection_is_wal_with_synchronous_full(tmp_path):
    """Power-loss durability: WAL alone survives kill -9, but only synchronous=FULL fsyncs
    the WAL on every commit. The pragma is per connection, so check the registry's own."""
    with Registry(tmp_path / "reg.db") as r:
        assert r._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
        assert r._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


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
        conn.execute("UPDATE adapter_blobs SET data = ? WHERE id = 'x'",
                     (b"\x02" + b"\x01" * 99,))
    assert main(["registry", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "adapter 'x': stored bytes do not match their size or sha256" in out
    assert main(["registry", "check", str(tmp_path / "missing.db")]) == 1
    assert not (tmp_path / "missing.db").exists()  # checking never creates a registry
    # nor in the URL form, nor in an empty file, nor copying from one (an outside probe's
    # typo made a registry, and "ok"); the message names the file
    (tmp_path / "empty.db").touch()
    capsys.readouterr()
    for argv in (["check", f"sqlite:///{tmp_path}/missing.db"],
                 ["check", str(tmp_path / "empty.db")],
                 ["copy", f"sqlite:///{tmp_path}/missing.db", str(tmp_path / "to.db")]):
        assert main(["registry", *argv]) == 1
        assert "missing.db" in capsys.readouterr().err or argv[1].endswith("empty.db")
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "to.db").exists()
    assert (tmp_path / "empty.db").stat().st_size == 0


def test_a_file_of_the_first_schema_is_migrated_in_place(tmp_path):
    """Version 1 (bytes inside ``adapters``, no scope, no version table): opening it moves
    the bytes to ``adapter_blobs`` and records the schema version; nothing is lost."""
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_FILE)
    with Registry(path) as r:
        assert [x.id for x in iter_all(r)] == ["b", "b/t"] and r.verify() == []
        assert r.data("b") == b"\x01\x02" and r.get("b/t").metadata == {"r": 1}
        assert r.dependents("b") == ["b/t"] and r.version() == 0
        r.register("new", "lora", b"n")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == \
            [(SCHEMA_VERSION,)]
        columns = {c[1] for c in conn.execute("PRAGMA table_info(adapters)")}
        assert "data" not in columns and "base_model_fingerprint" in columns


def test_a_file_of_the_second_schema_without_a_version_table_is_migrated(tmp_path):
    """Version 2 (the scope column) was told from version 1 by its columns alone."""
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_FILE + "ALTER TABLE adapters ADD COLUMN base_model_fingerprint "
                           "TEXT; UPDATE adapters SET base_model_fingerprint = 'f1';")
    with Registry(path) as r:
        assert r.get("b").base_model_fingerprint == "f1" and r.verify() == []


def test_an_anonymous_temporary_file_shares_its_one_connection():
    """``""`` is a private temporary database per connection, like ``":memory:"``: reads
    must share the writer's connection or they would see an empty database."""
    with Registry("") as r:
        r.register("a", "lora", b"x")
        assert r.data("a") == b"x" and r.count() == 1


def _open_files(path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_reads_from_threads_that_end_hold_no_file_open_after_them(tmp_path):
    """An outside probe's soak: every metrics scrape (a new thread) left a read connection,
    one file descriptor each, open for good. Reads now share a pool as large as the most
    reads at once."""
    path = (tmp_path / "reg.db").resolve()
    with Registry(path) as r:
        r.register("a", "lora", b"x")
        before = _open_files(path)
        for _ in range(20):
            reader = threading.Thread(target=r.get, args=("a",))
            reader.start()
            reader.join()
        assert _open_files(path) <= before + 1
        gate = threading.Barrier(4)

        def held_read() -> None:
            with r._reading():
                gate.wait(timeout=30)  # four reads at once: four connections

        readers = [threading.Thread(target=held_read) for _ in range(4)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert _open_files(path) <= before + 4 and r.get("a").kind == "lora"
    assert _open_files(path) == 0


def test_a_closed_registry_refuses_later_calls_even_from_a_new_thread(tmp_path):
    """A thread that never read would open its own read connection: not once closed."""
    r = Registry(tmp_path / "reg.db")
    r.register("a", "lora", b"x")
    r.close()
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(r.get("a"))
        except sqlite3.ProgrammingError as e:
            outcome.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join()
    assert isinstance(outcome[0], sqlite3.ProgrammingError)
    with pytest.raises(sqlite3.ProgrammingError):
        r.register("b", "lora", b"y")


def test_verify_reports_sqlites_own_integrity_problems(tmp_path):
    """A row that breaks a NOT NULL constraint (written behind SQLite's back) is reported
    by ``integrity_check``, not only rows whose bytes do not match."""
    path = tmp_path / "reg.db"
    Registry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'kind TEXT NOT NULL', "
                     "'kind TEXT') WHERE name = 'adapters'")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO adapters (id, kind, size, sha256, metadata, created_at) "
                     "VALUES ('x', NULL, 0, '', '{}', 0)")
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'kind TEXT,', "
                     "'kind TEXT NOT NULL,') WHERE name = 'adapters'")
    with Registry(path) as r:
        assert "NULL value in adapters.kind" in r.verify()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Registry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistrySchemaError, match="upgrade nolaserve"):
        Registry(path)


def test_a_file_that_cannot_be_opened_or_written_is_unavailable_naming_it(tmp_path):
    """A directory, a missing directory, a read-only file: RegistryUnavailableError (the
    server's UNAVAILABLE, or a one-line failure to start) naming the file and what to fix,
    never SQLite's own exception (an internal error); the rows already there stay."""
    for path in (tmp_path, tmp_path / "missing" / "r.db"):
        with pytest.raises(RegistryUnavailableError, match="writable file in an existing"):
            Registry(path)
    registry = Registry(tmp_path / "r.db")
    registry.register("kept", "nola", b"x", {})
    registry._conn.close()  # as if the file turned read-only under the server
    registry._conn = sqlite3.connect(f"file:{tmp_path / 'r.db'}?mode=ro", uri=True,
                                     isolation_level=None, check_same_thread=False)
    with pytest.raises(RegistryUnavailableError, match="cannot write .* readonly"):
        registry.register("new", "nola", b"y", {})
    assert [r.id for r in iter_all(registry)] == ["kept"]

