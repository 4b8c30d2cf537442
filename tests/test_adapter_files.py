"""Reading adapter paths (``load_lora_adapter``, the offline ``LLM``): every OSError is a
typed error naming the path, and a path is opened once and checked by its descriptor, so a
directory swapped for a symlink mid-load never makes the server read outside adapter_dirs
(issue #29: 95 of 1,815 racing loads read an outside file)."""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from nolaserve.adapters import files
from nolaserve.adapters.errors import (
    AdapterError,
    InvalidAdapterError,
    LimitExceededError,
    PathNotAllowedError,
)
from nolaserve.adapters.lora import LoraAdapter
from nolaserve.adapters.sources import read_adapter_source

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def write_peft(directory, value: float) -> None:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({f"{KEY}.lora_A.weight": torch.full((2, 4), value),
               f"{KEY}.lora_B.weight": torch.full((4, 2), value)},
              directory / "adapter_model.safetensors")


def factor(data: bytes) -> float:
    return float(LoraAdapter.from_bytes(data).factors.modules[(0, "self_attn.q_proj")].A[0, 0])


@pytest.fixture
def dirs(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    write_peft(allowed / "good", 1.0)
    write_peft(outside / "evil", 9.0)
    (outside / "evil.safetensors").write_bytes(read_adapter_source(outside / "evil", None,
                                                                   1 << 20))
    return allowed, outside


def swap_for_symlink(path, target) -> None:
    path.rename(path.with_name(path.name + ".old"))
    path.symlink_to(target)


def test_a_symlink_to_outside_is_refused(dirs):
    allowed, outside = dirs
    (allowed / "dirlink").symlink_to(outside / "evil")
    (allowed / "filelink").symlink_to(outside / "evil.safetensors")
    (allowed / "good" / "adapter_config.json").unlink()
    (allowed / "good" / "adapter_config.json").symlink_to(outside / "evil" /
                                                          "adapter_config.json")
    for path in ("dirlink", "filelink", "good"):
        with pytest.raises(PathNotAllowedError, match="adapter_dirs"):
            read_adapter_source(allowed / path, [str(allowed)], 1 << 20)


def test_a_swap_after_the_path_check_is_refused_by_the_descriptor_check(dirs, monkeypatch):
    allowed, outside = dirs
    real_confine = files.confine
    calls = []

    def confine_then_swap(path, allowed_dirs):
        real = real_confine(path, allowed_dirs)
        if not calls:  # the path check passed; now the attacker swaps the directory
            swap_for_symlink(allowed / "good", outside / "evil")
        calls.append(path)
        return real

    monkeypatch.setattr(files, "confine", confine_then_swap)
    with pytest.raises(PathNotAllowedError, match="leads outside"):
        read_adapter_source(allowed / "good", [str(allowed)], 1 << 20)


def test_reads_go_through_the_checked_descriptor(dirs, monkeypatch):
    allowed, outside = dirs
    expected = read_adapter_source(allowed / "good", [str(allowed)], 1 << 20)
    real_check = files.check_fd
    swapped = []

    def check_then_swap(fd, path, allowed_dirs):
        real_check(fd, path, allowed_dirs)
        if not swapped:  # the directory was checked; swap it before its files are read
            swap_for_symlink(allowed / "good", outside / "evil")
            swapped.append(path)

    monkeypatch.setattr(files, "check_fd", check_then_swap)
    got = read_adapter_source(allowed / "good", [str(allowed)], 1 << 20)
    assert swapped and (allowed / "good").is_symlink()
    assert got == expected and factor(got) == 1.0  # the checked directory's files


def test_a_directory_removed_mid_load_is_a_typed_error(dirs, monkeypatch):
    allowed, _ = dirs
    real_check = files.check_fd

    def check_then_remove(fd, path, allowed_dirs):
        real_check(fd, path, allowed_dirs)
        shutil.rmtree(allowed / "good", ignore_errors=True)

    monkeypatch.setattr(files, "check_fd", check_then_remove)
    with pytest.raises(InvalidAdapterError, match="adapter_config.json is missing"):
        read_adapter_source(allowed / "good", [str(allowed)], 1 << 20)


@pytest.mark.parametrize(("name", "match"), [
    ("a" * 5000, "is too long"), ("x" * 300, "is too long"), ("missing", "does not exist"),
    ("good/adapter_config.json/x", "does not exist"), ("nul\0byte", "NUL byte"),
])
def test_bad_paths_are_typed_errors_naming_the_path(dirs, name, match):
    allowed, _ = dirs
    with pytest.raises(InvalidAdapterError, match=match) as err:
        read_adapter_source(str(allowed / name), [str(allowed)], 1 << 20)
    assert str(allowed) in str(err.value) and len(str(err.value)) < 600


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO, errno.ENOENT, errno.EACCES])
def test_every_oserror_while_reading_is_typed(dirs, monkeypatch, code):
    allowed, _ = dirs

    def failing_read(fd, n):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "read", failing_read)
    with pytest.raises(AdapterError, match="good") as err:
        read_adapter_source(allowed / "good", [str(allowed)], 1 << 20)
    assert isinstance(err.value, (InvalidAdapterError, PathNotAllowedError))


def test_files_over_the_limit_and_non_files_are_refused(dirs):
    allowed, _ = dirs
    with pytest.raises(LimitExceededError, match="max_message_bytes"):
        read_adapter_source(allowed / "good", [str(allowed)], 100)
    os.mkfifo(allowed / "fifo")  # opening it for reading must not block
    with pytest.raises(InvalidAdapterError, match="not a regular file"):
        read_adapter_source(allowed / "fifo", [str(allowed)], 1 << 20)
