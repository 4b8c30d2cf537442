"""``nolaserve adapters ...``: register, list, show, delete, pin and unpin adapters, convert
PEFT LoRA directories and create random NOLA adapters (torch is imported only by the
offline conversions)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .client import AdapterInfo, Client, NolaserveError

if TYPE_CHECKING:
    from nolaserve.adapters.spec import BaseModelSpec

Connect = Callable[[], Client]
AddCommand = Callable[..., argparse.ArgumentParser]  # (name, func, help, subparsers)


TOKEN_ENV = {"admin_token": "NOLASERVE_ADMIN_TOKEN",
             "inference_token": "NOLASERVE_INFERENCE_TOKEN"}


class UsageError(Exception):
    """A command line that cannot work as given (exit code 2)."""


def connection(args: argparse.Namespace) -> dict:
    """The client keywords of the connection flags; a token not given comes from its
    environment variable (read here, so that ``serve`` can tell a flag from it)."""
    cert = Path(args.tls_root_cert).read_bytes() if args.tls_root_cert else None
    tokens = {key: getattr(args, key) or os.environ.get(env) or None
              for key, env in TOKEN_ENV.items()}
    return {"tls_root_cert": cert, **tokens}


def add_commands(sub: argparse._SubParsersAction, command: AddCommand) -> None:
    """Add the ``adapters`` subcommands; ``command`` adds one with the connection flags."""
    p = command("register", _register, "register an adapter file (NOLA, LoRA, RMM)", sub)
    p.add_argument("adapter_id", metavar="ID", help="id to register it under")
    p.add_argument("file", metavar="FILE", help="adapter file (.safetensors)")
    p.add_argument("--replace", action="store_true", help="replace an adapter with this id")
    p = command("list", _list, "list registered adapters", sub)
    p.add_argument("--page-size", type=int, default=0, metavar="N",
                   help="adapters per page; 0 = the server's default (100)")
    p.add_argument("--page-token", default="", metavar="TOKEN",
                   help="the token a previous page printed; \"\" = the first page")
    p.add_argument("--all", action="store_true", help="walk every page")
    for name, func, text in (("show", _show, "print an adapter's info as JSON"),
                             ("delete", _delete, "delete an adapter"),
                             ("pin", _pin, "keep an adapter in a device slot"),
                             ("unpin", _unpin, "let an adapter be evicted again")):
        command(name, func, text, sub).add_argument("adapter_id", metavar="ID",
                                                    help="a registered adapter id")
    p = command("import-peft", _import_peft, "convert a PEFT LoRA directory to a nolaserve "
                                             "LoRA file (offline)", sub)
    p.add_argument("directory", metavar="DIR", help="adapter_config.json + "
                                                    "adapter_model.safetensors")
    p.add_argument("--base-model", metavar="NAME",
                   help="base model name to record (the server refuses adapters of another "
                        "model; default: the PEFT config's base_model_name_or_path)")
    _output_flags(p)
    _add_create_nola(command("create-nola", _create_nola, "write a NOLA adapter with random "
                                                          "coefficients (demos, tests)", sub))


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT.safetensors", help="file to write")
    p.add_argument("--description", default="", help="free text stored in the file")
    p.add_argument("--register", metavar="ID", help="also register the file under ID "
                   "(on --target)")
    p.add_argument("--replace", action="store_true", help="with --register: replace")


def _add_create_nola(p: argparse.ArgumentParser) -> None:
    _output_flags(p)
    p.add_argument("--seed", type=int, required=True, help="basis and coefficient seed")
    p.add_argument("--rank", type=int, default=8, help="rank r of each adapted linear")
    p.add_argument("--num-basis", type=int, default=256, metavar="K",
                   help="basis matrices per A and per B")
    p.add_argument("--targets", nargs="+", default=["self_attn.q_proj", "self_attn.v_proj"],
                   metavar="NAME", help="linears relative to a decoder layer")
    p.add_argument("--lora-alpha", type=float, default=16.0,
                   help="scale = lora_alpha / rank")
    p.add_argument("--coeff-std", type=float, default=1.0,
                   help="std of the random coefficients (random = gibberish, by design)")
    p.add_argument("--layers", type=int, metavar="N",
                   help="offline: the base model's decoder layers (else asked of --target)")
    p.add_argument("--shapes", nargs="+", metavar="NAME=IN,OUT",
                   help="offline: [in, out] features of the target linears")


def human_size(n: float) -> str:
    """``122880`` -> ``"122.9 KB"`` (decimal units)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_table(infos: Sequence[AdapterInfo]) -> list[str]:
    """Aligned rows: id, kind, rank, size, pinned, targets."""
    rows = [("ID", "KIND", "RANK", "SIZE", "PINNED", "TARGETS")]
    rows += [(a.adapter_id, a.kind, str(a.rank), human_size(a.size_bytes),
              "yes" if a.pinned else "", ",".join(a.target_modules)) for a in infos]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[5]]).rstrip() for r in rows]


def describe(info: AdapterInfo) -> str:
    """One line: id, kind, rank and size (what register, pin and train print)."""
    return f"{info.adapter_id} ({info.kind}, rank {info.rank}, {human_size(info.size_bytes)})"


def _register(args: argparse.Namespace, connect: Connect) -> int:
    if Path(args.file).is_dir():
        raise OSError(f"{args.file} is a directory; a PEFT LoRA directory is imported "
                      f"first: nolaserve adapters import-peft {args.file} OUT.safetensors "
                      f"--register {args.adapter_id}")
    with connect() as client:
        print("registered", describe(client.register_adapter_file(args.adapter_id, args.file,
                                                                    args.replace)))
    return 0


def _list(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        if args.all:
            infos, token = list(client.iter_adapters(args.page_size)), ""
        else:
            infos, token = client.list_adapters(args.page_size, args.page_token)
    print("\n".join(format_table(infos)))
    if token:
        print(f"more: nolaserve adapters list --page-size {args.page_size} --page-token "
              f"{token} (or --all)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        info = asdict(client.get_adapter(args.adapter_id))
    info["created_at"] = iso_time(info["created_at"])
    print(json.dumps(info, indent=2))
    return 0


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO-8601 UTC: ``1764582000.5`` -> ``"2025-12-01T09:40:00Z"``."""
    when = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return when.replace("+00:00", "Z")


def _delete(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        client.delete_adapter(args.adapter_id)
    print("deleted", args.adapter_id)
    return 0


def _pin(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        print("pinned", describe(client.pin_adapter(args.adapter_id)))
    return 0


def _unpin(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        print("unpinned", describe(client.unpin_adapter(args.adapter_id)))
    return 0


def _write(args: argparse.Namespace, connect: Connect, data: bytes, what: str) -> int:
    """Write ``data`` to ``args.out``, then register it when ``--register`` asks."""
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out}: {what}, {human_size(len(data))}")
    if args.register:
        with connect() as client:
            print("registered", describe(client.register_adapter(args.register, data,
                                                                   args.replace)))
    return 0


def _import_peft(args: argparse.Namespace, connect: Connect) -> int:
    from nolaserve.adapters.errors import AdapterError
    from nolaserve.adapters.peft_import import import_peft

    if Path(args.directory).is_file():
        raise OSError(f"{args.directory} is a file; import-peft takes a PEFT LoRA directory "
                      "(a nolaserve adapter file is registered as it is: nolaserve adapters "
                      "register ID FILE)")
    try:
        lora = import_peft(args.directory, description=args.description)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.base_model is not None:
        lora.base_model = args.base_model
    what = f"lora rank {lora.rank}, {lora.num_layers} layers x {lora.target_modules}"
    return _write(args, connect, lora.to_bytes(), what)


def _create_nola(args: argparse.Namespace, connect: Connect) -> int:
    from nolaserve.adapters.nola import MAX_SEED, random_nola

    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    if args.rank < 1 or args.num_basis < 1:
        raise UsageError("--rank and --num-basis must be positive")
    if not (math.isfinite(args.lora_alpha) and math.isfinite(args.coeff_std)
            and args.coeff_std >= 0):
        raise UsageError(f"--lora-alpha must be a finite number and --coeff-std one >= 0, "
                         f"got {args.lora_alpha} and {args.coeff_std}")
    spec = _nola_spec(args, connect)
    missing = [t for t in args.targets if t not in spec.module_shapes]
    if missing:
        raise UsageError(f"no shape for targets {missing}; the base model's linears are "
                         f"{sorted(spec.module_shapes)}")
    nola = random_nola(spec, args.seed, targets=args.targets, rank=args.rank,
                       num_basis=args.num_basis, lora_alpha=args.lora_alpha,
                       coeff_std=args.coeff_std)
    try:  # what registration refuses (its magnitude bound), before writing the file
        nola.check_bounds()
    except ValueError as e:
        raise UsageError(f"{e}: lower --coeff-std or --lora-alpha") from None
    nola.description = args.description
    what = f"nola seed {args.seed}, rank {args.rank}, {spec.num_layers} layers x {args.targets}"
    return _write(args, connect, nola.to_bytes(), what)


def _nola_spec(args: argparse.Namespace, connect: Connect) -> BaseModelSpec:
    """The base model's layers and linear shapes: from --layers/--shapes, else the server."""
    from nolaserve.adapters.spec import BaseModelSpec

    if args.layers is not None or args.shapes:
        if args.layers is None or not args.shapes or args.layers < 1:
            raise UsageError("offline, give both --layers N (N >= 1) and --shapes NAME=IN,OUT")
        return BaseModelSpec(args.layers, dict(_parse_shape(s) for s in args.shapes))
    try:
        with connect() as client:
            info = client.server_info()
    except NolaserveError as e:
        raise NolaserveError(e.code, f"{e.message} (offline, pass --layers and --shapes)"
                             ) from e
    shapes = {m.name: (m.in_features, m.out_features) for m in info.target_modules}
    return BaseModelSpec(info.num_layers, shapes, max_rank=info.max_rank, name=info.base_model)


def _parse_shape(text: str) -> tuple[str, tuple[int, int]]:
    """``"self_attn.q_proj=576,576"`` -> ``("self_attn.q_proj", (576, 576))``."""
    name, _, dims = text.partition("=")
    try:
        n_in, n_out = (int(d) for d in dims.split(","))
    except ValueError:
        raise UsageError(f"--shapes wants NAME=IN,OUT, got {text!r}") from None
    if not name or n_in < 1 or n_out < 1:
        raise UsageError(f"--shapes wants NAME=IN,OUT with positive sizes, got {text!r}")
    return name, (n_in, n_out)
