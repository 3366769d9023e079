"""`m2d inspect`: a per-layer summary of calibration statistics and a heatmap of expert scores."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_m2d.calibration.store import LayerStats, Statistics
from megatron_m2d.errors import M2DError
from megatron_m2d.io.plots import figure

PER_EXPERT = ("selection_freq", "preselect_prob", "postselect_prob", "conditional_prob", "reap")


def routing_entropy(stats: LayerStats) -> float:
    """Entropy of the selection distribution over experts, normalised to [0, 1] (1: perfectly balanced)."""
    share = stats.selection_freq / stats.selection_freq.sum()
    entropy = -float((share[share > 0] * share[share > 0].log()).sum())
    return entropy / math.log(stats.num_experts) if stats.num_experts > 1 else 1.0


def summarize(stats: Statistics) -> list[dict]:
    rows = []
    for index in stats.moe_layers:
        layer = stats.layer(index)
        freq = layer.selection_freq
        top = torch.argsort(freq, descending=True, stable=True)[:3].tolist()
        rows.append({
            "layer": index, "tokens": int(layer.tokens), "entropy": round(routing_entropy(layer), 4),
            "unused": int((layer.sums["count"] == 0).sum()), "max_freq": round(float(freq.max()), 4),
            "min_freq": round(float(freq.min()), 4), "routed_weight": round(layer.mean_total_routed_weight, 4),
            "top_experts": top,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no MoE layers)"
    head = list(rows[0])
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    lines += [" | ".join(str(row[h]) for h in head) for row in rows]
    return "\n".join(lines)


def plot_scores(stats: Statistics, path: str | Path, score: str = "selection_freq") -> Path:
    if score not in PER_EXPERT:
        raise M2DError(f"cannot plot {score!r}; choose from {', '.join(PER_EXPERT)}")
    matrix = torch.stack([getattr(stats.layer(i), score) for i in stats.moe_layers]).float().numpy()
    height = max(2.5, 0.3 * len(stats.moe_layers) + 1.5)
    path = Path(path)
    title = f"{score} per expert ({stats.meta.get('model_type')}, {stats.meta.get('tokens')} tokens)"
    with figure(path, title, (min(16, 4 + 0.12 * matrix.shape[1]), height)) as (fig, ax):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(stats.moe_layers)), [str(i) for i in stats.moe_layers])
        fig.colorbar(image, ax=ax, label=score)
    return path


def inspect_stats(stats_path: str | Path, plot: str | Path | None = None, score: str = "selection_freq") -> list[dict]:
    stats = Statistics(stats_path)
    rows = summarize(stats)
    if plot is not None:
        plot_scores(stats, plot, score)
    return rows
