"""The load benchmarks at a tiny size: step_share runs an engine alone and behind the
HTTP server and reports both; load_http's --quick size and its table (the vLLM client
itself lives in vLLM's virtualenv, which CI does not have)."""

from nolaserve.benchmarks import load_http, step_share
from nolaserve.server.engine.detokenizer import IncrementalDetokenizer


def test_step_share_reports_the_engine_alone_and_behind_http(capsys):
    add, flush = IncrementalDetokenizer.add, IncrementalDetokenizer.flush
    assert step_share.main(["--streams", "4", "--tokens", "3",
                            "--stream-intervals", "1", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[-3].startswith("| engine alone | ")
    assert "4 streams, stream_interval 1" in rows[-2] and "stream_interval 2" in rows[-1]
    assert all(int(row.split("|")[2]) >= 3 for row in rows[-2:])  # stepped as streams ran
    assert all(float(row.split("|")[6]) > 0 for row in rows[-2:])  # the client's tok/s
    # the probes put the detokenizer back
    assert (IncrementalDetokenizer.add, IncrementalDetokenizer.flush) == (add, flush)


def test_load_http_quick_size_and_table():
    args = load_http.parse_args(["--quick"])
    assert (args.concurrency, args.num_prompts, args.output_len) == ([4], 8, 8)
    assert "vllm-serve" in args.skip
    rows = [{"system": "nolaserve HTTP", "concurrency": 64, "output_throughput": 90.0,
             "median_ttft_ms": 100.0, "p99_ttft_ms": 300.0, "median_tpot_ms": 20.0,
             "p99_tpot_ms": 40.0},
            {"system": "offline engine", "concurrency": 256, "output_throughput": 100.0}]
    table = load_http.report(rows).splitlines()
    assert table[2] == "| nolaserve HTTP | 64 | 90.0 | 100 / 300 | 20.0 / 40.0 | 0.90 |"
    assert table[3] == "| offline engine | 256 | 100.0 | - | - | 1.00 |"
