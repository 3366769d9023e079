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
    plot_by_grouping(out / "ppl_by_grouping.png", rows)


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
    best = best_by(rows, "scoring", "select")
    with figure(path) as (fig, ax):
        for scoring in sorted({r["scoring"] for r in rows}):
            points = sorted((k, row["ppl"]) for (s, k), row in best.items() if s == scoring)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=scoring)
        ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1, label="teacher (MoE)")
        ax.set_xticks(sorted({r["select"] for r in rows}))
        ax.set_xlabel("K (experts kept per layer)")
        ax.set_title("Perplexity by scoring and K, before distillation")
        log_ppl_axis(ax, "held-out perplexity (best over groupings, scalings)")


def plot_by_grouping(path: Path, rows: list[dict]) -> None:
    """Median over scorings and scalings of the perplexity of each grouping, per K > k (where groupings act)."""
    merged = [r for r in rows if r["select"] > r["groups"]]
    with figure(path) as (fig, ax):
        ax.set_title("Perplexity by grouping (K > k)")
        if not merged:
            ax.text(0.5, 0.5, "no configuration with K > k: groupings do not act", ha="center", va="center")
            return
        values: dict[tuple, list[float]] = defaultdict(list)
        for r in merged:
            values[(r["grouping"], r["select"])].append(r["ppl"])
        groupings = sorted({g for g, _ in values})
        selects = sorted({k for _, k in values})
        width = 0.8 / len(groupings)
        for i, grouping in enumerate(groupings):
            xs = [j + i * width for j in range(len(selects))]
            ax.bar(xs, [stats_.median(values.get((grouping, k), [float("nan")])) for k in selects], width,
                   label=grouping)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(selects))], [f"K={k}" for k in selects])
        log_ppl_axis(ax, "median perplexity over scorings and scalings")
