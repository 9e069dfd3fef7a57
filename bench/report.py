"""The benchmarks' summary: ``bench/results/SUMMARY.md`` and its plots.

    python -m bench.report        (``make bench`` runs it last)

Every benchmark writes ``bench/results/<name>.json`` with its machine, its
raw figures and a list of ``headlines``: one entry per figure that has a
target, as ``{"metric", "value", "unit", "target", "better", "baseline"?}``
(``better`` is ``"higher"`` or ``"lower"``). Benchmarks that measure at
several concurrencies add ``series``: ``{"name", "x_label", "y_label",
"points": [[x, y], ...]}``. This reads whatever results exist, so a reader
sees at a glance where Moneta stands against its targets (and its naive
baselines), and on what machine each figure was taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt

from bench.common import RESULTS

MET, MISSED = "#2e7d32", "#c62828"


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written file of an interrupted run
    return results


def meets(headline: dict[str, Any]) -> bool | None:
    """Whether a headline figure meets its target; None without one."""
    target = headline.get("target")
    if target is None:
        return None
    value, target = float(headline["value"]), float(target)
    return value >= target if headline.get("better", "higher") == "higher" else value <= target


def _figure(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "ratio":
        return f"{value:,.2f}x"
    return f"{value:,.0f}{unit}"


def summary_markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Benchmark summary",
        "",
        "Made by `python -m bench.report` from the `*.json` files beside it; each figure is",
        "the median over the benchmark's runs. Plots: `targets.png` (each figure against",
        "its target), `latency.png` (p50 and p99), `concurrency.png` (throughput against",
        "concurrency, where a benchmark sweeps it).",
        "",
        "| benchmark | figure | measured | target | baseline | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for h in result.get("headlines", []):
            verdict = {True: "met", False: "**missed**", None: "-"}[meets(h)]
            sign = "≥" if h.get("better", "higher") == "higher" else "≤"
            target = "-" if h.get("target") is None else f"{sign} {_figure(h['target'], h['unit'])}"
            baseline = "-" if h.get("baseline") is None else _figure(h["baseline"], h["unit"])
            lines.append(
                f"| {name} | {h['metric']} | {_figure(float(h['value']), h['unit'])} "
                f"| {target} | {baseline} | {verdict} |"
            )
    lines += [
        "",
        "## Machines",
        "",
        "A thread wake-up round trip of about 10-20 us is a healthy machine; ten times that",
        "(a crowded VM host) slows every gRPC call, and such figures are not Moneta's.",
        "",
        "| benchmark | cores | memory | cpu | python | load | wake-up round trip | measured at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        m = result.get("machine", {})
        load = m.get("load_average", ["?"])[0]
        wakeup = m.get("thread_wakeup_round_trip_us", "?")
        lines.append(
            f"| {name} | {m.get('cores', '?')} | {m.get('memory_gib', '?')} GiB "
            f"| {m.get('cpu', '?')} | {m.get('python', '?')} | {load} | {wakeup} us "
            f"| {m.get('measured_at', '?')} |"
        )
    return "\n".join(lines) + "\n"


def plot_targets(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """One bar per figure with a target: measured as a share of the target
    (for 'lower is better' figures, target / measured), 1.0 = the target."""
    rows = [
        (f"{name}: {h['metric']}", h)
        for name, result in results.items()
        for h in result.get("headlines", [])
        if h.get("target")
    ]
    if not rows:
        return False
    shares = []
    for _, h in rows:
        value = max(float(h["value"]), 1e-9)
        higher = h.get("better", "higher") == "higher"
        shares.append(value / h["target"] if higher else h["target"] / value)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    colours = [MET if meets(h) else MISSED for _, h in rows]
    ax.barh([label for label, _ in rows], shares, color=colours)
    for i, share in enumerate(shares):
        ax.annotate(f"{share:.2f}", (min(share, 3.0), i), xytext=(3, 0),
                    textcoords="offset points", va="center")  # fmt: skip
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, min(max(1.5, *shares) * 1.1, 3.3))
    ax.set_xlabel("share of the target (1 meets it; cut at 3)")
    ax.invert_yaxis()
    ax.set_title("Moneta against its targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency(results: dict[str, dict[str, Any]], path: Path) -> bool:
    rows = [
        (f"{name}: {h['metric']}", float(h["value"]), h.get("target"))
        for name, result in results.items()
        for h in result.get("headlines", [])
        if h["unit"] == "ms"
    ]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    labels = [label for label, _, _ in rows]
    ax.barh(labels, [v for _, v, _ in rows], color="#1565c0", label="measured")
    targets = [(i, t) for i, (_, _, t) in enumerate(rows) if t is not None]
    ax.scatter([t for _, t in targets], [i for i, _ in targets], marker="|", s=400,
               color="black", label="target")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("Latency percentiles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_concurrency(results: dict[str, dict[str, Any]], path: Path) -> bool:
    series = [(name, s) for name, result in results.items() for s in result.get("series", [])]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, s in series:
        xs, ys = zip(*s["points"], strict=True)
        ax.plot(xs, ys, marker="o", label=f"{name}: {s['name']}")
    ax.set_xlabel(series[0][1].get("x_label", "concurrent clients"))
    ax.set_ylabel(series[0][1].get("y_label", "per second"))
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Throughput against concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(folder: Path = RESULTS) -> Path:
    results = load_results(folder)
    folder.mkdir(exist_ok=True)
    for plot, filename in (
        (plot_targets, "targets.png"),
        (plot_latency, "latency.png"),
        (plot_concurrency, "concurrency.png"),
    ):
        if not plot(results, folder / filename):
            (folder / filename).unlink(missing_ok=True)
    summary = folder / "SUMMARY.md"
    summary.write_text(summary_markdown(results))
    return summary


def main() -> None:
    print(f"written to {write_report()}")


if __name__ == "__main__":
    main()
