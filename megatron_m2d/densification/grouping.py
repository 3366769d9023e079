"""Groupings (methods.md): partition the K kept experts into exactly k non-empty groups.

Each grouping is a small pure function of the kept experts (most important first), k, and the features it
clusters on. Inside every group the members keep their importance order, so a group's first member is its
dominant expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_m2d.calibration.store import LayerStats
from megatron_m2d.errors import M2DError


@dataclass
class GroupingFeatures:
    stats: LayerStats
    expert_weights: Callable[[list[int]], torch.Tensor]  # ids -> [len(ids), D] flattened gate|up|down


def agglomerate(distance: torch.Tensor, groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of n items down to exactly `groups` clusters.

    Written here rather than taken from scipy: scipy's fcluster(maxclust=k) may return fewer than k clusters
    when merge heights tie, and we must return exactly k. n is at most a few hundred experts.
    """
    n = distance.shape[0]
    clusters = [[i] for i in range(n)]
    d = distance.double().clone()
    d.fill_diagonal_(torch.inf)
    sizes = torch.ones(n, dtype=torch.float64)
    alive = list(range(n))
    while len(alive) > groups:
        sub = d[alive][:, alive]
        flat = int(torch.argmin(sub))  # first minimum: deterministic under ties
        a, b = alive[flat // len(alive)], alive[flat % len(alive)]
        a, b = min(a, b), max(a, b)
        merged = (d[a] * sizes[a] + d[b] * sizes[b]) / (sizes[a] + sizes[b])  # average linkage update
        d[a], d[:, a] = merged, merged
        d[a, a] = torch.inf
        sizes[a] += sizes[b]
        clusters[a].extend(clusters[b])
        alive.remove(b)
    return [sorted(clusters[i]) for i in alive]


def _euclidean(features: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.double(), features.double())


def _cluster(selected: list[int], groups: int, distance: torch.Tensor) -> list[list[int]]:
    """Cluster by a distance over the kept experts; member positions index `selected`, which is rank order."""
    return [[selected[p] for p in cluster] for cluster in agglomerate(distance, groups)]


def round_robin(selected, groups, features):
    out = [[] for _ in range(groups)]
    for rank, expert in enumerate(selected):
        out[rank % groups].append(expert)
    return out


def weight_cluster(selected, groups, features):
    return _cluster(selected, groups, _euclidean(features.expert_weights(selected)))


def router_cluster(selected, groups, features):
    """On routing-logit profiles over the calibration tokens (which experts the router treats alike)."""
    distances = features.stats.logit_distances()
    return _cluster(selected, groups, distances[selected][:, selected])


def output_cluster(selected, groups, features):
    """HC-SMoE style: on the experts' mean outputs over the calibration tokens."""
    return _cluster(selected, groups, _euclidean(features.stats.mean_outputs()[selected]))


def dominant_expert(selected, groups, features):
    """The k most important experts anchor the groups; every other kept expert joins the anchor whose mean
    output is most similar (cosine)."""
    outputs = torch.nn.functional.normalize(features.stats.mean_outputs().double(), dim=-1)
    anchors = selected[:groups]
    out = [[a] for a in anchors]
    for expert in selected[groups:]:
        similarity = outputs[anchors] @ outputs[expert]
        out[int(torch.argmax(similarity))].append(expert)
    return out


# Groupings on every expert's mean output over all calibration tokens: they need `calibrate --gram` statistics.
OUTPUT_GROUPINGS = ("output_cluster", "dominant_expert")

GROUPINGS: dict[str, Callable] = {
    "round_robin": round_robin,
    "weight_cluster": weight_cluster,
    "router_cluster": router_cluster,
    "dominant_expert": dominant_expert,
    "output_cluster": output_cluster,
}


def group_experts(selected: list[int], groups: int, grouping: str, features: GroupingFeatures) -> list[list[int]]:
    """Exactly `groups` non-empty groups partitioning `selected`, each in importance order."""
    if grouping not in GROUPINGS:
        raise M2DError(f"unknown grouping {grouping!r} (choose from {', '.join(GROUPINGS)})")
    if len(selected) == groups:  # pure pruning: every kept expert is its own group
        return [[e] for e in selected]
    rank = {e: r for r, e in enumerate(selected)}
    result = [sorted(g, key=rank.__getitem__) for g in GROUPINGS[grouping](selected, groups, features)]
    result.sort(key=lambda g: rank[g[0]])  # groups ordered by their dominant expert
    assert len(result) == groups and all(result), "a grouping broke its contract"
    assert sorted(e for g in result for e in g) == sorted(selected), "a grouping lost or duplicated experts"
    return result
