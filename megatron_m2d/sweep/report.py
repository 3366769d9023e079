"""Sweep results as a CSV, a Markdown table and PNG plots (PPL by scoring x K, PPL by grouping)."""

from __future__ import annotations

import csv
import statistics as stats_
from collections import defaultdict
from pathlib import Path

from megatron_m2d.io.plots import figure, log_ppl_axis

COLUMNS = ["scoring", "grouping", "scaling", "select", "groups", "ppl", "nll", "seconds", "same_as"]


def write_reports(out: Path, rows: list[dict], teacher_ppl: float, seconds: float) -> None:
    rows = sorted(rows, key=lambda r: (r["ppl"], r["key"]))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown(rows, teacher_ppl, seconds))
    plot_by_scoring(out / "ppl_by_scoring.png", rows, teacher_ppl)
    plot_by_grouping(out / "ppl_by_grouping.png", rows, teacher_ppl)


def best_by(rows: list[dict], *fields: str) -> dict[tuple, dict]:
    best: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[f] for f in fields)
        if key not in best or row["ppl"] < best[key]["ppl"]:
            best[key] = row
    return best


def markdown(rows: list[dict], teacher_ppl: float, seconds: float) -> str:
    selects = sorted({r["select"] for r in rows})
    scorings = sorted({r["scoring"] for r in rows})
    best = best_by(rows, "scoring", "select")
    lines = [f"# Sweep: {len(rows)} configurations, teacher perplexity {teacher_ppl:.2f}", "",
             f"Evaluation time this run: {seconds:.0f} s.", "",
             "## Best perplexity per scoring and K (over groupings and scalings)", "",
             "| scoring | " + " | ".join(f"K={k}" for k in selects) + " |",
             "|---|" + "---|" * len(selects)]
    for scoring in scorings:
        cells = [f"{best[(scoring, k)]['ppl']:.2f}" if (scoring, k) in best else "" for k in selects]
        lines.append(f"| {scoring} | " + " | ".join(cells) + " |")
    lines += ["", "## All configurations, best first", "",
              "| scoring | grouping | scaling | K | k | ppl | same as |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scoring']} | {r['grouping']} | {r['scaling']} | {r['select']} | {r['groups']} | "
                     f"{r['ppl']:.2f} | {r.get('same_as') or ''} |")
    return "\n".join(lines) + "\n"


def plot_by_scoring(path: Path, rows: list[dict], teacher_ppl: float) -> None:
    """Best perplexity per scoring: a line over K when several K were swept, else one point per scoring."""
    best = best_by(rows, "scoring", "select")
    scorings = sorted({r["scoring"] for r in rows})
    selects = sorted({r["select"] for r in rows})
    with figure(path, "Best perplexity by scoring, before distillation") as (fig, ax):
        if len(selects) > 1:
            for scoring in scorings:
                points = sorted((k, row["ppl"]) for (s, k), row in best.items() if s == scoring)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=scoring)
            ax.set_xticks(selects)
            ax.set_xlabel("K (experts kept per layer)")
        else:  # one K: the scorings are the categories
            ax.plot(range(len(scorings)), [best[(s, selects[0])]["ppl"] for s in scorings], "o",
                    label=f"K={selects[0]}")
            ax.set_xticks(range(len(scorings)), scorings, rotation=20, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(scorings) - 0.5)
            ax.set_xlabel("scoring")
        ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1, label=f"teacher (MoE) {teacher_ppl:.2f}")
        log_ppl_axis(ax, "held-out perplexity (best over groupings, scalings)")


def plot_by_grouping(path: Path, rows: list[dict], teacher_ppl: float) -> bool:
    """Median over scorings and scalings of each grouping's perplexity, per K > k (where groupings act). Written
    only when at least two groupings acted: one grouping is not a comparison. Returns whether it was written."""
    merged = [r for r in rows if r["select"] > r["groups"]]
    groupings = sorted({r["grouping"] for r in merged})
    if len(groupings) < 2:
        path.unlink(missing_ok=True)  # a plot from an earlier, larger sweep into the same directory is stale
        return False
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in merged:
        values[(r["grouping"], r["select"])].append(r["ppl"])
    selects = sorted({k for _, k in values})
    with figure(path, "Median perplexity by grouping (K > k), before distillation") as (fig, ax):
        for j, k in enumerate(selects):  # points, not bars: the axis is logarithmic
            xs = [i + (j - (len(selects) - 1) / 2) * 0.12 for i in range(len(groupings))]
            ax.plot(xs, [stats_.median(values.get((g, k), [float("nan")])) for g in groupings], "o", label=f"K={k}")
        ax.set_xticks(range(len(groupings)), groupings, rotation=15, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(groupings) - 0.5)
        ax.set_xlabel("grouping")
        ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1, label=f"teacher (MoE) {teacher_ppl:.2f}")
        log_ppl_axis(ax, "median perplexity over scorings and scalings")
    return True
