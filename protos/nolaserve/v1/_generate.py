"""Regenerate the Python stubs in this folder from the .proto files beside them.

    python -m nolaserve.v1._generate          # write
    python -m nolaserve.v1._generate --check  # exit 1 if the stubs are stale

The stubs live next to their sources and import as ``nolaserve.v1``, the proto package,
so grpc_tools' output (``from nolaserve.v1 import x_pb2``) is kept as it is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent  # protos/: the include root of nolaserve/v1/*.proto
PROTOS = ("nolaserve/v1/inference.proto", "nolaserve/v1/admin.proto")


def generate() -> dict[str, str]:
    """File name -> content of every generated stub."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *PROTOS]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return {path.name: path.read_text()
                for path in sorted((Path(out) / "nolaserve" / "v1").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    files = generate()
    stale = [n for n, t in files.items()
             if not (HERE / n).exists() or (HERE / n).read_text() != t]
    if args.check:
        if stale:
            print(f"stale stubs: {stale}; run python -m nolaserve.v1._generate")
            sys.exit(1)
        return
    for name, text in files.items():
        (HERE / name).write_text(text)
    print(f"wrote {len(files)} files to {HERE}")


if __name__ == "__main__":
    main()
