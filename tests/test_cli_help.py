"""The CLI explains itself: every flag of every command has help that shows its default,
`serve` takes its flags, defaults and meanings from the Config fields (the same ones
docs/configuration.md's table is made of), client flags only on client commands, and
errors in CLI words."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from nolaserve.clients import cli
from nolaserve.server.config import Config, config_table, describe

DOCS = Path(__file__).resolve().parent.parent / "docs"
CLIENT_FLAGS = {"--target", "--admin-token", "--inference-token", "--tls-root-cert",
                "--timeout"}


def commands(parser: argparse.ArgumentParser, name: str = "nolaserve"):
    """Every (command name, parser) below ``parser`` that runs something."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")
    if parser.get_default("func") is not None:
        yield name, parser


ALL = list(commands(cli.build_parser()))


def test_every_command_is_found():
    names = {n for n, _ in ALL}
    assert {"nolaserve serve", "nolaserve generate", "nolaserve adapters create-nola",
            "nolaserve rmm build", "nolaserve train-nola", "nolaserve bench"} <= names


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_every_flag_has_help_showing_its_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        text = formatter._expand_help(action) if action.help else ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            assert "(default: " in text, f"{name} {action.option_strings[0]}: {text!r}"
    assert "(default: " in parser.format_help() or name in (
        "nolaserve info", "nolaserve health", "nolaserve registry check",
        "nolaserve registry copy")


def test_serve_flags_are_the_config_fields_with_their_defaults():
    serve = dict(ALL)["nolaserve serve"]
    help_of = {a.option_strings[0]: a.help for a in serve._actions if a.option_strings}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        shown, meaning = describe(f)
        assert flag in help_of, f"config key {f.name} has no serve flag"
        assert help_of[flag].startswith(meaning.replace("`", ""))
        assert f"(default: {shown.replace('`', '')})" in help_of[flag]
    assert "(default: 32)" in help_of["--num-slots"]
    assert "(default: 127.0.0.1)" in help_of["--host"]


def test_docs_configuration_table_is_made_from_the_config_fields():
    assert config_table() in (DOCS / "configuration.md").read_text(), (
        "docs/configuration.md is stale: paste `python -m nolaserve.server.config` into it")


def test_client_flags_only_on_client_commands():
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in ALL}
    assert not (CLIENT_FLAGS - {"--admin-token", "--inference-token"}) & flags[
        "nolaserve serve"]
    for name in ("nolaserve generate", "nolaserve adapters list", "nolaserve train-nola",
                 "nolaserve health"):
        assert flags[name] >= CLIENT_FLAGS, name
    top = cli.build_parser().format_help()
    assert "--target" not in top and "--tls-root-cert" not in top


def test_server_messages_are_shown_in_cli_words():
    """API words become the flags of the command run, and only those."""
    flags = {"replace", "top_p", "max_tokens", "basis_size"}
    assert cli.cli_words("ALREADY_EXISTS: adapter 'a' is already registered; pass "
                         "replace=true to overwrite", flags) == (
        "ALREADY_EXISTS: adapter 'a' is already registered; pass --replace to overwrite")
    assert cli.cli_words("top_p must be in (0, 1], got 2; lower max_tokens", flags) == (
        "--top-p must be in (0, 1], got 2; lower --max-tokens")
    assert cli.cli_words("max_tokens_limit and next_page_token stay", flags) == (
        "max_tokens_limit and next_page_token stay")
    task = "RMM task has basis_size = 1 but the basis has 2"  # a file's key, to register
    assert cli.cli_words(task, {"replace", "file"}) == task


def test_register_conflict_says_pass_replace(capsys, monkeypatch, tmp_path):
    from nolaserve.clients.client import NolaserveError

    class Refusing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def register_adapter_file(self, *args):
            raise NolaserveError("ALREADY_EXISTS", "adapter 'a' is already registered; "
                                 "pass replace=true to overwrite")

    monkeypatch.setattr(cli, "open_client", lambda args: Refusing())
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert cli.main(["adapters", "register", "a", str(tmp_path / "a.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "pass --replace to overwrite" in err and "replace=true" not in err


def test_created_at_is_iso_8601():
    from nolaserve.clients.cli_adapters import iso_time

    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1764582000.7) == "2025-12-01T09:40:00Z"
