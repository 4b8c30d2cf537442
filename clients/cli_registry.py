"""``nolaserve registry check PATH``: verify an adapter registry file offline.

Opens the SQLite registry (a running server may hold it: WAL readers do not block it),
runs ``Registry.verify`` (SQLite's integrity check plus every row's size and sha256) and
counts the adapters by kind with ``iter_all``. Exit 0 when it is sound, 1 otherwise.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction, command: Callable) -> None:
    p = command("check", check, "verify a registry file: integrity, sizes and sha256 of "
                                "every adapter", sub)
    p.add_argument("path", metavar="PATH", help="the registry's SQLite file "
                                                "(the server's registry_path)")


def check(args: argparse.Namespace, _connect: Callable) -> int:
    from nolaserve.adapters.registry import Registry, iter_all

    path = Path(args.path)
    if not path.is_file():
        raise OSError(f"no registry file at {str(path)!r}")
    with Registry(path) as registry:
        problems = registry.verify()
        kinds = Counter(record.kind for record in iter_all(registry))
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())) or "empty"
    print(f"{path}: {sum(kinds.values())} adapters ({summary})")
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1
