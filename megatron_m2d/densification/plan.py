"""The plan: for each MoE layer, which experts are kept, how they are grouped, merged and scaled.

Statistics -> scores -> plan is pure (no weights are written); the export turns a plan into dense weights.
The plan is saved next to the dense checkpoint as `m2d_plan.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch

from megatron_m2d.calibration.store import CP_KINDS, LayerStats
from megatron_m2d.densification.grouping import OUTPUT_GROUPINGS, GroupingFeatures, group_experts
from megatron_m2d.densification.merge import MERGES, SCALINGS, group_scales, merge_weights
from megatron_m2d.densification.scoring import KernelOptions, score_layer
from megatron_m2d.errors import M2DError


@dataclass(frozen=True)
class Method:
    """One point of the method grid: what the CLI's densify flags choose."""

    scoring: str
    select: int  # K experts kept per layer
    groups: int  # k groups = dense width in experts
    grouping: str = "round_robin"
    scaling: str = "uniform"
    merge: str = "average"
    merge_alpha: float = 0.5
    kernel: KernelOptions = field(default_factory=KernelOptions)
    seed: int = 0
    cp: str = "probability"  # conditional probability: the paper's Eq. 3, or "routing_weight" (LayerStats.cp)

    def validate(self, num_experts: int) -> None:
        if self.groups < 1:
            raise M2DError(f"--groups must be at least 1 (got {self.groups})")
        if self.select > num_experts:
            raise M2DError(f"--select {self.select} exceeds the {num_experts} experts per layer")
        if self.select < self.groups:
            raise M2DError(f"--select {self.select} is smaller than --groups {self.groups}: every group needs an expert")
        if self.scaling not in SCALINGS:
            raise M2DError(f"unknown scaling {self.scaling!r} (choose from {', '.join(SCALINGS)})")
        if self.merge not in MERGES:
            raise M2DError(f"unknown merge {self.merge!r} (choose from {', '.join(MERGES)})")
        if not 0.0 <= self.merge_alpha <= 1.0:
            raise M2DError("--merge-alpha must lie in [0, 1]")
        if self.cp not in CP_KINDS:
            raise M2DError(f"unknown --cp {self.cp!r} (choose from {', '.join(CP_KINDS)})")

    @property
    def needs_all_token_outputs(self) -> bool:
        """Output-based groupings cluster on every expert's mean output over all tokens (HC-SMoE): they need the
        all-token pass (calibrate --gram) whenever there is something to group (K > k)."""
        return self.select > self.groups and self.grouping in OUTPUT_GROUPINGS

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LayerPlan:
    layer: int
    selected: list[int]  # kept experts, most important first
    groups: list[list[int]]  # each in importance order; the first member is the group's dominant expert
    merge_weights: list[list[float]]  # per group, normalised, aligned with `groups`
    scales: list[float]  # down-projection scale per group
    importance: list[float]  # per expert: the scoring's importance (ranking and merge weights)
    shared_scale: float | None = None  # folded sigmoid gate of a shared expert (Qwen2-MoE), if any

    def to_json(self) -> dict:
        return asdict(self)


def plan_layer(stats: LayerStats, method: Method, features: GroupingFeatures, routed_scaling: float = 1.0,
               fold_shared_gate: bool = False) -> LayerPlan:
    stats = dataclasses.replace(stats, cp=method.cp)
    selection = score_layer(stats, method.scoring, method.select, method.groups, method.kernel, method.seed)
    if not torch.isfinite(selection.importance).all():  # NaN scores would keep experts 0..K-1 silently
        raise M2DError(f"layer {stats.layer}: scoring {method.scoring} gave NaN or infinite expert importance")
    groups = group_experts(selection.experts, method.groups, method.grouping, features)
    weights = [merge_weights(selection.importance, g).tolist() for g in groups]
    scales = group_scales(groups, stats.postselect_prob, method.scaling, routed_scaling,
                          stats.mean_total_routed_weight, selection.importance)
    shared_scale = stats.shared_gate_mean if fold_shared_gate else None
    return LayerPlan(stats.layer, selection.experts, groups, weights, scales,
                     [round(float(v), 8) for v in selection.importance], shared_scale)


def expert_weight_loader(ckpt, family, layer: int):
    """ids -> [n, 3*I*H] flattened (gate | up | down) weights, read from disk only when a grouping asks."""
    def load(ids: list[int]) -> torch.Tensor:
        return torch.stack([family.read_expert(ckpt, layer, e).flat() for e in ids])
    return load
