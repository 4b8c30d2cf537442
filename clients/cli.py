"""The ``nolaserve`` command: run the server, generate, manage adapters, build RMM bases.

    nolaserve serve [--config FILE] [--model M] [--device D] [--port P] ...
    nolaserve generate [--adapter ID] [--stream] [--max-tokens N] [--chat] PROMPT
    nolaserve adapters register|list|show|delete|pin|unpin|import-peft|create-nola ...
    nolaserve rmm build BASIS_ID SOURCE_ID... --basis-size K
    nolaserve train-nola DATA.jsonl --out OUT.safetensors [--register ID] ...
    nolaserve registry check PATH
    nolaserve info | health

Exit codes: 0 ok, 1 a failed RPC (``CODE: message`` on stderr) or file error, 2 usage or
config error. Neither torch nor the server is imported unless a command needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import bench_cli, cli_adapters, cli_registry, cli_train
from .cli_adapters import Connect, UsageError
from .client import DEFAULT_TARGET, Client, NolaserveError

# Config keys that `serve` takes as flags (--num-slots for num_slots); list keys take 1+ values.
SERVE_FLAGS: dict[str, type] = {
    "model": str, "device": str, "dtype": str, "cache_dir": str, "target_modules": list,
    "registry_path": str, "num_slots": int, "max_rank": int, "max_num_basis": int,
    "host_cache_entries": int, "host_cache_bytes": int, "max_num_seqs": int,
    "max_num_batched_tokens": int, "block_size": int, "kv_cache_bytes": int,
    "max_prompt_tokens": int, "max_tokens_limit": int, "max_queued_requests": int,
    "max_message_bytes": int, "host": str, "port": int, "metrics_port": int,
    "http_port": int, "adapter_dirs": list, "tls_cert": str, "tls_key": str,
    "grace_period_s": float,
        "admin_token_file": str, "inference_token_file": str,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args, lambda: open_client(args))
    except NolaserveError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"nolaserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def open_client(args: argparse.Namespace) -> Client:
    """A ``Client`` from the connection flags."""
    cert = Path(args.tls_root_cert).read_bytes() if args.tls_root_cert else None
    return Client(args.target, admin_token=args.admin_token or None,
                  inference_token=args.inference_token or None, tls_root_cert=cert,
                  timeout=args.timeout)


def _connection_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """The connection flags; subcommands repeat them without defaults so that they are
    accepted before or after the subcommand name."""
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    env = os.environ
    parser.add_argument("--target", metavar="HOST:PORT",
                        default=default(env.get("NOLASERVE_TARGET", DEFAULT_TARGET)),
                        help="server address host:port (env NOLASERVE_TARGET)")
    parser.add_argument("--admin-token", metavar="TOKEN",
                        default=default(env.get("NOLASERVE_ADMIN_TOKEN")),
                        help="bearer token of Admin calls (env NOLASERVE_ADMIN_TOKEN); "
                             "`serve` requires it of clients")
    parser.add_argument("--inference-token", metavar="TOKEN",
                        default=default(env.get("NOLASERVE_INFERENCE_TOKEN")),
                        help="bearer token of Inference calls (env NOLASERVE_INFERENCE_TOKEN); "
                             "`serve` requires it of clients")
    parser.add_argument("--tls-root-cert", metavar="PEM", default=default(None),
                        help="connect with TLS, trusting this root certificate")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", default=default(None),
                        help="deadline of each call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nolaserve", description="Serve thousands of NOLA/LoRA/RMM adapters over one LLM.")
    _connection_flags(parser, with_defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, with_defaults=False)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, func: Callable[..., int], text: str,
                where: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        p = where.add_parser(name, help=text, description=text, parents=[common])
        p.set_defaults(func=func)
        return p

    _add_serve(command("serve", _serve, "run the server (gRPC and the OpenAI HTTP API)"))
    _add_generate(command("generate", _generate, "generate text with the base model or an "
                                                 "adapter"))
    cli_adapters.add_commands(sub.add_parser("adapters", help="register and manage adapters")
                              .add_subparsers(title="commands", metavar="COMMAND",
                                              required=True), command)
    rmm = sub.add_parser("rmm", help="Reversible Model Merging").add_subparsers(
        title="commands", metavar="COMMAND", required=True)
    p = command("build", _rmm_build, "compress registered adapters into K basis models "
                                     "(tasks become BASIS_ID/SOURCE_ID)", rmm)
    p.add_argument("basis_id", metavar="BASIS_ID")
    p.add_argument("source_ids", metavar="SOURCE_ID", nargs="+")
    p.add_argument("--basis-size", "-k", type=int, required=True, metavar="K")
    cli_registry.add_commands(sub.add_parser("registry", help="inspect a registry file")
                              .add_subparsers(title="commands", metavar="COMMAND",
                                              required=True), command)
    bench_cli.add_arguments(command("bench", bench_cli.command, "open-loop load generator"))
    cli_train.add_arguments(command("train-nola", cli_train.command, "train a NOLA adapter"))
    command("info", _info, "print the server's model and limits as JSON")
    command("health", _health, "print the grpc.health.v1 status (exit 1 unless SERVING)")
    return parser


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (docs/configuration.md); "
                                                    "flags override its keys")
    for key, kind in SERVE_FLAGS.items():
        flag = "--" + key.replace("_", "-")
        if kind is list:
            p.add_argument(flag, dest=f"cfg_{key}", nargs="+", metavar="NAME", help=f"config {key}")
        else:
            p.add_argument(flag, dest=f"cfg_{key}", type=kind, help=f"config {key}",
                           metavar=key.split("_")[-1].upper())


def _serve(args: argparse.Namespace, connect: Connect) -> int:
    """Load the config (YAML, then flags, then the token flags) and run the server."""
    import yaml

    from nolaserve.server.config import Config

    overrides = {key: getattr(args, f"cfg_{key}") for key in SERVE_FLAGS}
    overrides.update(admin_token=args.admin_token, inference_token=args.inference_token)
    try:
        config = Config.load(args.config, **overrides)
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    model = config.model or "SmolLM2-135M-Instruct (embedded)"
    first_start = " (first start converts the GGUF once, ~1 min)"
    gguf = not config.model or config.model.endswith(".gguf")
    print(f"loading model {model} on {config.device}{first_start if gguf else ''} ...",
          file=sys.stderr, flush=True)
    from nolaserve.server.app import serve

    try:
        return serve(config)
    except (OSError, ValueError, RuntimeError) as e:  # model load, bind, bad model dir
        print(f"nolaserve failed to start: {e}", file=sys.stderr)
        return 1


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    p.add_argument("--adapter", default="", metavar="ID", help="adapter id (default: base model)")
    p.add_argument("--stream", action="store_true", help="print the text as it is produced")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 1)")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K")
    p.add_argument("--seed", type=int, metavar="S", help="reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message (the model's chat template)")
    p.add_argument("--request-id", default="", metavar="ID")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print finish reason and token counts on stderr")


def _generate(args: argparse.Namespace, connect: Connect) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    text = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
    options = dict(adapter_id=args.adapter, max_tokens=args.max_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                   request_id=args.request_id, **text)
    with connect() as client:
        if args.stream:
            finish, usage = None, None
            for chunk in client.generate_stream(**options):
                print(chunk.text, end="", flush=True)
                finish, usage = chunk.finish_reason or finish, chunk.usage or usage
            print(flush=True)
            counts = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        else:
            result = client.generate(**options)
            print(result.text)
            finish, counts = result.finish_reason, (result.prompt_tokens,
                                                    result.completion_tokens)
    if args.verbose:
        print(f"[finish_reason={finish} prompt_tokens={counts[0]} "
              f"completion_tokens={counts[1]}]", file=sys.stderr)
    return 0


def _rmm_build(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        result = client.build_rmm_basis(args.source_ids, args.basis_size, args.basis_id)
    print(f"basis {result.basis_id}: {len(result.tasks)} tasks")
    width = max([len(t.adapter_id) for t in result.tasks] + [4])
    print(f"{'TASK':<{width}}  {'SOURCE':<{width}}  RELATIVE_ERROR")
    for t in result.tasks:
        print(f"{t.adapter_id:<{width}}  {t.source_adapter_id:<{width}}  "
              f"{t.relative_error:.4g}")
    return 0


def _info(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        print(json.dumps(asdict(client.server_info()), indent=2))
    return 0


def _health(args: argparse.Namespace, connect: Connect) -> int:
    with connect() as client:
        status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
