"""``nolaserve registry check PATH|URL`` and ``nolaserve registry copy SOURCE TARGET``.

``check`` opens the registry, a SQLite file or a ``postgresql://`` URL (a running server
may hold it: readers do not block it), runs ``Registry.verify`` (SQLite's integrity check,
then every row's size and sha256) and counts the adapters by kind with ``iter_all``. Exit
0 when it is sound, 1 otherwise.

``copy`` copies every adapter of one registry into another (a SQLite file into the
PostgreSQL registry of a fleet): each keeps its id, bytes, summary, basis and base-model
scope; bases go before the tasks that name them. Adapters the target already holds with
the same bytes are skipped, so a copy can be rerun; one held with other bytes is an
error (nothing of its batch is written).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction, command: Callable) -> None:
    p = command("check", _said(check), "verify a registry file: integrity, sizes and sha256 "
                "of every adapter", sub, connects=False)
    p.add_argument("path", metavar="PATH", help="the registry's SQLite file (the server's "
                                                "registry_path) or its registry_url")
    p = command("copy", _said(copy), "copy every adapter of one registry into another (e.g. "
                "a SQLite file into a fleet's PostgreSQL)", sub, connects=False)
    p.add_argument("source", help="SQLite file or registry URL to read")
    p.add_argument("target", help="registry URL (or SQLite file) to write")


def _said(command: Callable) -> Callable:
    """``command`` with a registry's typed errors (an unreachable database, a refused
    write) printed in one line, exit 1, instead of a traceback (``nolaserve.adapters`` is
    imported only when a registry command runs: the client CLI stays light)."""
    def run(args: argparse.Namespace, connect: Callable) -> int:
        from nolaserve.adapters.errors import ServingError

        try:
            return command(args, connect)
        except ServingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return run


def _check_exists(url: str) -> None:
    """``OSError`` unless the SQLite file ``url`` names (bare or ``sqlite:///``) exists and
    is not empty: opening a missing or empty one makes a registry there, and check and
    copy reported a typo "ok" (a server's own URL is for its server to answer)."""
    path = url.removeprefix("sqlite://")
    if "://" in path:
        return
    if path in ("", ":memory:", "/:memory:"):
        raise OSError(f"{url!r} is an in-memory registry, empty: give a registry file")
    if not Path(path).is_file():
        raise OSError(f"no registry file at {path!r}")
    if Path(path).stat().st_size == 0:
        raise OSError(f"{path!r} is an empty file, not a registry")


def check(args: argparse.Namespace, _connect: Callable) -> int:
    from nolaserve.adapters.registry import iter_all, open_registry

    path = args.path
    _check_exists(path)
    from nolaserve.adapters.errors import RegistryUnavailableError

    try:
        with open_registry(path) as registry:
            problems = registry.verify()
            kinds = Counter(record.kind for record in iter_all(registry))
            where = registry.location if "://" in path else path  # a URL may hold a password
    except RegistryUnavailableError as e:
        if "://" in path or e.__cause__ is None:
            raise
        print(f"{path}: cannot be read as a registry ({e.__cause__}): the file is damaged "
              "or not a registry; restore it from a backup", file=sys.stderr)
        return 1
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) or "empty"
    print(f"{where}: {sum(kinds.values())} adapters ({summary})")
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1


def copy(args: argparse.Namespace, _connect: Callable) -> int:
    from nolaserve.adapters.registry import iter_all, open_registry

    _check_exists(args.source)
    copied = skipped = 0
    with open_registry(args.source) as source:
        records = list(iter_all(source))
        scopes = dict.fromkeys(r.base_model_fingerprint for r in records)
        # each target registry object writes its own scope; with nothing to copy the
        # target is still opened, so that a wrong one fails here and not at the real copy
        for scope in scopes or [None]:
            mine = [r for r in records if r.base_model_fingerprint == scope]
            mine.sort(key=lambda r: r.kind == "rmm-task")  # bases before their tasks
            with open_registry(args.target, scope=scope) as target:
                n, k = _copy_scope(source, target, mine)
            copied, skipped = copied + n, skipped + k
    print(f"copied {copied} adapters, skipped {skipped} already there")
    return 0


def _copy_scope(source, target, records: list, batch: int = 100) -> tuple[int, int]:
    from nolaserve.adapters.errors import AdapterNotFoundError
    from nolaserve.adapters.registry_rows import NewAdapter

    copied = skipped = 0
    for start in range(0, len(records), batch):
        items = []
        for r in records[start:start + batch]:
            try:
                if target.get(r.id).sha256 == r.sha256:
                    skipped += 1
                    continue
            except AdapterNotFoundError:
                pass
            items.append(NewAdapter(r.id, r.kind, source.data(r.id), r.metadata, r.parent))
        target.register_many(items)
        copied += len(items)
    return copied, skipped
