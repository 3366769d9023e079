"""Plots a reader can trust: a title on every figure, points (never bars) on a log perplexity axis, the teacher as a
reference line, plain-number ticks, no comparison drawn over a single category."""

from __future__ import annotations

import contextlib

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from megatron_m2d import demo  # noqa: E402
from megatron_m2d.io import plots  # noqa: E402
from megatron_m2d.sweep import report  # noqa: E402


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the code draws, kept open for inspection (the real `figure` also saves and closes it)."""
    kept = []

    @contextlib.contextmanager
    def keep(path, title, size=(7, 4.5)):
        with plots.figure(path, title, size) as (fig, ax):
            kept.append((fig, ax))
            yield fig, ax

    monkeypatch.setattr(report, "figure", keep)
    monkeypatch.setattr(demo, "figure", keep)
    yield kept
    plt.close("all")


def check_trustworthy(ax, axis: str):
    assert ax.get_title().strip()
    assert (ax.get_yscale() if axis == "y" else ax.get_xscale()) == "log"
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert not bars, "bars on a log axis"
    lines = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("teacher") for label in lines), lines
    ax.figure.canvas.draw()
    ticks = [t.get_text() for t in (ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()) if t.get_text()]
    assert ticks and not any("^" in t or "e+" in t for t in ticks), ticks  # 50, 100, 200 rather than 10^2


def sweep_rows(groupings, selects):
    return [{"scoring": s, "grouping": g, "scaling": "uniform", "select": k, "groups": 2, "ppl": 100.0 + 10 * i + k,
             "key": f"{s}|{g}|{k}"} for i, s in enumerate(["selection_freq", "gld_reap"]) for g in groupings
            for k in selects]


def test_sweep_plots(tmp_path, drawn):
    report.write_reports(tmp_path, sweep_rows(["round_robin", "output_cluster"], [2, 4]), 54.4, 1.0)
    assert (tmp_path / "ppl_by_scoring.png").stat().st_size > 1000 and len(drawn) == 2
    for _, ax in drawn:
        check_trustworthy(ax, "y")


def test_one_category_is_not_drawn_as_a_comparison(tmp_path, drawn):
    rows = sweep_rows(["round_robin"], [2, 4])  # one grouping acts
    (tmp_path / "ppl_by_grouping.png").write_bytes(b"stale")
    report.write_reports(tmp_path, rows, 54.4, 1.0)
    assert not (tmp_path / "ppl_by_grouping.png").exists()
    report.write_reports(tmp_path, sweep_rows(["round_robin"], [2]), 54.4, 1.0)  # one K: scorings on the axis
    _, ax = drawn[-1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gld_reap", "selection_freq"]


def test_demo_plot(tmp_path, drawn):
    rows = [{"model": "teacher (MoE)", "before": 54.4, "after": None},
            {"model": "DO-ACP", "before": 384.3, "after": 71.6},
            {"model": "random FFN", "before": 5232.4, "after": 100.1}]
    demo.plot(tmp_path / "demo.png", rows, 81920)
    (fig, ax), = drawn
    check_trustworthy(ax, "x")
    at = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert at["DO-ACP"] > at["random FFN"]  # the table's order, top to bottom, labels horizontal and readable
    assert (tmp_path / "demo.png").stat().st_size > 1000
