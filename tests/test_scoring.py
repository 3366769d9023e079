"""Scorings: formulas, the greedy D-optimal design, and its refusal to keep duplicates."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.calibration.store import LayerStats
from megatron_m2d.densification.scoring import SCORINGS, KernelOptions, greedy_logdet, score_layer
from megatron_m2d.errors import M2DError


def random_kernel(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return a @ a.T


def logdet(kernel, subset, ridge):
    sub = kernel[subset][:, subset] + ridge * torch.eye(len(subset), dtype=torch.float64)
    sign, value = torch.linalg.slogdet(sub)
    assert sign > 0
    return float(value)


@pytest.mark.parametrize("n,select,rank,ridge", [(10, 6, None, 0.1), (12, 8, 4, 0.05), (6, 6, 6, 1.0)])
def test_greedy_logdet_takes_the_best_marginal_gain_at_every_step(n, select, rank, ridge):
    kernel = random_kernel(n, rank, seed=n)
    chosen = greedy_logdet(kernel, select, ridge)
    assert len(set(chosen)) == select
    for step in range(select):
        prefix = chosen[:step]
        gains = {e: logdet(kernel, prefix + [e], ridge) for e in range(n) if e not in prefix}
        best = max(gains.values())
        assert gains[chosen[step]] == pytest.approx(best, abs=1e-9), step
        # and it is the first of equal gains (deterministic ties)
        assert chosen[step] == min(e for e, v in gains.items() if v >= best - 1e-9)


def test_greedy_logdet_beats_or_matches_every_other_start_on_small_e():
    """Sanity against exhaustive search: greedy is within the (1 - 1/e)-style bound in practice; here we check it
    is never worse than a random subset and reaches the optimum often on tiny cases."""
    kernel = random_kernel(7, seed=3)
    chosen = greedy_logdet(kernel, 3, 0.1)
    best = max(logdet(kernel, list(s), 0.1) for s in itertools.combinations(range(7), 3))
    assert logdet(kernel, chosen, 0.1) >= best - abs(best) * 0.25


def layer_stats(sums, top_k=2):
    return LayerStats(0, sums, top_k)


def fake_sums(E=6, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(0, 50, (E,), generator=g)
    count[2] = 0  # a never-selected expert
    weight = count.double() * torch.rand(E, generator=g, dtype=torch.float64)
    outs = torch.randn(E, 8, H, generator=g, dtype=torch.float64)
    flat = outs.reshape(E, -1)
    return {"tokens": torch.tensor(100.0, dtype=torch.float64), "count": count,
            "prob_sum": torch.rand(E, generator=g, dtype=torch.float64) * 30, "weight_sum": weight,
            "prob_selected_sum": count.double() * torch.rand(E, generator=g, dtype=torch.float64),
            "reap_sum": weight * 2.5, "out_sum": torch.randn(E, H, generator=g, dtype=torch.float64),
            "logit_sum": torch.zeros(E, dtype=torch.float64), "logit_outer": random_kernel(E, seed=seed + 1),
            "gram_gated": flat @ flat.T / 10, "gram": flat @ flat.T}


@pytest.mark.parametrize("cp,numerator", [("probability", "prob_selected_sum"), ("routing_weight", "weight_sum")])
def test_score_based_selections_follow_their_formulas(cp, numerator):
    sums = fake_sums()
    stats = dataclasses.replace(layer_stats(sums), cp=cp)
    T = 100.0
    expected = {
        "selection_freq": sums["count"].double() / T,
        "preselect_prob": sums["prob_sum"] / T,
        "postselect_prob": sums["weight_sum"] / T,
        "conditional_prob": torch.where(sums["count"] > 0, sums[numerator] / sums["count"].clamp(min=1), 0.0),
        "reap": torch.where(sums["count"] > 0, sums["reap_sum"] / sums["count"].clamp(min=1), 0.0),
    }
    assert float(expected["conditional_prob"][2]) == 0.0
    for name, values in expected.items():
        selection = score_layer(stats, name, 3, 2, KernelOptions(), seed=0)
        order = sorted(range(6), key=lambda e: (-float(values[e]), e))
        assert selection.experts == order[:3], name
        assert torch.allclose(selection.importance, values), name


def test_random_is_seeded_and_a_control():
    stats = layer_stats(fake_sums())
    a = score_layer(stats, "random", 4, 2, KernelOptions(), seed=7).experts
    assert a == score_layer(stats, "random", 4, 2, KernelOptions(), seed=7).experts
    others = {tuple(score_layer(stats, "random", 4, 2, KernelOptions(), seed=s).experts) for s in range(8)}
    assert len(others) > 1


def test_all_token_kernel_needs_gram_statistics():
    sums = fake_sums()
    del sums["gram"]
    with pytest.raises(M2DError, match="--gram"):
        score_layer(layer_stats(sums), "gld_reap", 3, 2, KernelOptions(gram="all"), seed=0)


def duplicates(boost):
    """Experts 0 and 1 identical in weights and router row in every layer: true duplicates, made popular by
    `boost` so that frequency-based scorings keep both (the trap D-optimal design must avoid)."""
    def edit(model):
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.experts.gate_up_proj[1] = mlp.experts.gate_up_proj[0]
            mlp.experts.down_proj[1] = mlp.experts.down_proj[0]
            mlp.gate.weight[0] += boost * mlp.gate.weight[0].sign()
            mlp.gate.weight[1] = mlp.gate.weight[0]
    return edit


def assert_never_both(stats, scoring, kernel, trap=False):
    for layer in stats.moe_layers:
        layer_stats_ = stats.layer(layer)
        assert min(layer_stats_.sums["count"][:2]) > 0
        if trap:  # frequency-based scoring keeps the popular pair
            assert {0, 1} <= set(score_layer(layer_stats_, "selection_freq", 2, 2, kernel, 0).experts)
        for select in range(2, 8):  # 8 experts, 7 distinct: a distinct one remains for every K < 8
            kept = score_layer(layer_stats_, scoring, select, 2, kernel, seed=0).experts
            assert not {0, 1} <= set(kept), (layer, select, kept)


@pytest.mark.parametrize("scoring,kernel", [
    ("gram_logdet", KernelOptions()), ("gld_reap", KernelOptions()), ("gram_logdet", KernelOptions(lambda_scale=0.1)),
    ("gld_reap", KernelOptions(lambda_scale=0.1)), ("gld_reap", KernelOptions(gram="all", activation="rms"))])
def test_d_optimal_never_keeps_both_duplicates(scoring, kernel, tiny, text_dir, tmp_path):
    """Default kernel (all-token Gram when recorded): duplicates are never both kept, even when the router's
    tie-breaking sends them different tokens."""
    model = tiny("qwen3_moe", edit=duplicates(boost=0.5))
    stats = calibrate(model, str(text_dir), tmp_path / "s", tokens=1024, seq_len=64, gram=True, progress=False)
    assert stats.layer(0).resolve_gram(kernel.gram) == "all"
    assert_never_both(stats, scoring, kernel)


@pytest.mark.parametrize("scoring", ["gram_logdet", "gld_reap"])
def test_gated_kernel_never_keeps_both_co_routed_duplicates(scoring):
    """The gate-weighted kernel sees duplicates when they also share their tokens and weights (then their
    gate-weighted Gram rows and routing statistics coincide). Synthetic statistics: with real routers, ties
    between identical logits are broken arbitrarily, so duplicates rarely share every token."""
    sums = fake_sums(E=8, seed=5)
    sums["count"][2] = 3  # every expert routed: a never-routed one has zero weight, so it adds nothing at all
    sums["weight_sum"][2], sums["reap_sum"][2], sums["prob_selected_sum"][2] = 1.0, 2.5, 1.5
    for name in ("count", "weight_sum", "reap_sum", "prob_sum", "prob_selected_sum"):
        sums[name][1] = sums[name][0] = sums[name].max() + 1  # the pair is the most popular: the trap
    gated = sums["gram_gated"]
    gated[1, :], gated[:, 1] = gated[0, :], gated[:, 0]
    gated[1, 1] = gated[0, 0]
    stats = layer_stats(sums)
    assert set(score_layer(stats, "selection_freq", 2, 2, KernelOptions(), 0).experts) == {0, 1}
    for select in range(2, 8):
        kept = score_layer(stats, scoring, select, 2, KernelOptions(gram="gated"), seed=0).experts
        assert not {0, 1} <= set(kept), (select, kept)


def test_unknown_scoring_is_refused():
    with pytest.raises(M2DError, match="unknown scoring"):
        score_layer(layer_stats(fake_sums()), "magic", 2, 2, KernelOptions(), 0)
    assert len(SCORINGS) == 8
