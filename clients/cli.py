"""The ``nolaserve`` command: run the server, generate, manage adapters, build RMM bases.

    nolaserve serve [--config FILE] [--model M] [--device D] [--port P] ...
    nolaserve generate [--adapter ID] [--stream] [--max-tokens N] [--chat] PROMPT
    nolaserve adapters register|list|show|delete|pin|unpin|import-peft|create-nola ...
    nolaserve rmm build BASIS_ID SOURCE_ID... --basis-size K
    nolaserve train-nola DATA.jsonl --out OUT.safetensors [--register ID] ...
    nolaserve registry check PATH|URL | copy SOURCE TARGET
    nolaserve info | health

Exit codes: 0 ok, 1 a failed RPC (``CODE: message`` on stderr) or file error, 2 usage or
config error. Neither torch nor the server is imported unless a command needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import asdict

# Before grpc loads: its C core logs a failed TLS handshake at INFO, beside the one-line
# error this command prints.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import bench_cli, cli_adapters, cli_registry, cli_train  # noqa: E402
from .cli_adapters import Connect, UsageError, connection  # noqa: E402
from .client import DEFAULT_TARGET, Client, NolaserveError  # noqa: E402

# The connection flags' own keys (`serve` takes --admin-token/--inference-token as config).
_TOKEN_KEYS = ("admin_token", "inference_token")
# API words in server messages -> the flags a CLI user types (those of the command run).
_CLI_WORDS = re.compile(r"\b(replace)=true\b|(?<![\w-])(max_tokens|top_p|top_k|page_size|"
                        r"page_token|basis_size|tls_root_cert|max_message_bytes|seed)(?!\w)")


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless it has none (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default" in text or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        shown = '""' if action.default == "" else "%(default)s"
        if isinstance(action.default, list):
            shown = " ".join(map(str, action.default)) or "none"
        return f"{text} (default: {shown})"


def cli_words(message: str, flags: set[str]) -> str:
    """A server message in CLI words: ``pass replace=true`` -> ``pass --replace``, for
    the ``flags`` (their argparse names) of the command run; other words stay (an RMM
    task file's ``basis_size`` is not ``register``'s flag)."""
    def flag(m: re.Match) -> str:
        word = m.group(1) or m.group(2)
        return "--" + word.replace("_", "-") if word in flags else m.group(0)

    return _CLI_WORDS.sub(flag, message)


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
        print(cli_words(str(e), set(vars(args))), file=sys.stderr)
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
    return Client(args.target, timeout=args.timeout, max_message_bytes=args.max_message_bytes,
                  **connection(args))


def _connection_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """The connection flags of client commands; the top level takes them too (hidden from
    its help) so that they may come before the command name."""
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    def help(text: str) -> str:
        return argparse.SUPPRESS if with_defaults else text

    env = os.environ
    parser.add_argument("--target", metavar="HOST:PORT", type=_target,
                        default=default(env.get("NOLASERVE_TARGET", DEFAULT_TARGET)),
                        help=help(f"server address (env NOLASERVE_TARGET; default: "
                                  f"{DEFAULT_TARGET})"))
    parser.add_argument("--admin-token", metavar="TOKEN",
                        default=default(None),
                        help=help("bearer token of Admin calls (env NOLASERVE_ADMIN_TOKEN; "
                                  "default: none)"))
    parser.add_argument("--inference-token", metavar="TOKEN",
                        default=default(None),
                        help=help("bearer token of Inference calls (env "
                                  "NOLASERVE_INFERENCE_TOKEN; default: none)"))
    parser.add_argument("--tls-root-cert", metavar="PEM", default=default(None),
                        help=help("connect with TLS, trusting this root certificate "
                                  "(default: plaintext)"))
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=default(None),
                        help=help("deadline of each call (default: none)"))
    parser.add_argument("--max-message-bytes", type=_message_bytes, metavar="BYTES",
                        default=default(64 << 20),
                        help=help("largest message this client sends or takes, e.g. to "
                                  "register an adapter over 64 MiB (the server's "
                                  "max_message_bytes bounds it too; default: 67108864)"))


def _target(text: str) -> str:
    if not text.strip():  # gRPC logged five lines of its own for it, then UNKNOWN
        raise argparse.ArgumentTypeError("the server address is empty: give HOST:PORT")
    port = text.rpartition(":")[2]
    if port.isdigit() and not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port {port} of {text!r} is not in 1..65535")
    return text


def _message_bytes(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 0 < size < 2**31:  # a negative size was no limit, 0 failed each call
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes in 1..2^31-1")
    return size


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nolaserve", description="Serve thousands of NOLA/LoRA/RMM adapters over one LLM. "
        "`nolaserve COMMAND --help` shows a command's flags and their defaults.",
        formatter_class=HelpFormatter)
    _connection_flags(parser, with_defaults=True)
    client = argparse.ArgumentParser(add_help=False)
    _connection_flags(client, with_defaults=False)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def group(name: str, text: str) -> argparse._SubParsersAction:
        return sub.add_parser(name, help=text, description=text,
                              formatter_class=HelpFormatter).add_subparsers(
            title="commands", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[..., int], text: str,
                where: argparse._SubParsersAction = sub, *,
                connects: bool = True) -> argparse.ArgumentParser:
        p = where.add_parser(name, help=text, description=text, formatter_class=HelpFormatter,
                             parents=[client] if connects else [])
        p.set_defaults(func=func)
        return p

    _add_serve(command("serve", _serve, "run the server (gRPC and the OpenAI HTTP API)",
                       connects=False))
    _add_generate(command("generate", _generate, "generate text with the base model or an "
                                                 "adapter"))
    cli_adapters.add_commands(group("adapters", "register and manage adapters"), command)
    p = command("build", _rmm_build, "compress registered adapters into K basis models "
                                     "(tasks become BASIS_ID/SOURCE_ID)",
                group("rmm", "Reversible Model Merging"))
    p.add_argument("basis_id", metavar="BASIS_ID", help="id of the new basis")
    p.add_argument("source_ids", metavar="SOURCE_ID", nargs="+",
                   help="registered adapters to compress (same target modules)")
    p.add_argument("--basis-size", "-k", type=int, required=True, metavar="K",
                   help="basis models K (K < the number of sources loses information)")
    cli_registry.add_commands(group("registry", "check or copy a registry"), command)
    bench_cli.add_arguments(command("bench", bench_cli.command, "open-loop load generator"))
    cli_train.add_arguments(command("train-nola", cli_train.command, "train a NOLA adapter"))
    command("info", _info, "print the server's model and limits as JSON")
    p = command("health", _health, "print the grpc.health.v1 status (exit 1 unless SERVING)")
    p.add_argument("--service", default="", help="a sub-service: `registry` (the adapter "
                   "registry's database), or a gRPC service name; default: the server")
    return parser


def _add_serve(p: argparse.ArgumentParser) -> None:
    """One flag per Config key (--num-slots for num_slots), its help and default taken from
    the field; the flags' argparse default is None so that --config's values stay."""
    from nolaserve.server.config import Config, describe

    p.add_argument("--config", metavar="FILE", help="YAML file of config keys "
                   "(docs/configuration.md); flags override its keys (default: none)")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        shown, meaning = describe(f)
        text = f"{meaning} (default: {shown})".replace("`", "")
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(hints[f.name]) is list:
            p.add_argument(flag, dest=f"cfg_{f.name}", nargs="+", metavar="NAME", help=text)
        elif hints[f.name] is bool:
            p.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction,
                           default=None, help=text)
        else:  # a size ("1 GiB") is parsed by Config
            p.add_argument(flag, dest=f"cfg_{f.name}", help=text,
                           type=str if f.name.endswith("_bytes") else hints[f.name],
                           metavar=f.name.split("_")[-1].upper())


def _serve(args: argparse.Namespace, connect: Connect) -> int:
    """Load the config (YAML, then flags; tokens also from the environment) and serve."""
    import yaml

    from nolaserve.server.config import Config

    overrides = {k.removeprefix("cfg_"): v for k, v in vars(args).items()
                 if k.startswith("cfg_")}
    for key in _TOKEN_KEYS:  # given before the command name (Config.load reads the env)
        if overrides[key] is None and not overrides.get(f"{key}_file"):
            overrides[key] = getattr(args, key, None)
    try:
        config = Config.load(args.config, **overrides)
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"config error: {_flag_words(str(e))}", file=sys.stderr)
        return 2
    from nolaserve.adapters.errors import ServingError
    from nolaserve.server.app import serve

    try:
        return serve(config)
    except (OSError, ValueError, RuntimeError, ServingError) as e:  # a port in use, model
        print(f"nolaserve failed to start: {e}", file=sys.stderr)  # load, registry file
        return 1


def _flag_words(message: str) -> str:
    """``config num_slots must ...`` -> ``--num-slots (config num_slots) must ...``."""
    return re.sub(r"\bconfig (?!key\b|file\b)(\w+)\b",
                  lambda m: f"--{m.group(1).replace('_', '-')} (config {m.group(1)})", message)


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    p.add_argument("--adapter", default="", metavar="ID",
                   help="adapter id; \"\" = the base model")
    p.add_argument("--stream", action="store_true", help="print the text as it is produced")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="most tokens to generate")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="0 = greedy (default: 1)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (default: 1)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--seed", type=int, metavar="S",
                   help="reproducible sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past EOS")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message (the model's chat template)")
    p.add_argument("--request-id", default="", metavar="ID",
                   help="id in the server's logs; \"\" = the server picks one")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print finish reason and token counts on stderr")


def _generate(args: argparse.Namespace, connect: Connect) -> int:
    if args.prompt == "-" and sys.stdin is None:
        raise UsageError("PROMPT is - but stdin is closed: pipe the prompt in, or give it")
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
    if finish == "cancelled":  # the server ended it early (draining): the text is partial
        print("the server cancelled the request before it finished (it may be shutting "
              "down): the text above is partial; retry", file=sys.stderr)
        return 1
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
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
