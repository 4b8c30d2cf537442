"""The Triton kernels against their CPU references. Each group of cases runs in a child
process: under ``TRITON_INTERPRET=1`` on CPU here (the variable must be set before triton is
imported), natively on CUDA when a GPU is present. The groups: ``triton_cases.py`` and
``triton_attention_cases.py`` (segment SGMV, ``nola_triton``, paged attention),
``triton_sgmv_cases.py`` (split-K SGMV), ``triton_rows_cases.py`` (the graph-decode ops
over shared slot runs), ``triton_decode_attention_cases.py`` (paged decode
attention split across programs, against torch SDPA), ``triton_regen_cases.py`` (NOLA
regeneration in one launch per adapter, against the CPU Philox path) and
``triton_slot_direct_cases.py`` (a NOLA load regenerated straight into its slot)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = [Path(__file__).with_name(n) for n in ("triton_cases.py", "triton_attention_cases.py")]
GROUPS = {"kernels": CASES, **{name: [Path(__file__).with_name(f"triton_{name}_cases.py")]
                              for name in ("sgmv", "rows", "decode_attention", "regen",
                                           "slot_direct")}}
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


def run_cases(interpret: bool, cases: list[Path] = CASES) -> None:
    """Run the case files ``cases`` in a child pytest, interpreted or on CUDA; every case
    must pass and none be skipped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *map(str, cases)],
        cwd=cases[0].parent.parent, env=env, capture_output=True, text=True, timeout=1200,
    )
    summary = proc.stdout.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0 and " passed" in summary[0], proc.stdout[-6000:] + proc.stderr
    assert "skipped" not in summary[0], summary[0]


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
def test_kernels_interpreted_on_cpu(group):
    run_cases(interpret=True, cases=GROUPS[group])


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", GROUPS)
def test_kernels_on_cuda(group):
    run_cases(interpret=False, cases=GROUPS[group])
