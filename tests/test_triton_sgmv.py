"""The split-K SGMV (``ops/triton_sgmv.py``) against the reference; the cases
(``triton_sgmv_cases.py``) run in a child process under ``TRITON_INTERPRET=1``, or
natively on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_triton_kernels import needs_triton, run_cases

CASES = [Path(__file__).with_name("triton_sgmv_cases.py")]


@needs_triton
def test_split_k_sgmv_interpreted_on_cpu():
    run_cases(interpret=True, cases=CASES)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_k_sgmv_on_cuda():
    run_cases(interpret=False, cases=CASES)
