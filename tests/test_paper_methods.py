"""The methods as the paper defines them: CP (Eq. 3) from full-softmax probabilities, output-based groupings on
all-token means, the D-optimal ridge over the selected experts, score-proportional scaling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.calibration.store import LayerStats
from megatron_m2d.data.text import token_blocks
from megatron_m2d.densification.run import densify
from megatron_m2d.densification.scoring import KernelOptions, greedy_logdet, score_layer
from megatron_m2d.testing.tiny import byte_tokenizer
from tests.test_family_adapters import cli_error

TOKENS, SEQ = 512, 64


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_conditional_prob_is_the_papers_mean_softmax_probability_where_selected(family, tiny, text_dir, tmp_path):
    """A renormalising router (Qwen3 norm_topk_prob, Mixtral): CP_i computed by hand from the model's own softmax
    over all experts, averaged over the tokens where i is among the top-k; the renormalised weight the router
    applies gives other values (kept as --cp routing_weight)."""
    extra = {"norm_topk_prob": True} if family == "qwen3_moe" else {}
    teacher = tiny(family, **extra)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids = token_blocks(byte_tokenizer(), str(text_dir), TOKENS, SEQ)
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    stats = calibrate(teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, dtype="float32",
                      progress=False)  # the same fp32 router logits as the hand computation
    k, experts = model.config.num_experts_per_tok, logits[0].shape[-1]
    for layer in stats.moe_layers:
        total, hits, renormalised = [0.0] * experts, [0] * experts, [0.0] * experts
        for z in logits[layer].double():  # one token at a time
            p = [float(v) for v in torch.softmax(z, dim=0)]
            chosen = sorted(range(experts), key=lambda e: -p[e])[:k]
            for e in chosen:
                total[e] += p[e]
                hits[e] += 1
                renormalised[e] += p[e] / sum(p[c] for c in chosen)
        by_hand = torch.tensor([t / h if h else 0.0 for t, h in zip(total, hits)], dtype=torch.float64)
        weight = torch.tensor([r / h if h else 0.0 for r, h in zip(renormalised, hits)], dtype=torch.float64)
        measured = stats.layer(layer)
        assert torch.allclose(measured.conditional_prob, by_hand, atol=1e-6)  # default: the paper's Eq. 3
        routed = dataclasses.replace(measured, cp="routing_weight").conditional_prob
        assert torch.allclose(routed, weight, atol=1e-6)
        assert (routed - measured.conditional_prob).abs().max() > 1e-2  # the two readings differ here


def test_densify_plan_records_the_conditional_probability(tiny, text_dir, tmp_path):
    teacher = tiny("qwen3_moe", norm_topk_prob=True)
    stats = calibrate(teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, progress=False)
    plans = {cp: densify(teacher, tmp_path / cp, "conditional_prob", select=3, stats=stats.path, cp=cp,
                         progress=False).plan for cp in ("probability", "routing_weight")}
    for cp, plan in plans.items():
        assert plan["method"]["cp"] == cp
        layer = stats.layer(0) if cp == "probability" else dataclasses.replace(stats.layer(0), cp=cp)
        expected = layer.conditional_prob
        assert plan["layers"]["0"]["importance"] == pytest.approx(expected.tolist(), abs=1e-7)
    assert "| conditional probability | `probability`" in (tmp_path / "probability" / "README.md").read_text()


@pytest.mark.parametrize("grouping", ["output_cluster", "dominant_expert"])
def test_output_based_groupings_need_all_token_means(grouping, tiny, text_dir, tmp_path, capsys):
    """HC-SMoE clusters on every expert's mean output over ALL tokens: statistics without them are refused in one
    line (densify and sweep), never replaced by routed-token means; densify --data calibrates with them; with
    K = k nothing is grouped and nothing is needed."""
    teacher = tiny("qwen3_moe")
    stats = calibrate(teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, progress=False)
    err = cli_error(capsys, "densify", "--model", teacher, "--stats", stats.path, "--scoring", "reap", "--select", 4,
                    "--grouping", grouping, "--out", tmp_path / "dense")
    assert f"grouping {grouping} clusters on every expert's mean output over all tokens" in err
    assert "calibrate with --gram" in err and not (tmp_path / "dense").exists()
    err = cli_error(capsys, "sweep", "--model", teacher, "--stats", stats.path, "--scorings", "reap",
                    "--groupings", grouping, "--scalings", "uniform", "--select", "2,4", "--out", tmp_path / "sweep")
    assert "calibrate with --gram" in err
    densify(teacher, tmp_path / "pure", "reap", select=2, stats=stats.path, grouping=grouping, progress=False)
    result = densify(teacher, tmp_path / "calibrated", "reap", select=4, grouping=grouping, data=str(text_dir),
                     progress=False, calibration=dict(tokens=TOKENS, seq_len=SEQ))
    assert result.plan["calibration"]["gram"] is True


def kernel_stats(seed=0, E=10):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(E, 3, generator=g, dtype=torch.float64)  # rank 3: the ridge decides beyond 3 experts
    count = torch.full((E,), 10)
    sums = {"tokens": torch.tensor(100.0, dtype=torch.float64), "count": count,
            "prob_selected_sum": torch.rand(E, generator=g, dtype=torch.float64) * 10,
            "weight_sum": torch.rand(E, generator=g, dtype=torch.float64) * 10,
            "gram": (a @ a.T) * 100, "gram_gated": (a @ a.T) * 10}
    return LayerStats(0, sums, 2)


def test_d_optimal_ridge_divides_by_the_experts_selected_by_default():
    """lambda = mean(diag K) / K (selected, the public DO-ACP code) by default, / k (groups) as the option; the
    selection is exactly the greedy log-det design under that ridge, and the two options differ somewhere."""
    differ = False
    for seed in range(20):
        stats = kernel_stats(seed)
        weight = stats.conditional_prob
        kernel = weight.sqrt()[:, None] * stats.gram("all") * weight.sqrt()[None, :]
        mean_diag = float(kernel.diagonal().mean())
        default = score_layer(stats, "gram_logdet", 6, 2, KernelOptions(), seed=0).experts
        by_groups = score_layer(stats, "gram_logdet", 6, 2, KernelOptions(ridge="groups"), seed=0).experts
        assert default == greedy_logdet(kernel, 6, mean_diag / 6)
        assert by_groups == greedy_logdet(kernel, 6, mean_diag / 2)
        differ |= default != by_groups
    assert differ


def test_plan_scales_follow_the_score_proportional_rule(tiny, text_dir, tmp_path):
    """score_proportional: s_g = R * (summed importance of g) / (summed importance of all kept), R the mean total
    routing weight the model applies."""
    teacher = tiny("qwen2_moe")
    stats = calibrate(teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, progress=False)
    plan = densify(teacher, tmp_path / "dense", "reap", select=4, stats=stats.path, scaling="score_proportional",
                   progress=False).plan
    for layer, entry in plan["layers"].items():
        importance = torch.tensor(entry["importance"], dtype=torch.float64)
        mass = torch.stack([importance[g].sum() for g in entry["groups"]])
        total = stats.layer(int(layer)).mean_total_routed_weight
        assert entry["scales"] == pytest.approx((total * mass / mass.sum()).tolist(), rel=1e-6)
    assert json.loads((tmp_path / "dense" / "m2d_plan.json").read_text())["method"]["scaling"] == "score_proportional"
