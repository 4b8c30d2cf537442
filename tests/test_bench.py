"""``nolaserve bench``: the S-LoRA and punica workloads, the statistics, and a short real
run against an in-process server over the tiny model."""

import asyncio
import json
import statistics
import sys

import numpy as np
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from server_helpers import serving

from nolaserve.clients import bench_cli
from nolaserve.clients.bench_load import (
    RequestResult,
    Workload,
    make_trace,
    percentile,
    power_adapters,
    spread_lens,
    summarize,
)
from nolaserve.clients.cli import build_parser


def trace(**kw):
    return make_trace(Workload(**{"num_adapters": 64, "rate": 4.0, "num_requests": 20_000,
                                  **kw}))


@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.0])
def test_power_trace_adapter_indices_lie_in_range(alpha):
    idx = [r.adapter for r in trace(alpha=alpha)]
    assert min(idx) == 0 and max(idx) <= 63
    # numpy's power(alpha) has CDF x**alpha: P(index < k) = (k / n) ** alpha
    assert np.mean(np.array(idx) < 8) == pytest.approx((8 / 64) ** alpha, abs=0.02)


def test_smaller_alpha_sends_more_requests_to_the_low_adapters():
    share = {a: np.mean(power_adapters(np.random.default_rng(1), 100, a, 50_000) == 0)
             for a in (0.1, 0.3, 1.0)}
    assert share[0.1] > share[0.3] > share[1.0]
    assert share[1.0] == pytest.approx(0.01, abs=0.005)  # alpha = 1 is uniform
    assert share[0.1] == pytest.approx(0.01 ** 0.1, abs=0.02)  # ~63% on adapter 0


@pytest.mark.parametrize(("rate", "cv"), [(4.0, 1.0), (10.0, 0.5), (2.0, 2.0)])
def test_gamma_arrivals_have_the_asked_mean_and_cv(rate, cv):
    arrivals = [r.arrival for r in trace(rate=rate, cv=cv)]
    gaps = np.diff([0.0] + arrivals)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_cv_zero_is_a_fixed_interval():
    gaps = np.diff([r.arrival for r in trace(rate=5.0, cv=0.0, num_requests=10)])
    assert gaps == pytest.approx([0.2] * 9)


def test_lengths_are_uniform_within_inclusive_ranges():
    reqs = trace(input_range=(3, 7), output_range=(10, 10))
    assert {r.input_len for r in reqs} == {3, 4, 5, 6, 7}
    assert {r.output_len for r in reqs} == {10}


def test_trace_is_reproducible_from_its_seed():
    assert trace(seed=3, num_requests=50) == trace(seed=3, num_requests=50)
    assert trace(seed=3, num_requests=50) != trace(seed=4, num_requests=50)


@pytest.mark.parametrize(("spread", "batch", "distinct"),
                         [("distinct", 16, 16), ("uniform", 16, 4), ("uniform", 10, 4),
                          ("skewed", 16, 2), ("skewed", 2, 1), ("identical", 16, 1),
                          ("distinct", 133, 64)])
def test_spreads_give_each_group_the_right_number_of_adapters(spread, batch, distinct):
    assert sum(spread_lens(batch, spread)) == batch
    reqs = trace(spread=spread, batch=batch, num_requests=batch * 5)
    for g in range(5):
        group = reqs[g * batch:(g + 1) * batch]
        assert len({r.arrival for r in group}) == 1  # a group arrives together
        assert len({r.adapter for r in group}) == distinct
        assert all(0 <= r.adapter < 64 for r in group)


def test_spread_groups_keep_the_request_rate():
    arrivals = [r.arrival for r in trace(spread="uniform", batch=8, rate=4.0)]
    assert len(arrivals) / arrivals[-1] == pytest.approx(4.0, rel=0.05)


def test_uniform_spread_matches_punica():
    assert spread_lens(10, "uniform") == [3, 3, 2, 2]
    assert spread_lens(7, "uniform") == [3, 2, 2]
    assert spread_lens(5, "skewed") == [1, 4]


def test_workload_rejects_bad_parameters():
    for bad in (dict(rate=0), dict(alpha=0), dict(cv=-1), dict(spread="zipf"),
                dict(input_range=(5, 4)), dict(num_adapters=0)):
        with pytest.raises(ValueError):
            Workload(**{"num_adapters": 4, "rate": 1.0, "num_requests": 4, **bad})


def test_percentile_matches_numpy():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert percentile([], 50) is None


def test_summarize_on_synthetic_timings():
    results = [
        RequestResult(sent=0.0, token_times=[0.1, 0.2, 0.3], done=0.3),  # 100 ms / 100 ms
        RequestResult(sent=1.0, token_times=[1.5, 1.9], done=2.0),  # TTFT 500 ms, TPOT 400
        RequestResult(sent=2.0, token_times=[2.2], done=2.2),  # one token: no TPOT
        RequestResult(sent=3.0, token_times=[], done=4.0, error="NOT_FOUND"),
    ]
    s = summarize(results, slo_ttft=0.3, slo_tpot=0.2)
    assert (s["requests"], s["ok"], s["output_tokens"]) == (4, 3, 6)
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["req_per_s"] == pytest.approx(0.75) and s["tok_per_s"] == pytest.approx(1.5)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_s"]["p90"] == pytest.approx(statistics.quantiles(
        [0.1, 0.5, 0.2], n=10, method="inclusive")[-1])
    assert s["tpot_s"]["p50"] == pytest.approx(0.25) and s["tpot_s"]["p99"] == \
        pytest.approx(0.1 + 0.3 * 0.99)
    assert s["slo_attainment"] == pytest.approx(2 / 4)  # 1st and 3rd meet it
    assert s["errors"] == {"NOT_FOUND": 1}
    assert summarize(results, slo_ttft=10, slo_tpot=10)["slo_attainment"] == 0.75
    # over the run from its time zero, not from the first send (an outside probe's trace
    # whose first arrival came at 5.5 s read 5.3 req/s for 2 requests in 5.7 s)
    late = summarize(results, slo_ttft=1, slo_tpot=1, start=-4.0)
    assert late["duration_s"] == pytest.approx(8.0) and late["req_per_s"] == pytest.approx(3 / 8)


@pytest.mark.parametrize("matplotlib", [True, False])
def test_bench_runs_against_an_in_process_server(bytebpe, tmp_path, monkeypatch, capsys,
                                                 matplotlib):
    """Without matplotlib (the bench extra) it still writes its records and says how to
    get the plots (it ended in an ImportError's traceback)."""
    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    engine = make_engine(tiny_llama(vocab_size=300), bytebpe)
    out = tmp_path / "results.json"

    async def main():
        async with serving(engine) as c:
            args = build_parser().parse_args([
                "bench", "--target", f"127.0.0.1:{c.running.port}", "--register", "2",
                "--rank", "4", "--num-basis", "16", "--sweep-n", "1", "2",
                "--num-requests", "4", "--rate", "50", "--input-len", "4", "8",
                "--output-len", "3", "6", "--slo-ttft", "30", "--slo-tpot", "30",
                "--out", str(out)])
            return await bench_cli.run(args)

    assert asyncio.run(main()) == 0
    records = json.loads(out.read_text())
    assert [r["params"]["num_adapters"] for r in records] == [1, 2]
    for r in records:
        s = r["stats"]
        assert (s["requests"], s["ok"], s["errors"]) == (4, 4, {})
        assert 4 * 3 <= s["output_tokens"] <= 4 * 6 and s["tok_per_s"] > 0
        assert s["ttft_s"]["p50"] > 0 and s["slo_attainment"] == 1.0
    png = tmp_path / "results_vs_n.png"
    if matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists() and "no plots without matplotlib: pip install 'nolaserve[" \
            "bench]'" in capsys.readouterr().err


def test_cli_rejects_more_adapters_than_given(capsys):
    from nolaserve.clients.cli import main

    assert main(["bench", "--adapters", "a", "--sweep-n", "1", "2", "--target",
                 "127.0.0.1:1"]) == 2
    assert "n=2" in capsys.readouterr().err
