"""Groupings partition the kept experts into exactly k non-empty groups; merges and scales follow methods.md."""

from __future__ import annotations

import pytest
import torch

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.densification.grouping import GROUPINGS, GroupingFeatures, agglomerate, group_experts
from megatron_m2d.densification.merge import FIELDS, concat_dense, group_scales, merge_group, merge_weights
from megatron_m2d.families.base import ExpertWeights
from megatron_m2d.densification.plan import Method, expert_weight_loader, plan_layer
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of
from megatron_m2d.io.checkpoint import Checkpoint


@pytest.fixture
def features(tiny, text_dir, tmp_path):
    model = tiny("qwen3_moe", num_experts=12, num_experts_per_tok=3)
    stats = calibrate(model, str(text_dir), tmp_path / "s", tokens=1024, seq_len=64, gram=True, progress=False)
    ckpt = Checkpoint(model)
    return ckpt, stats, GroupingFeatures(stats.layer(0), expert_weight_loader(ckpt, family_of(ckpt.config), 0))


@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_every_grouping_partitions_into_exactly_k_nonempty_groups(grouping, features):
    _, _, feats = features
    generator = torch.Generator().manual_seed(0)
    for select in range(1, 13):
        for groups in range(1, select + 1):
            selected = torch.randperm(12, generator=generator)[:select].tolist()
            result = group_experts(selected, groups, grouping, feats)
            assert len(result) == groups and all(result)
            assert sorted(e for g in result for e in g) == sorted(selected)
            rank = {e: r for r, e in enumerate(selected)}
            for g in result:  # members in importance order: the first is the group's dominant expert
                assert [rank[e] for e in g] == sorted(rank[e] for e in g)


def test_round_robin_and_dominant_expert_follow_their_definitions(features):
    _, _, feats = features
    selected = [5, 2, 9, 0, 7, 11, 3]
    assert group_experts(selected, 3, "round_robin", feats) == [[5, 0, 3], [2, 7], [9, 11]]
    groups = group_experts(selected, 3, "dominant_expert", feats)
    assert [g[0] for g in groups] == [5, 2, 9]  # the 3 most important experts anchor the groups
    outputs = torch.nn.functional.normalize(feats.stats.mean_outputs(), dim=-1)
    for expert in [0, 7, 11, 3]:
        best_anchor = max([5, 2, 9], key=lambda a: float(outputs[a] @ outputs[expert]))
        assert expert in next(g for g in groups if g[0] == best_anchor)


def test_agglomerate_merges_the_closest_items():
    points = torch.tensor([[0.0], [0.1], [5.0], [5.2], [10.0]])
    assert sorted(agglomerate(torch.cdist(points, points), 3)) == [[0, 1], [2, 3], [4]]
    # ties everywhere still give exactly k clusters
    assert len(agglomerate(torch.zeros(6, 6), 4)) == 4


def random_expert(g, inter=4, hidden=3, bias=False):
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    expert = ExpertWeights(t(inter, hidden), t(inter, hidden), t(hidden, inter))
    if bias:
        expert.gate_bias, expert.up_bias, expert.down_bias = t(inter), t(inter), t(hidden)
    return expert


def swiglu(e, v):
    gate = v @ e.gate.T + (e.gate_bias if e.gate_bias is not None else 0)
    up = v @ e.up.T + (e.up_bias if e.up_bias is not None else 0)
    return (torch.nn.functional.silu(gate) * up) @ e.down.T + (e.down_bias if e.down_bias is not None else 0)


def test_merge_is_the_score_weighted_average():
    g = torch.Generator().manual_seed(0)
    experts = [random_expert(g, bias=True) for _ in range(3)]
    importance = torch.tensor([0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    weights = merge_weights(importance, [1, 2, 3])
    assert torch.allclose(weights, torch.tensor([2 / 6, 1 / 6, 3 / 6], dtype=torch.float64))
    merged = merge_group(experts, weights)
    for part in FIELDS:  # biases merge like weights
        expected = sum(w * getattr(e, part) for w, e in zip(weights, experts))
        assert torch.allclose(getattr(merged, part).double(), expected, atol=1e-6)  # merged in float32
    # partial preservation: alpha = 1 is the average, alpha = 0 keeps the dominant expert
    for alpha, reference in ((1.0, merged), (0.0, experts[0])):
        partial = merge_group(experts, weights, "partial", alpha)
        assert all(torch.allclose(getattr(partial, f).double(), getattr(reference, f).double(), atol=1e-6)
                   for f in FIELDS)
    # zero importance everywhere: a plain average, never a division by zero
    assert torch.allclose(merge_weights(torch.zeros(4, dtype=torch.float64), [0, 1]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_scales_uniform_proportional_and_score_proportional():
    postselect = torch.tensor([0.3, 0.1, 0.2, 0.05, 0.15], dtype=torch.float64)
    groups = [[0, 3], [2], [1, 4]]
    assert group_scales(groups, postselect, "uniform", 1.0, 0.8) == pytest.approx([1 / 3] * 3)
    assert group_scales(groups, postselect, "uniform", 2.5, 0.8) == pytest.approx([2.5 / 3] * 3)
    scales = group_scales(groups, postselect, "proportional", 1.0, 0.8)
    assert sum(scales) == pytest.approx(0.8)  # = mean total routed weight
    assert scales == pytest.approx([0.8 * 0.35 / 0.8, 0.8 * 0.2 / 0.8, 0.8 * 0.25 / 0.8])
    # the mean total weight is what the model applies: DeepSeek's routed_scaling_factor is already in it
    assert sum(group_scales(groups, postselect, "proportional", 2.0, 2.0)) == pytest.approx(2.0)
    importance = torch.tensor([4.0, 1.0, 2.0, 0.0, 3.0], dtype=torch.float64)  # a scoring's importance
    scales = group_scales(groups, postselect, "score_proportional", 1.0, 0.8, importance)
    assert scales == pytest.approx([0.8 * 4 / 10, 0.8 * 2 / 10, 0.8 * 4 / 10])
    with pytest.raises(M2DError):
        group_scales(groups, postselect, "cubic", 1.0, 1.0)


@pytest.mark.parametrize("bias", [False, True])
def test_concat_dense_stacks_and_scales(bias):
    g = torch.Generator().manual_seed(1)
    reps = [random_expert(g, bias=bias) for _ in range(2)]
    shared = random_expert(g, inter=5)
    dense = concat_dense(reps, [0.25, 0.75], shared, 0.5, torch.float64)
    assert dense.gate.shape == (13, 3) and dense.down.shape == (3, 13)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    expected = 0.25 * swiglu(reps[0], x) + 0.75 * swiglu(reps[1], x) + 0.5 * swiglu(shared, x)
    assert torch.allclose(swiglu(dense, x), expected)
    assert (dense.down_bias is not None) == bias


def test_plan_validation_messages():
    with pytest.raises(M2DError, match="at least 1"):
        Method("reap", select=2, groups=0).validate(8)
    with pytest.raises(M2DError, match="exceeds"):
        Method("reap", select=9, groups=2).validate(8)
    with pytest.raises(M2DError, match="smaller than"):
        Method("reap", select=1, groups=2).validate(8)


def test_plan_layer_is_consistent(features):
    _, stats, feats = features
    plan = plan_layer(stats.layer(0), Method("gld_reap", select=6, groups=3, grouping="output_cluster",
                                             scaling="proportional"), feats)
    assert len(plan.selected) == 6 and len(plan.groups) == 3
    assert sorted(e for g in plan.groups for e in g) == sorted(plan.selected)
    assert all(abs(sum(w) - 1) < 1e-9 for w in plan.merge_weights)
    assert sum(plan.scales) == pytest.approx(stats.layer(0).mean_total_routed_weight)
