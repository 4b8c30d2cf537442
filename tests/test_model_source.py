"""Model-source errors say what is wrong: a missing local directory by name, a hub id
without network within seconds (cache first, then a short check) with what to do."""

import pytest
from huggingface_hub import constants
from server_helpers import free_port

from nolaserve.clients import cli
from nolaserve.server.engine import model_loader
from nolaserve.server.engine.model_loader import ModelLoadError, load_model


@pytest.mark.parametrize("source", ["./nonexistent-dir", "../no/such/dir", "a/b/c",
                                    "~/nolaserve-no-such-dir"])
def test_a_missing_local_path_says_no_such_directory(source):
    with pytest.raises(ModelLoadError, match=f"^no such directory: {source}$"):
        load_model(source, device="cpu")


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory: .*weights.bin"):
        load_model(str(tmp_path / "weights.bin"), device="cpu")


def test_a_hub_id_offline_and_not_cached_says_what_to_do(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("nolaserve-tests/no-such-model", device="cpu")
    text = str(info.value)
    assert "not in the hub cache" in text and "local checkpoint directory" in text


def test_a_hub_id_without_network_fails_with_a_hint(monkeypatch):
    """The hub's address is a closed local port: the check fails at once, not after a
    download's retries."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    calls = []
    real = model_loader._pretrained
    monkeypatch.setattr(model_loader, "_pretrained",
                        lambda src, dtype, **kw: calls.append(kw) or real(src, dtype, **kw))
    with pytest.raises(ModelLoadError) as info:
        load_model("nolaserve-tests/no-such-model", device="cpu")
    text = str(info.value)
    assert "cannot be reached" in text and "HF_HUB_OFFLINE=1" in text
    assert calls == [{"local_files_only": True}]  # the cache only; no download attempted


def test_serve_reports_a_missing_model_directory(capsys):
    code = cli.main(["serve", "--model", "./nonexistent-dir", "--port", "0",
                     "--metrics-port", "0", "--http-port", "0", "--registry-path", ":memory:"])
    assert code == 1
    assert "no such directory: ./nonexistent-dir" in capsys.readouterr().err
