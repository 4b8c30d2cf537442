"""The CPU-safe parts of ``benchmarks.gpu``/``gpu_kernels``: the bytes each kernel must
move (the GB/s figures divide by them), the regeneration's value count, and the command
line; the timings themselves need CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.benchmarks import gpu, gpu_kernels


def test_sgmv_bytes_count_each_distinct_slot_once():
    # 64 tokens of 4096 -> 4096, r = 16, bf16: x 0.5 MiB, y 1 MiB, 64 adapters' factors 8 MiB
    assert gpu_kernels.sgmv_bytes(64, 4096, 4096, 16, 64) == \
        2 * (64 * 4096 + 2 * 64 * 4096 + 64 * 16 * 8192)
    assert gpu_kernels.sgmv_bytes(64, 4096, 4096, 16, 1) < \
        gpu_kernels.sgmv_bytes(64, 4096, 4096, 16, 64)
    assert gpu_kernels.sgmv_bytes(1, 10, 20, 2, 1, elem=4) == 4 * (10 + 40 + 60)


def test_multi_bytes_read_x_once_for_the_group():
    # the graphed decode q/k/v group: 64 rows, 4096 -> (4096, 1024, 1024), 64 distinct slots
    outs = (4096, 1024, 1024)
    factors = 64 * 16 * sum(4096 + o for o in outs)
    assert gpu_kernels.multi_bytes(64, 4096, outs, 16, 64) == \
        2 * (64 * 4096 + 2 * 64 * sum(outs) + factors)
    assert gpu_kernels.multi_bytes(64, 4096, (4096,), 16, 64) == \
        gpu_kernels.sgmv_bytes(64, 4096, 4096, 16, 64)


def test_attention_bytes_are_the_kv_of_every_context():
    # 8B shape, 4k context, 16 sequences: 2 GiB of K and V in bf16 (plus q and out)
    kv = 16 * 2 * 4096 * 8 * 128 * 2
    assert gpu_kernels.attention_bytes(16, 4096, 8, 128, 32) == kv + 16 * 2 * 32 * 128 * 2
    assert gpu_kernels.gbps(2_000_000, 1.0) == pytest.approx(2.0)


def test_regen_values_of_the_two_issue_shapes():
    llama = BaseModelSpec(num_layers=32, module_shapes=gpu.LLAMA7B, max_rank=16)
    # 32 layers x (4 x 8192 + 2 x 15104 + 15104) x 16 x 128 basis values
    assert gpu.regen_values(llama, 16, 128) == 32 * 128 * 16 * (4 * 8192 + 3 * 15104)
    smollm = BaseModelSpec(num_layers=30, module_shapes={"q": (576, 576), "v": (576, 192)},
                           max_rank=16)
    assert gpu.regen_values(smollm, 8, 256) == 30 * 256 * 8 * (1152 + 768)


def test_cli_refuses_unknown_parts_and_runs_quick_without_cuda():
    cmd = [sys.executable, "-m", "nolaserve.benchmarks.gpu"]
    bad = subprocess.run([*cmd, "--only", "ops,warp"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown parts ['warp']" in bad.stderr
    ok = subprocess.run([*cmd, "--quick", "--only", "ops,attention"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "no CUDA device" in ok.stdout or "device:" in ok.stdout
