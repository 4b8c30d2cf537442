"""PostgreSQL for the tests: the server .ci/run starts (``.ci/postgres``), named by
``NOLASERVE_TEST_POSTGRES_URL``. Each test gets a schema of its own in that database (the
URL sets its ``search_path``), dropped afterwards. Without the variable the PostgreSQL
tests skip, except under CI (``CI=true``), where that is a failure: CI must run them.

``NOLASERVE_TEST_POSTGRES_DIR`` (the server's directory, set by .ci/run too) lets the
fault tests stop and restart the server with ``.ci/postgres``, or hang it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

URL_ENV, DIR_ENV = "NOLASERVE_TEST_POSTGRES_URL", "NOLASERVE_TEST_POSTGRES_DIR"
CTL = Path(__file__).resolve().parent.parent / ".ci" / "postgres"


def postgres_url() -> str:
    url = os.environ.get(URL_ENV, "")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{URL_ENV} is not set under CI: .ci/run starts PostgreSQL and "
                        "exports it; the PostgreSQL tests must run, not skip")
        pytest.skip(f"no PostgreSQL: set {URL_ENV} (.ci/postgres start DIR prints one)")
    return url


def control_dir() -> str:
    """The running server's directory, for stop/start (fault tests)."""
    postgres_url()
    path = os.environ.get(DIR_ENV, "")
    if not path:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{DIR_ENV} is not set under CI: the fault tests must run")
        pytest.skip(f"set {DIR_ENV} to the directory of `.ci/postgres start DIR`")
    return path


def stop_postgres() -> None:
    subprocess.run([str(CTL), "stop", control_dir()], check=True, capture_output=True)


def start_postgres() -> None:
    subprocess.run([str(CTL), "start", control_dir()], check=True, capture_output=True)


@contextmanager
def hung_postgres() -> Iterator[None]:
    """The server's processes stopped (SIGSTOP) and resumed after: connections stay open
    and queries are taken, but nothing answers, as behind a network that drops replies."""
    data = Path(control_dir()) / "data"
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                              capture_output=True, text=True, check=True).stdout.split()
    pids = [postmaster, *map(int, children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A URL whose connections work in a fresh schema of their own (dropped after)."""
    import psycopg

    base = postgres_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
