"""The overhead benchmark's parts run on a tiny model (values are not checked: timings)."""

from __future__ import annotations

import argparse
import random

from conftest import tiny_llama
from engine_helpers import make_engine

from nolaserve.benchmarks import overhead, overhead_parts, vllm_runs


def test_step_timer_records_each_stage_of_decode_steps(llama):
    engine = make_engine(llama, None, max_num_seqs=8)
    engine.tokenizer = type("T", (), {"decode": lambda self, ids, **kw: ""})()
    timer = overhead.StepTimer(engine)
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(256) for _ in range(5)] for _ in range(4)]
        assert overhead.run(engine, prompts, [None] * 4, 8, timer) > 0
    finally:
        timer.restore()
        engine.close()
    stages = timer.medians_ms()
    assert set(stages) == {"schedule", "build inputs", "forward", "sample",
                           "postprocess (incl. sample)", "step"}
    assert stages["step"] >= stages["forward"]


def test_compute_floor_and_hf_step_run():
    model = tiny_llama()
    assert overhead_parts.compute_floor(model, 4, 8) > 0
    assert overhead_parts.hf_step_ms(model, 4, 8) > 0


def test_vllm_runs_once_per_max_loras(monkeypatch):
    seen = []

    def fake(args, model_dir, dirs, prompts, scenarios, tmp):
        seen.append((args.max_loras, sorted(scenarios)))
        return [("vLLM", f"{n} (max_loras {args.max_loras})", 1.0) for n in scenarios], {}

    monkeypatch.setattr(vllm_runs, "bench_vllm", fake)
    args = argparse.Namespace(max_loras=[8, 64])
    rows, _ = vllm_runs.bench_vllm_each(args, "m", [], [], {"base only": [], "64": []}, None)
    assert seen == [(8, ["64", "base only"]), (64, ["64"])]
    assert [r[1] for r in rows] == ["base only (max_loras 8)", "64 (max_loras 8)",
                                    "64 (max_loras 64)"]


def test_linear_costs_fill_the_runner_step_and_clear_it(llama, capsys):
    engine = make_engine(llama, None, num_slots=64, max_num_seqs=64, kv_cache_bytes=16 << 20)
    try:
        overhead_parts.print_linear_costs(engine)
        assert engine.runner.step.lora is None  # cleared after
    finally:
        engine.close()
    assert "LoRA backend call alone" in capsys.readouterr().out


def test_cpu_attention_bench_runs_both_ways_and_restores_the_engine(capsys):
    """The bundled SmolLM2, two short sequences, two decode steps (one each way)."""
    from nolaserve.benchmarks import cpu_attention
    from nolaserve.server.engine.decode_step import DecodeStep

    kept = DecodeStep.shape_of
    cpu_attention.main(["--seqs", "2", "--context", "8", "--steps", "2"])
    assert DecodeStep.shape_of is kept
    assert "now/before" in capsys.readouterr().out


def test_sgmv_host_costs_stub_the_kernels_only_while_timing(capsys):
    from nolaserve.adapters.ops import triton_sgmv

    kernels = triton_sgmv._shrink_kernel, triton_sgmv._expand_kernel
    overhead_parts.print_sgmv_host_costs(tokens=4, slots=4, r=4)
    assert (triton_sgmv._shrink_kernel, triton_sgmv._expand_kernel) == kernels
    assert "bound Factors" in capsys.readouterr().out
