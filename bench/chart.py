"""Draw the ratios ours/baseline of a benchmark run over the number of concurrent streams.

    pip install matplotlib
    python bench/chart.py bench/results/20260101-120000.json [--out chart.png]

One line per figure (CPU per event, memory per stream, time to the first event p50), the ratio
of our server's value to the bare Flask baseline's at each C, on log axes; dashed lines mark
parity and the targets of issue 6 (CPU at most 2x, memory at most 3x). The PNG goes next to
the results file unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator  # noqa: E402

SERIES = (
    ("cpu_us_per_event", "CPU per event", "tab:blue"),
    ("mem_kb_per_stream", "memory per stream", "tab:green"),
    ("ttfe_p50_ms", "time to first event, p50", "tab:orange"),
)
TARGET_LINES = (
    (1, "parity", "grey"),
    (2, "CPU target (2x)", "tab:blue"),
    (3, "memory target (3x)", "tab:green"),
)


def draw(results: dict, out: Path) -> None:
    ratios = results.get("ratios", {}).get("concurrency", {})
    if not ratios:
        raise SystemExit("the results hold no ratios (did both targets run?)")
    levels = sorted(int(c) for c in ratios)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for key, label, color in SERIES:
        points = [(c, ratios[str(c)].get(key)) for c in levels]
        points = [(c, r) for c, r in points if r is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", color=color, label=label)
        for x, y in points:
            axes.annotate(
                f"{y:.2g}x",
                (x, y),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
                color=color,
            )
    for y, label, color in TARGET_LINES:
        axes.axhline(y, linestyle="--", linewidth=0.8, color=color, alpha=0.7)
        axes.annotate(
            label,
            (1.0, y),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(-4, 3),
            ha="right",
            fontsize=7,
            color=color,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(FixedLocator(levels))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([str(c) for c in levels])
    axes.set_xlim(levels[0] / 1.5, levels[-1] * 1.5)
    values = [r for c in levels for key, _, _ in SERIES if (r := ratios[str(c)].get(key))]
    low, high = min([1.0, *values]) / 1.5, max([3.0, *values]) * 2.5
    ticks = [t for t in (0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500) if low <= t <= high]
    axes.set_ylim(low, high)
    axes.yaxis.set_major_locator(FixedLocator(ticks))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_yticklabels([f"{t:g}x" for t in ticks])
    axes.set_xlabel("concurrent streams (C)")
    axes.set_ylabel("ours / baseline (lower is better)")
    settings = results.get("settings", {})
    paced = settings.get("paced", {})
    axes.set_title(
        f"Agent Runs vs bare Flask, 1 gevent worker "
        f"({paced.get('deltas')} deltas, {paced.get('delay')} s apart)",
        fontsize=10,
    )
    notes = []
    saturation = results.get("ratios", {}).get("saturation") or {}
    if saturation.get("events_per_s") is not None:
        notes.append(f"saturation events/s: {saturation['events_per_s']:.2f}x of baseline")
    during = results.get("summary", {}).get("status_during", {}).get("ours")
    if during and during.get("p50_ms") is not None:
        notes.append(
            f"batch status during {settings.get('status_streams')} streams: "
            f"p50 {during['p50_ms']:.1f} ms, p99 {during['p99_ms']:.1f} ms"
        )
    notes.append(f"run {results.get('started_at', '')[:19]}, {results['machine']['cpus']} CPUs")
    axes.legend(fontsize=8, loc="upper left", ncols=3)
    axes.grid(True, which="major", alpha=0.2)
    figure.text(0.01, 0.01, "   ".join(notes), fontsize=7, color="dimgrey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results JSON written by bench/run.py")
    parser.add_argument("--out", help="the PNG to write (default: beside the results)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    out = Path(args.out) if args.out else path.with_suffix(".png")
    draw(json.loads(path.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
