"""NOLA regeneration in one launch per adapter (``nola_triton.regenerate``) against the CPU
Philox path; the cases (``triton_regen_cases.py``) run in a child process under
``TRITON_INTERPRET=1``, or natively on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_triton_kernels import needs_triton, run_cases

CASES = [Path(__file__).with_name("triton_regen_cases.py")]


@needs_triton
def test_fused_regeneration_interpreted_on_cpu():
    run_cases(interpret=True, cases=CASES)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_regeneration_on_cuda():
    run_cases(interpret=False, cases=CASES)
