"""``nolaserve registry check PATH|URL``: verify an adapter registry offline.

Opens the registry, a SQLite file or a ``postgresql://`` URL (a running server may hold
it: readers do not block it), runs ``Registry.verify`` (SQLite's integrity check, then
every row's size and sha256) and
counts the adapters by kind with ``iter_all``. Exit 0 when it is sound, 1 otherwise.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction, command: Callable) -> None:
    p = command("check", check, "verify a registry file: integrity, sizes and sha256 of "
                                "every adapter", sub, connects=False)
    p.add_argument("path", metavar="PATH", help="the registry's SQLite file (the server's "
                                                "registry_path) or its registry_url")


def check(args: argparse.Namespace, _connect: Callable) -> int:
    from nolaserve.adapters.registry import iter_all, open_registry

    path = args.path
    if "://" not in path and not Path(path).is_file():
        raise OSError(f"no registry file at {path!r}")
    with open_registry(path) as registry:
        problems = registry.verify()
        kinds = Counter(record.kind for record in iter_all(registry))
        where = registry.location if "://" in path else path  # a URL may hold a password
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) or "empty"
    print(f"{where}: {sum(kinds.values())} adapters ({summary})")
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1
