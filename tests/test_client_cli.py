"""The Python clients and the CLI against a small fake gRPC server with canned answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import types

import grpc
import pytest
from client_fakes import self_signed_cert, start_fake

from nolaserve.clients.cli import main
from nolaserve.clients.client import AsyncClient, Client, NolaserveError, StreamChunk


@pytest.fixture
def served(monkeypatch):
    for name in ("NOLASERVE_TARGET", "NOLASERVE_ADMIN_TOKEN", "NOLASERVE_INFERENCE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server, target, fake = start_fake()
    yield target, fake
    server.stop(None)



# nine YAML aliases deep, nine each: 9^9 strings from 386 bytes
_ALIAS_BOMB = "target_modules: [&a0 [" + ",".join("l" * 9) + "], " + ", ".join(
    f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)) + "]"


def test_client_imports_neither_torch_nor_the_server():
    code = ("import sys, nolaserve.clients.client, nolaserve.clients.cli; "
            "print(sorted(m for m in sys.modules if m == 'torch'"
            " or m.startswith(('nolaserve.server', 'nolaserve.adapters'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_sends_every_field_and_tokens_go_to_their_service(served):
    target, fake = served
    with Client(target, admin_token="adm", inference_token="inf") as c:
        r = c.generate("hi", adapter_id="a", max_tokens=5, temperature=0.0, top_p=0.5, top_k=3,
                       seed=7, stop=["\n"], ignore_eos=True, request_id="r1")
        chat = c.generate(messages=[{"role": "system", "content": "be brief"}, ("user", "yo")],
                          stop="###")  # a string is one stop string, as OpenAI's and vLLM's
        c.server_info()
    assert (r.text, r.token_ids, r.finish_reason, r.request_id) == ("echo:hi", [1, 2, 3],
                                                                      "length", "r1")
    assert (r.prompt_tokens, r.completion_tokens, chat.text) == (2, 3, "echo:yo")
    s = fake.requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.0, 0.5, 3, 7)
    assert (list(s.stop), s.ignore_eos, fake.requests[0].adapter_id) == (["\n"], True, "a")
    unset = fake.requests[1].sampling
    assert not unset.HasField("temperature") and not unset.HasField("seed")
    assert list(unset.stop) == ["###"]
    assert [m.role for m in fake.requests[1].messages.messages] == ["system", "user"]
    assert fake.auth == [("Generate", "Bearer inf"), ("Generate", "Bearer inf"),
                         ("GetServerInfo", "Bearer adm")]
    with pytest.raises(ValueError, match="exactly one"):
        Client(target).generate("x", messages=[("user", "y")])


def test_stream_and_errors(served):
    target, fake = served
    with Client(target) as c:
        chunks = list(c.generate_stream("hey"))
        assert [ch.text for ch in chunks] == ["hel", "lo", "!"]
        assert chunks[0] == StreamChunk("hel", [1], None, None)
        assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 3
        with pytest.raises(NolaserveError) as e:
            c.generate("x", adapter_id="missing")
        assert (e.value.code, str(e.value)) == ("NOT_FOUND",
                                                "NOT_FOUND: adapter 'missing' is not registered")
        assert isinstance(e.value.__cause__, grpc.RpcError) and isinstance(e.value, grpc.RpcError)
        assert e.value.status_code is grpc.StatusCode.NOT_FOUND
        got = []
        with pytest.raises(NolaserveError, match="RESOURCE_EXHAUSTED: queue is full"):
            got.extend(c.generate_stream("x", adapter_id="missing"))
        assert [ch.text for ch in got] == ["hel"]
    assert fake.auth[0] == ("GenerateStream", None)  # no token configured, none sent


def test_admin_calls_round_trip(served, tmp_path):
    target, fake = served
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"adapter")
    with Client(target, admin_token="adm") as c:
        for i in range(5):
            c.register_adapter(f"a{i}", b"x" * i)
        info = c.register_adapter_file("a0", path, replace=True)
        assert (info.size_bytes, info.sha256) == (7, hashlib.sha256(b"adapter").hexdigest())
        assert info.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]
        assert c.get_adapter("a1").size_bytes == 1
        page, token = c.list_adapters(page_size=2)
        assert ([a.adapter_id for a in page], token) == (["a0", "a1"], "2")
        assert [a.adapter_id for a in c.iter_adapters(page_size=2)] == [f"a{i}" for i in range(5)]
        assert c.pin_adapter("a2").pinned and not c.unpin_adapter("a2").pinned
        c.delete_adapter("a3")
        with pytest.raises(NolaserveError, match="NOT_FOUND: adapter 'a3' is not registered"):
            c.get_adapter("a3")
        with pytest.raises(NolaserveError) as e:
            c.register_adapter("a1", b"")
        assert e.value.code == "ALREADY_EXISTS"
        rmm = c.build_rmm_basis(["a0", "a1"], 2, "b")
        assert [(t.adapter_id, t.source_adapter_id, t.relative_error) for t in rmm.tasks] == [
            ("b/a0", "a0", 0.25), ("b/a1", "a1", 0.25)]
        si = c.server_info()
        assert (si.num_layers, si.target_modules[1].out_features, si.max_rank) == (2, 32, 16)
        assert c.health() == "SERVING"
    assert {a for rpc, a in fake.auth} == {"Bearer adm"}


def test_an_async_client_made_outside_its_loop_says_so():
    """grpc.aio ties a channel to the loop it is made in: an outside probe's client made
    before asyncio.run failed every call with 'attached to a different loop'."""
    with pytest.raises(RuntimeError, match="inside the event loop that uses it"):
        AsyncClient("127.0.0.1:1")


def test_async_client_round_trips(served):
    target, fake = served

    async def run() -> None:
        async with AsyncClient(target, admin_token="adm", inference_token="inf") as c:
            assert (await c.generate("hi", request_id="q")).text == "echo:hi"
            assert [ch.text async for ch in c.generate_stream("hi")] == ["hel", "lo", "!"]
            for i in range(3):
                await c.register_adapter(f"a{i}", b"xy")
            assert (await c.get_adapter("a1")).size_bytes == 2
            assert (await c.list_adapters(page_size=2))[1] == "2"
            assert [a.adapter_id async for a in c.iter_adapters(1)] == ["a0", "a1", "a2"]
            assert (await c.pin_adapter("a0")).pinned
            assert not (await c.unpin_adapter("a0")).pinned
            await c.delete_adapter("a0")
            assert (await c.build_rmm_basis(["a1"], 1, "b")).tasks[0].adapter_id == "b/a1"
            assert (await c.server_info()).base_model == "tiny-llama"
            assert await c.health() == "SERVING"
            with pytest.raises(NolaserveError, match="NOT_FOUND"):
                await c.get_adapter("a0")

    asyncio.run(run())
    assert ("Generate", "Bearer inf") in fake.auth and ("GetAdapter", "Bearer adm") in fake.auth


def test_tls_root_cert(tmp_path):
    cert, key = self_signed_cert()
    server, target, _ = start_fake(grpc.ssl_server_credentials([(key, cert)]))
    try:
        with Client(target, tls_root_cert=cert, timeout=10) as c:
            assert c.health() == "SERVING"
        (tmp_path / "ca.pem").write_bytes(cert)
        assert main(["--target", target, "--tls-root-cert", str(tmp_path / "ca.pem"),
                     "health"]) == 0
        with pytest.raises(NolaserveError, match=r"if it speaks TLS, pass its root "
                                                 r"certificate as tls_root_cert\)$"):
            Client(target, timeout=10).health()
        other, _ = self_signed_cert()
        with pytest.raises(NolaserveError, match="does not verify against tls_root_cert"):
            Client(target, tls_root_cert=other, timeout=10).health()
        with pytest.raises(NolaserveError, match="tls_root_cert holds no PEM certificate"):
            Client(target, tls_root_cert=key)  # gRPC said "Failed to create security ..."
    finally:
        server.stop(None)


def test_tls_mismatch_is_one_line_that_says_what_to_fix(served, tmp_path):
    """A TLS client of a plaintext server: the CLI's only output is the error and its fix,
    in flag words (grpc's own log line of the failed handshake is not printed)."""
    target, _ = served
    cert, _ = self_signed_cert()
    (tmp_path / "ca.pem").write_bytes(cert)
    cli = [sys.executable, "-m", "nolaserve.clients.cli", "--target", target,
           "--tls-root-cert", str(tmp_path / "ca.pem"), "--timeout", "10", "health"]
    out = subprocess.run(cli, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("UNAVAILABLE: ")
    assert out.stderr.endswith("(the server does not speak TLS at this address: connect "
                               "without --tls-root-cert)\n")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate(served, capsys, monkeypatch):
    target, fake = served
    monkeypatch.setenv("NOLASERVE_INFERENCE_TOKEN", "from-env")
    assert run_cli(capsys, "--target", target, "generate", "hi", "--max-tokens", "4", "-v",
                   "--stop", "a", "--stop", "b") == (
        0, "echo:hi\n", "[finish_reason=length prompt_tokens=2 completion_tokens=3]\n")
    assert list(fake.requests[-1].sampling.stop) == ["a", "b"]
    code, out, _ = run_cli(capsys, "generate", "--target", target, "--stream", "--chat",
                           "--adapter", "x", "--temperature", "0", "hey")
    assert (code, out) == (0, "hello!\n")
    req = fake.requests[-1]
    assert (req.adapter_id, req.messages.messages[0].content, req.sampling.temperature) == (
        "x", "hey", 0.0)
    assert fake.auth == [("Generate", "Bearer from-env"), ("GenerateStream", "Bearer from-env")]
    assert run_cli(capsys, "--target", target, "generate", "--adapter", "missing", "x") == (
        1, "", "NOT_FOUND: adapter 'missing' is not registered\n")


@pytest.mark.parametrize(("argv", "said"), [
    (["generate", "--max-tokens", "-3", "hi"], "INVALID_ARGUMENT: --max-tokens must be >= 1"),
    (["generate", "--max-tokens", "0", "hi"], "INVALID_ARGUMENT: --max-tokens must be >= 1"),
    (["generate", "--seed", "-5", "hi"], "INVALID_ARGUMENT: --seed='-5': Value out of range"),
    (["generate", "\udcff\udcfe"], "INVALID_ARGUMENT: prompt="),
    (["adapters", "list", "--page-size", "-1"], "INVALID_ARGUMENT: --page-size='-1'"),
    # an outside probe got protobuf's traceback for these
    (["rmm", "build", "b", "a", "c", "-k", "-1"], "INVALID_ARGUMENT: --basis-size='-1'"),
    (["rmm", "build", "b", "a\udcff", "-k", "1"], "INVALID_ARGUMENT: source_adapter_ids="),
    (["adapters", "show", "x\udcff"], "INVALID_ARGUMENT: adapter_id="),
])
def test_cli_values_the_wire_cannot_hold_are_one_line(served, capsys, argv, said):
    """An outside probe's out-of-range numbers and non-UTF-8 prompt got protobuf's
    traceback (and --max-tokens 0 silently the server's default of 16)."""
    target, fake = served
    sent = len(fake.requests)
    code, _, err = run_cli(capsys, "--target", target, *argv)
    assert (code, err.count("\n"), len(fake.requests)) == (1, 1, sent), err
    assert err.startswith(said), err


def test_cli_max_message_bytes_bounds_what_it_sends(served, capsys, tmp_path):
    """An outside probe could not register a 70 MB adapter with the CLI (its 64 MiB
    limit, no flag) although the server took 128 MiB."""
    target, _ = served
    (tmp_path / "f").write_bytes(b"x" * 4096)
    t = ["--target", target, "--admin-token", "adm"]
    code, _, err = run_cli(capsys, *t, "--max-message-bytes", "1000", "adapters", "register",
                           "big", str(tmp_path / "f"))
    assert code == 1 and err.startswith("RESOURCE_EXHAUSTED") and "is 4096 bytes, more " \
        "than --max-message-bytes (1000) lets a request carry" in err, err
    assert run_cli(capsys, *t, "--max-message-bytes", "8192", "adapters", "register", "big",
                   str(tmp_path / "f"))[0] == 0
    # checked before reading: /dev/zero grew the client's memory to 11 GB in 8 s
    code, _, err = run_cli(capsys, *t, "adapters", "register", "z", "/dev/zero")
    assert code == 1 and "'/dev/zero' is not a regular file" in err, err


def test_cli_generate_cut_short_by_the_server_exits_1(served, capsys):
    target, _ = served
    code, out, err = run_cli(capsys, "--target", target, "generate", "--adapter", "drained",
                             "hi")
    assert (code, out) == (1, "echo:hi\n") and "partial" in err


def test_cli_adapters(served, capsys, tmp_path):
    target, fake = served
    t = ["--target", target, "--admin-token", "adm"]
    (tmp_path / "f").write_bytes(b"12345")
    code, out, _ = run_cli(capsys, *t, "adapters", "register", "b1", str(tmp_path / "f"))
    assert (code, out) == (0, "registered b1 (nola, rank 8, 5 B)\n")
    for i in range(3):
        run_cli(capsys, *t, "adapters", "register", f"c{i}", str(tmp_path / "f"))
    code, out, err = run_cli(capsys, *t, "adapters", "list", "--page-size", "2")
    assert out.split("\n")[0].split() == ["ID", "KIND", "RANK", "SIZE", "PINNED", "TARGETS"]
    assert out.split("\n")[1].split() == ["b1", "nola", "8", "5", "B",
                                          "self_attn.q_proj,self_attn.v_proj"]
    assert (code, len(out.splitlines()), "--page-token 2" in err) == (0, 3, True)
    code, out, err = run_cli(capsys, *t, "adapters", "list", "--page-size", "1", "--all")
    assert (code, [line.split()[0] for line in out.splitlines()], err) == (
        0, ["ID", "b1", "c0", "c1", "c2"], "")
    assert run_cli(capsys, *t, "adapters", "pin", "c1")[1] == "pinned c1 (nola, rank 8, 5 B)\n"
    assert "yes" in run_cli(capsys, *t, "adapters", "list")[1].splitlines()[3]
    assert run_cli(capsys, *t, "adapters", "unpin", "c1")[0] == 0
    code, out, _ = run_cli(capsys, *t, "adapters", "show", "c1")
    assert (code, json.loads(out)["pinned"], json.loads(out)["size_bytes"]) == (0, False, 5)
    assert run_cli(capsys, *t, "adapters", "delete", "c1") == (0, "deleted c1\n", "")
    assert run_cli(capsys, *t, "adapters", "show", "c1") == (
        1, "", "NOT_FOUND: adapter 'c1' is not registered\n")
    assert run_cli(capsys, *t, "adapters", "register", "b1", str(tmp_path / "nope"))[0] == 1
    code, _, err = run_cli(capsys, *t, "adapters", "register", "b1", str(tmp_path))
    assert code == 1 and f"import-peft {tmp_path} OUT.safetensors --register b1" in err
    assert {a for _, a in fake.auth} == {"Bearer adm"}


def test_cli_rmm_info_health_and_usage(served, capsys):
    target, _ = served
    code, out, _ = run_cli(capsys, "--target", target, "rmm", "build", "B", "s1", "s2", "-k", "2")
    assert code == 0 and out.splitlines()[0] == "basis B: 2 tasks"
    assert out.splitlines()[2].split() == ["B/s1", "s1", "0.25"]
    code, out, _ = run_cli(capsys, "--target", target, "info")
    info = json.loads(out)
    assert (code, info["num_layers"], info["target_modules"][0]["name"]) == (
        0, 2, "self_attn.q_proj")
    assert run_cli(capsys, "--target", target, "health") == (0, "SERVING\n", "")
    assert run_cli(capsys)[0] == 2
    assert run_cli(capsys, "generate")[0] == 2  # PROMPT missing
    assert run_cli(capsys, "adapters", "list", "--bogus")[0] == 2
    assert run_cli(capsys, "health", "--target", "h:99999")[0] == 2  # gRPC wrapped it to 34463
    assert run_cli(capsys, "health", "--timeout", "0")[0] == 2
    assert run_cli(capsys, "--help")[0] == 0


def test_cli_create_nola_offline_and_from_the_server(served, capsys, tmp_path):
    from nolaserve.adapters.nola import NolaAdapter

    target, fake = served
    out = tmp_path / "n.safetensors"
    code, stdout, err = run_cli(capsys, "adapters", "create-nola", str(out), "--seed", "42",
                                "--rank", "4", "--num-basis", "16", "--layers", "3", "--shapes",
                                "self_attn.q_proj=64,64", "self_attn.v_proj=64,32")
    assert (code, err) == (0, "") and stdout.startswith(f"wrote {out}: nola seed 42")
    nola = NolaAdapter.from_bytes(out.read_bytes())
    assert (nola.seed, nola.rank, nola.num_layers) == (42, 4, 3)
    assert nola.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]
    assert nola.module_shapes["self_attn.v_proj"] == (64, 32) and nola.alpha.shape[2] == 16
    code, _, _ = run_cli(capsys, "--target", target, "adapters", "create-nola", str(out),
                         "--seed", "7", "--targets", "self_attn.v_proj", "--register", "n1")
    nola = NolaAdapter.from_bytes(out.read_bytes())
    assert (code, nola.seed, nola.num_layers, nola.target_modules) == (
        0, 7, 2, ["self_attn.v_proj"])
    assert nola.base_model == "tiny-llama"
    assert fake.adapters["n1"].size_bytes == out.stat().st_size
    shapes = ["--layers", "2", "--shapes", "self_attn.q_proj=64,64", "self_attn.v_proj=64,32"]
    for bad in (["--layers", "2"], ["--layers", "2", "--shapes", "q=1"],
                ["--layers", "2", "--shapes", "self_attn.q_proj=4,4"], ["--seed", "-1"],
                # files the server would refuse were written (an outside probe)
                [*shapes, "--lora-alpha", "nan"], [*shapes, "--coeff-std", "inf"],
                [*shapes, "--coeff-std", "-1"], [*shapes, "--coeff-std", "1e30"]):
        out.unlink(missing_ok=True)
        code, _, err = run_cli(capsys, "adapters", "create-nola", str(out), "--seed", "1", *bad)
        assert code == 2 and err.startswith("nolaserve: error: ") and not out.exists(), err
    assert "lower --coeff-std or --lora-alpha" in err


def test_cli_refuses_an_empty_target_a_closed_stdin_and_a_file_to_import_peft(
        capsys, tmp_path, monkeypatch):
    """An outside probe's: five lines of gRPC's own log for an empty --target, a
    traceback for `generate -` with stdin closed, and import-peft of a file said the file
    does not exist."""
    code, _, err = run_cli(capsys, "--target", "", "generate", "hi")
    assert code == 2 and "the server address is empty: give HOST:PORT" in err
    for size in ("-1", "0", "x"):
        code, _, err = run_cli(capsys, "--max-message-bytes", size, "generate", "hi")
        assert code == 2 and "is not a number of bytes in 1..2^31-1" in err
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run_cli(capsys, "generate", "-")
    assert code == 2 and "stdin is closed" in err
    (tmp_path / "a.safetensors").write_bytes(b"x")
    code, _, err = run_cli(capsys, "adapters", "import-peft", str(tmp_path / "a.safetensors"),
                           str(tmp_path / "out"))
    assert code == 1 and "is a file; import-peft takes a PEFT LoRA directory" in err


def test_cli_create_nola_without_a_server_says_how(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--target", "127.0.0.1:1", "adapters", "create-nola",
                           str(tmp_path / "n"), "--seed", "1")
    assert code == 1 and err.startswith("UNAVAILABLE: ") and "--layers and --shapes" in err


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers, inside save_pretrained
def test_cli_import_peft(served, capsys, tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    from nolaserve.adapters.lora import LoraAdapter

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "peft")
    target, fake = served
    out = tmp_path / "lora.safetensors"
    code, stdout, _ = run_cli(capsys, "--target", target, "adapters", "import-peft",
                              str(tmp_path / "peft"), str(out), "--register", "l1")
    assert code == 0 and stdout.splitlines()[1].startswith("registered l1")
    lora = LoraAdapter.from_bytes(out.read_bytes())
    assert (lora.rank, lora.num_layers, lora.target_modules) == (
        4, 2, ["self_attn.q_proj", "self_attn.v_proj"])
    peft_a = model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight
    assert lora.factors.modules[(1, "self_attn.v_proj")].A.equal(peft_a.detach())
    assert fake.adapters["l1"].size_bytes == out.stat().st_size
    code, _, err = run_cli(capsys, "adapters", "import-peft", str(tmp_path), str(out))
    assert code == 1 and "adapter_config.json is missing" in err


def test_cli_serve(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, "serve", "--num-slots", "0")
    assert code == 2 and err.startswith(
        "config error: --num-slots (config num_slots) must be a positive")
    (tmp_path / "c.yaml").write_text("port: 7000\nnum_slots: 3\nbogus: 1\n")
    code, _, err = run_cli(capsys, "serve", "--config", str(tmp_path / "c.yaml"))
    assert code == 2 and "unknown config key 'bogus'" in err
    assert run_cli(capsys, "serve", "--config", str(tmp_path / "none.yaml"))[0] == 2
    seen = []
    app = types.ModuleType("nolaserve.server.app")
    app.serve = lambda config: seen.append(config) or 0
    monkeypatch.setitem(sys.modules, "nolaserve.server.app", app)
    (tmp_path / "c.yaml").write_text("port: 7000\nnum_slots: 3\nmodel: m.gguf\n")
    code, _, err = run_cli(capsys, "--admin-token", "s", "serve", "--config",
                           str(tmp_path / "c.yaml"), "--num-slots", "5", "--target-modules",
                           "self_attn.q_proj", "--grace-period-s", "1.5")
    assert code == 0
    c = seen[0]
    assert (c.port, c.num_slots, c.target_modules, c.grace_period_s, c.admin_token) == (
        7000, 5, ["self_attn.q_proj"], 1.5, "s")


def test_cli_serve_token_precedence_is_flag_then_file_then_environment(capsys, monkeypatch,
                                                                       tmp_path):
    """The environment's token beat the config file's, so a token rotated in the file
    left the old one as the only one that worked (an outside probe)."""
    seen = []
    app = types.ModuleType("nolaserve.server.app")
    app.serve = lambda config: seen.append(config) or 0
    monkeypatch.setitem(sys.modules, "nolaserve.server.app", app)
    monkeypatch.setenv("NOLASERVE_ADMIN_TOKEN", "env")
    monkeypatch.setenv("NOLASERVE_INFERENCE_TOKEN", "env-inf")
    (tmp_path / "c.yaml").write_text("admin_token: file\n")
    for argv in (["serve", "--config"], ["--admin-token", "before", "serve", "--config"],
                 ["serve", "--admin-token", "flag", "--config"]):
        assert run_cli(capsys, *argv, str(tmp_path / "c.yaml"))[0] == 0
    assert [(c.admin_token, c.inference_token) for c in seen] == [
        ("file", "env-inf"), ("before", "env-inf"), ("flag", "env-inf")]


def test_cli_serve_takes_sizes_as_the_docs_show_them_and_says_what_a_key_wants(
        capsys, monkeypatch, tmp_path):
    """An outside reader of the docs: "2 GiB" defaults that only integers could set, wrong
    types that named no type, and a token both in the environment and in a file that was
    silently the file's."""
    seen = []
    app = types.ModuleType("nolaserve.server.app")
    app.serve = lambda config: seen.append(config) or 0
    monkeypatch.setitem(sys.modules, "nolaserve.server.app", app)
    (tmp_path / "c.yaml").write_text("warm_cache_bytes: 128MiB\n")
    assert run_cli(capsys, "serve", "--config", str(tmp_path / "c.yaml"), "--host-cache-bytes",
                   "1 GiB", "--max-message-bytes", "64MB", "--peft-cache-bytes", "4096")[0] == 0
    c = seen[0]
    assert (c.warm_cache_bytes, c.host_cache_bytes, c.max_message_bytes, c.peft_cache_bytes
            ) == (128 << 20, 1 << 30, 64 * 10**6, 4096)
    (tmp_path / "t").write_text("file-token")
    monkeypatch.setenv("NOLASERVE_ADMIN_TOKEN", "env-token")
    bad = {("--host-cache-bytes", "lots"): "--host-cache-bytes (config host_cache_bytes) "
           'must be an integer number of bytes, or a size such as "1 GiB"',
           ("--admin-token-file", str(tmp_path / "t")): "--admin-token-file (config "
           "admin_token_file) is set, and so is NOLASERVE_ADMIN_TOKEN in the environment",
           ("--admin-token", "x", "--admin-token-file", str(tmp_path / "t")): "both "
           "--admin-token (config admin_token) and --admin-token-file (config "
           "admin_token_file) are set: keep one"}
    (tmp_path / "bin").write_bytes(b"\xa4token")
    bad[("--inference-token-file", str(tmp_path / "bin"))] = (
        "(config inference_token_file): " + str(tmp_path / "bin") + " is not UTF-8 text")
    for flags, message in bad.items():
        code, _, err = run_cli(capsys, "serve", *flags)
        assert code == 2 and message in err, err
    for line, message in {"num_slots: four": "(config num_slots) must be an integer, got "
                          "'four'", "target_modules: q": "must be a list of strings",
                          "num_slots: -5\nnum_slots: 2": "c.yaml, line 2: config key "
                          "'num_slots' is set twice: keep one",
                          "num_slots: !!python/object:os.system x": "c.yaml, line 1: could "
                          "not determine a constructor",
                          "num_slots: [2": "expected ',' or ']'",
                          # an outside probe's: a hang, tracebacks, a misread value
                          _ALIAS_BOMB: "the flag followed by them), got [['l', 'l', 'l', "
                          "'l', ...], " + ", ".join(["[[...], [...], [...], [...], ...]"] * 3)
                          + ", ...]\n",
                          "target_modules: " + "[" * 600 +
                          "]" * 600: "the YAML nests too deep to read",
                          "kv_cache_bytes: 99999999999999999999999999": "config "
                          "kv_cache_bytes) must be at most 9223372036854775807",
                          "num_slots: 99999999999999999999": "must be at most 65536",
                          "max_message_bytes: 3 GiB": "must be at most 2147483647"}.items():
        (tmp_path / "c.yaml").write_text(line + "\n")
        code, _, err = run_cli(capsys, "serve", "--config", str(tmp_path / "c.yaml"))
        assert code == 2 and message in err, err
    (tmp_path / "c.yaml").write_bytes(b"model: caf\xe9\n")
    code, _, err = run_cli(capsys, "serve", "--config", str(tmp_path / "c.yaml"))
    assert code == 2 and "c.yaml is not UTF-8 text (invalid continuation byte" in err, err
    # a YAML merge key may set what it merges again (YAML's override, not a duplicate)
    (tmp_path / "c.yaml").write_text("<<: {num_slots: 2, max_rank: 4}\nnum_slots: 3\n")
    assert run_cli(capsys, "serve", "--config", str(tmp_path / "c.yaml"))[0] == 0
    assert (seen[-1].num_slots, seen[-1].max_rank) == (3, 4)



@pytest.mark.parametrize(("kwargs", "said"), [
    ({"target": 5}, "target must be a HOST:PORT string"),
    ({"tls_root_cert": "-----BEGIN CERTIFICATE-----"}, "tls_root_cert must be the PEM"),
    ({"timeout": 0}, "timeout must be a number of seconds > 0"),
    ({"timeout": float("nan")}, "timeout must be a number of seconds > 0"),
    ({"max_message_bytes": -5}, "max_message_bytes must be in 1..2^31-1"),
    ({"inference_token": "a\nb"}, "printable characters (no newline)"),
])
def test_client_arguments_that_would_fail_every_call_are_refused_at_once(kwargs, said):
    """An outside probe's: a timeout of 0 or NaN and a negative size were taken (each
    call then timed out, or had no limit), a str certificate or target and a token with a
    newline raised TypeError, AttributeError or INTERNAL."""
    kwargs = {"target": "127.0.0.1:1", **kwargs}
    with pytest.raises(NolaserveError, match="INVALID_ARGUMENT") as e:
        Client(**kwargs)
    assert said in e.value.message

    async def in_a_loop():
        with pytest.raises(NolaserveError, match="INVALID_ARGUMENT") as e:
            AsyncClient(**kwargs)
        return e.value.message
    assert said in asyncio.run(in_a_loop())


def test_client_call_arguments_are_checked_before_sending(served):
    target, fake = served
    sent = len(fake.requests)
    with Client(target) as c:
        for call, said in ((lambda: c.generate(messages="hi"), "messages must be a list"),
                           (lambda: c.generate("hi", stop=5), "stop must be a string or"),
                           (lambda: c.generate("hi", n=0), "n must be >= 1, got 0"),
                           (lambda: c.build_rmm_basis("abc", 1, "b"), "not one string")):
            with pytest.raises(NolaserveError, match="INVALID_ARGUMENT") as e:
                call()
            assert said in e.value.message
    assert len(fake.requests) == sent
