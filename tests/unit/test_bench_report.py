"""The benchmark summary: every headline figure with its verdict against its
target, the machine it was measured on, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import meets, write_report

pytestmark = pytest.mark.unit

LEDGER = {
    "machine": {"cores": 2, "memory_gib": 23.5, "cpu": "Xeon", "python": "3.11.7",
                "measured_at": "2026-11-21T15:00:00+00:00"},
    "headlines": [
        {"metric": "batch transfers", "value": 6419, "unit": "/s", "target": 10000,
         "better": "higher", "baseline": 830},
        {"metric": "single p99", "value": 4.2, "unit": "ms", "target": 5.0, "better": "lower"},
    ],
    "series": [{"name": "pairs", "points": [[1, 100.0], [4, 350.0], [16, 600.0]]}],
}  # fmt: skip


def test_a_higher_is_better_figure_meets_its_target_at_or_above_it() -> None:
    assert meets({"value": 10_000, "target": 10_000, "better": "higher"}) is True
    assert meets({"value": 9_999, "target": 10_000, "better": "higher"}) is False


def test_a_lower_is_better_figure_meets_its_target_at_or_below_it() -> None:
    assert meets({"value": 5.0, "target": 5.0, "better": "lower"}) is True
    assert meets({"value": 5.01, "target": 5.0, "better": "lower"}) is False


def test_a_figure_without_a_target_has_no_verdict() -> None:
    assert meets({"value": 1.0, "target": None}) is None


def test_the_summary_lists_each_figure_with_its_verdict_and_machine(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_text(json.dumps(LEDGER))

    summary = write_report(tmp_path).read_text()

    assert "| ledger | batch transfers | 6,419/s | ≥ 10,000/s | 830/s | **missed** |" in summary
    assert "| ledger | single p99 | 4.20 ms | ≤ 5.00 ms | - | met |" in summary
    assert (
        "| ledger | 2 | 23.5 GiB | Xeon | 3.11.7 | ? | ? us | 2026-11-21T15:00:00+00:00 |"
        in summary
    )


def test_the_plots_are_written_as_png(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_text(json.dumps(LEDGER))

    write_report(tmp_path)

    for name in ("targets.png", "latency.png", "concurrency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_half_written_results_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_text(json.dumps(LEDGER))
    (tmp_path / "broken.json").write_text('{"headlines": [')

    summary = write_report(tmp_path).read_text()

    assert "broken" not in summary
    assert "batch transfers" in summary
