"""The table and the PNG plots of ``nolaserve bench`` records (``{"params", "stats"}``).
matplotlib (the ``bench`` extra) is imported only to plot, with the Agg backend."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("n", "rate", "trace", "reqs", "ok", "req/s", "tok/s", "TTFT p50/p90/p99 ms",
           "TPOT p50/p90/p99 ms", "SLO", "errors")


def _ms(q: dict[str, float | None]) -> str:
    return "/".join("-" if q[p] is None else f"{1000 * q[p]:.0f}" for p in ("p50", "p90", "p99"))


def row(record: dict) -> list[str]:
    p, s = record["params"], record["stats"]
    trace = f"{p['spread']}x{p['batch']}" if p["spread"] else f"a={p['alpha']:g},cv={p['cv']:g}"
    errors = ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "-"
    return [str(p["num_adapters"]), f"{p['rate']:g}", trace, str(s["requests"]), str(s["ok"]),
            f"{s['req_per_s']:.2f}", f"{s['tok_per_s']:.1f}", _ms(s["ttft_s"]),
            _ms(s["tpot_s"]), f"{100 * s['slo_attainment']:.0f}%", errors]


def table(records: list[dict]) -> str:
    """A fixed-width table, one line per run."""
    rows = [list(COLUMNS)] + [row(r) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def plots(records: list[dict], out: str | Path) -> list[Path]:
    """``<out stem>_vs_n.png`` / ``_vs_rate.png`` for each axis with two or more values:
    throughput (tok/s) and latency (TTFT and TPOT p50/p99), one line per value of the
    other axis. Returns the files written."""
    out = Path(out)
    written = []
    for axis, key, other in (("n", "num_adapters", "rate"), ("rate", "rate", "num_adapters")):
        if len({r["params"][key] for r in records}) < 2:
            continue
        path = out.with_name(f"{out.stem}_vs_{axis}.png")
        _plot_axis(records, key, other, axis, path)
        written.append(path)
    return written


def _plot_axis(records: list[dict], key: str, other: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(11, 4))
    ticks = sorted({r["params"][key] for r in records})
    for value in sorted({r["params"][other] for r in records}):
        runs = sorted((r for r in records if r["params"][other] == value),
                      key=lambda r: r["params"][key])
        xs = [r["params"][key] for r in runs]
        tag = f"{'n' if other == 'num_adapters' else 'rate'}={value:g}"
        thr.plot(xs, [r["stats"]["tok_per_s"] for r in runs], "o-", label=tag)
        for metric, style in (("ttft_s", "o-"), ("tpot_s", "s--")):
            for q in ("p50", "p99"):
                ys = [_ms_or_nan(r["stats"][metric][q]) for r in runs]
                lat.plot(xs, ys, style, label=f"{metric[:4].upper()} {q} {tag}")
    for ax, ylabel in ((thr, "output tokens / s"), (lat, "latency (ms)")):
        ax.set_xlabel("adapters (n)" if label == "n" else "request rate (1/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if label == "n":
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    thr.set_title(f"throughput vs {label}")
    lat.set_title(f"latency vs {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms_or_nan(seconds: float | None) -> float:
    return float("nan") if seconds is None else 1000 * seconds
