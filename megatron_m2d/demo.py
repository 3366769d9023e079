"""`m2d demo`: the whole small-scale path on the committed fixture, on CPU, in a few minutes.

calibrate the fixture MoE on Macbeth -> a small sweep -> densify DO-ACP, SF and random selection, and build the
D2D (from the fixture's dense sibling) and random-FFN baselines -> distil each from the MoE on equal tokens ->
held-out perplexity on Julius Caesar before and after -> one table, plots. Whatever ordering comes out is what
the table shows.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from tqdm.auto import tqdm

from megatron_m2d.baselines.d2d import d2d
from megatron_m2d.baselines.random_ffn import random_ffn
from megatron_m2d.calibration.run import calibrate
from megatron_m2d.densification.run import densify
from megatron_m2d.distillation.hf import DistillConfig, distill
from megatron_m2d.evaluation.perplexity import as_evaluation, perplexity_of_dir
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.model_card import add_evaluation, read_card, write_card
from megatron_m2d.io.plots import figure, log_ppl_axis
from megatron_m2d.io.writer import check_output_path
from megatron_m2d.sweep.run import sweep

ASSETS = Path(__file__).parent / "assets"
FIXTURE_MOE = ASSETS / "fixture-moe"
FIXTURE_DENSE = ASSETS / "fixture-dense"
CALIBRATION_TEXT = ASSETS / "macbeth.txt"
HELD_OUT_TEXT = ASSETS / "julius_caesar.txt"

FULL = dict(tokens=32768, seq_len=256, eval_tokens=16384, steps=40, micro_batch=8,
            sweep=dict(scorings=["selection_freq", "conditional_prob", "reap", "gram_logdet", "gld_reap", "random"],
                       groupings=["round_robin", "output_cluster"], scalings=["uniform"], selects=[2, 4]))
QUICK = dict(tokens=2048, seq_len=128, eval_tokens=2048, steps=2, micro_batch=2,
             sweep=dict(scorings=["selection_freq", "gld_reap"], groupings=["round_robin"], scalings=["uniform"],
                        selects=[2]))


def students(out: Path, stats: Path, width: int, s: dict) -> dict[str, Path]:
    """The dense students of the table, before distillation."""
    made = {}
    for label, scoring in (("DO-ACP (gld_reap)", "gld_reap"), ("SF (selection_freq)", "selection_freq"),
                           ("random selection", "random")):
        made[label] = densify(FIXTURE_MOE, out / f"student-{scoring}", scoring, stats=stats, overwrite=True,
                              progress=False).path
    made["D2D (dense sibling, pruned)"] = d2d(FIXTURE_DENSE, "fixture", out / "student-d2d", width=width,
                                              tokens=s["tokens"], seq_len=s["seq_len"], overwrite=True,
                                              progress=False)
    made["random FFN"] = random_ffn(FIXTURE_MOE, out / "student-random-ffn", overwrite=True, progress=False)
    return made


def run_demo(out: str | Path = "m2d-demo", quick: bool = False, overwrite: bool = False) -> list[dict]:
    s = QUICK if quick else FULL
    out = Path(out)
    if out.exists():
        check_output_path(out, overwrite)
    out.mkdir(exist_ok=True)
    started = time.perf_counter()

    def ppl(model: Path) -> float:
        """Held-out perplexity; recorded in the model's card when the demo wrote that model (never the fixture)."""
        result = perplexity_of_dir(model, "fixture", seq_len=s["seq_len"], max_tokens=s["eval_tokens"])
        if Path(model).resolve().is_relative_to(out.resolve()):
            write_card(model, add_evaluation(read_card(model), [as_evaluation(result, "fixture", s["seq_len"])]))
        return result["ppl"]

    print("1/5 calibrate the fixture MoE on Macbeth")
    stats = out / "stats"
    calibrate(FIXTURE_MOE, "fixture", stats, tokens=s["tokens"], seq_len=s["seq_len"], gram=True, overwrite=True)
    print("2/5 sweep a small method grid (perplexity before distillation)")
    sweep(FIXTURE_MOE, out / "sweep", stats=stats, eval_data="fixture", eval_tokens=s["eval_tokens"],
          seq_len=s["seq_len"], **s["sweep"])
    print("3/5 densify the students and build the baselines")
    config = Checkpoint(FIXTURE_MOE).config
    made = students(out, stats, config.num_experts_per_tok * config.moe_intermediate_size, s)
    print(f"4/5 distil each student from the MoE on equal tokens ({s['steps']} steps)")
    train = DistillConfig(steps=s["steps"], seq_len=s["seq_len"], micro_batch=s["micro_batch"], lr=1e-3,
                          min_lr=1e-4, warmup=max(1, s["steps"] // 10), train_tokens=200_000, save_every=10**9)
    rows = [{"model": "teacher (MoE)", "before": ppl(FIXTURE_MOE), "after": None}]
    # one display for the step: the students, not each run's own bar (their loss curves are in distill-*/log.jsonl)
    for label, path in tqdm(made.items(), desc="distil and evaluate", unit="student"):
        result = distill(FIXTURE_MOE, path, "fixture", out / f"distill-{path.name}", train, device="cpu",
                         progress=False)
        rows.append({"model": label, "before": ppl(path), "after": ppl(result["model"])})
    tokens = s["steps"] * s["micro_batch"] * s["seq_len"]
    print("5/5 evaluate on held-out Julius Caesar")
    with (out / "demo.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "before", "after"])
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "demo.png", rows, tokens)
    print(f"\nheld-out perplexity on Julius Caesar ({s['eval_tokens']} tokens, windows of {s['seq_len']}); "
          f"distillation: {tokens:,} tokens each")
    print(f"{'model':<30} {'before':>10} {'after':>10}")
    for row in rows:
        after = f"{row['after']:.2f}" if row["after"] is not None else "-"
        print(f"{row['model']:<30} {row['before']:>10.2f} {after:>10}")
    print(f"done in {time.perf_counter() - started:.0f} s; table, sweep and plots in {out}/")
    return rows


def plot(path: Path, rows: list[dict], tokens: int) -> None:
    """Each student's perplexity before (hollow) and after (filled) distillation, joined by a line, on a log axis
    with the teacher as a reference: points, not bars, since a bar on a log axis has no meaningful base."""
    students_ = rows[1:]
    title = f"Held-out perplexity on Julius Caesar, before and after distillation ({tokens:,} tokens each)"
    with figure(path, title, (8, 0.5 * len(students_) + 2)) as (fig, ax):
        ys = list(range(len(students_)))[::-1]  # the table's order, top to bottom
        for y, row in zip(ys, students_):
            ax.plot([row["before"], row["after"]], [y, y], color="grey", linewidth=1, zorder=1)
        ax.scatter([r["before"] for r in students_], ys, facecolors="none", edgecolors="C0", zorder=2,
                   label="before distillation")
        ax.scatter([r["after"] for r in students_], ys, color="C1", zorder=2, label="after distillation")
        ax.axvline(rows[0]["before"], color="black", linestyle="--", linewidth=1,
                   label=f"teacher (MoE) {rows[0]['before']:.2f}")
        ax.set_yticks(ys, [r["model"] for r in students_], fontsize=9)
        ax.set_ylim(-0.6, len(students_) - 0.4)
        log_ppl_axis(ax, "held-out perplexity (log scale)", axis="x")
