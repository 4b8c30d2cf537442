"""Helpers for the vLLM backend suite: where vLLM lives (``NOLASERVE_VLLM_PYTHON``, which
.ci/run sets), a tiny random Llama that vLLM can run (head_dim 32) saved with its
tokenizer, and ``nolaserve serve --engine vllm`` as a subprocess of that python."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama

VLLM_PYTHON_ENV = "NOLASERVE_VLLM_PYTHON"
START_GUARD = 600.0  # s: vLLM's start on a loaded 2-core CPU; only turns a hang into a failure
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# head_dim = 128 / 4 = 32 (vLLM's CPU attention needs >= 32); GQA as in real Llamas
VLLM_LLAMA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)


def vllm_python() -> str:
    """The python of a virtualenv with vLLM and nolaserve; skips without one, except in
    CI (``CI=true``), where a missing vLLM environment is a failure, never a skip."""
    python = os.environ.get(VLLM_PYTHON_ENV, "")
    if python and Path(python).is_file():
        return python
    why = (f"{VLLM_PYTHON_ENV} is not set to a python with vLLM installed ({python!r}); "
           ".ci/run builds one (docs/vllm.md)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


def stub_engine_args(monkeypatch) -> None:
    """``vllm_args.engine_args`` without vLLM: ``AsyncEngineArgs`` and
    ``StructuredOutputsConfig`` record their arguments as dicts."""
    for name, attr in (("vllm.engine.arg_utils", "AsyncEngineArgs"),
                       ("vllm.config", "StructuredOutputsConfig")):
        module = types.ModuleType(name)
        setattr(module, attr, dict)
        monkeypatch.setitem(sys.modules, name, module)


def save_model(directory: Path, tokenizer, seed: int = 0):
    """The tiny Llama and ``tokenizer`` saved as a checkpoint vLLM loads; returns the model."""
    model = tiny_llama(seed, **VLLM_LLAMA)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def write_config(path: Path, model_dir: Path, metrics_port: int, http_port: int = 0,
                 **overrides) -> Path:
    config = dict(engine="vllm", model=str(model_dir), device="cpu", dtype="float32",
                  cache_dir=str(path.parent / "cache"), registry_path=":memory:",
                  num_slots=4, max_rank=8, max_model_len=512, enforce_eager=True,
                  max_num_seqs=16, port=0, metrics_port=metrics_port, http_port=http_port,
                  peft_cache_dir=str(path.parent / "peft"), grace_period_s=5.0, **overrides)
    path.write_text(yaml.safe_dump(config))
    return path


class VllmServer:
    """``nolaserve serve --engine vllm --config CONFIG`` under ``python``."""

    def __init__(self, python: str, config: Path, log: Path) -> None:
        env = {**os.environ, **VLLM_ENV, "PYTHONUNBUFFERED": "1"}
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [python, "-m", "nolaserve.clients.cli", "serve", "--engine", "vllm",
                 "--config", str(config)],
                env=env, text=True, stdout=subprocess.PIPE, stderr=err)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout],
                         daemon=True).start()
        self.port = self._read_port()

    def _read_port(self) -> int:
        deadline = time.monotonic() + START_GUARD
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited with {self.proc.returncode}:\n"
                                         f"{self.log.read_text()[-4000:]}") from None
                continue
            match = re.match(r"nolaserve listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                return int(match.group(1))
        raise AssertionError(f"serve printed no address:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
