"""The sweep resumes after a kill; the baselines write loadable students of the right shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.baselines.d2d import d2d
from megatron_m2d.baselines.random_ffn import random_ffn
from megatron_m2d.calibration.run import calibrate
from megatron_m2d.errors import M2DError
from megatron_m2d.sweep import run as sweep_module
from megatron_m2d.sweep.run import sweep
from megatron_m2d.testing.tiny import byte_tokenizer

GRID = dict(scorings=["selection_freq", "gld_reap"], groupings=["round_robin", "output_cluster"],
            scalings=["uniform", "proportional"], selects=[2, 4])


def test_sweep_resumes_after_a_kill(tiny, text_dir, tmp_path, monkeypatch):
    model = tiny("qwen3_moe")
    stats = calibrate(model, str(text_dir), tmp_path / "stats", tokens=512, seq_len=64, gram=True, progress=False)
    common = dict(stats=stats.path, eval_data=str(text_dir), eval_tokens=512, seq_len=64, progress=False, **GRID)
    reference = {r["key"]: r["ppl"] for r in sweep(model, tmp_path / "whole", **common)}
    assert len(reference) == 16

    evaluated = []
    original = sweep_module.stream_perplexity

    def dies_after_five(*args, **kwargs):
        evaluated.append(1)
        if len(evaluated) == 6:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "stream_perplexity", dies_after_five)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        sweep(model, out, **common)
    finished = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert 5 <= len(finished) < 16
    monkeypatch.setattr(sweep_module, "stream_perplexity", original)
    resumed = sweep(model, out, **common)
    keys = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(reference) and len(keys) == 16  # nothing lost, nothing evaluated twice
    for row in resumed:
        assert row["ppl"] == pytest.approx(reference[row["key"]], rel=1e-6)
    # K = k: the groupings are one configuration; they are evaluated once and marked
    twins = [r for r in resumed if r["select"] == 2 and r["grouping"] == "output_cluster"]
    assert twins and all(r.get("same_as") for r in twins)
    for name in ("results.csv", "results.md", "ppl_by_scoring.png", "ppl_by_grouping.png"):
        assert (out / name).stat().st_size > 100
    # continuing with other evaluation settings would mix incomparable numbers: refused
    with pytest.raises(M2DError, match="other settings"):
        sweep(model, out, **{**common, "eval_tokens": 256})


def test_random_ffn_keeps_teacher_attention(tiny, tmp_path):
    teacher = tiny("qwen2_moe")
    out = random_ffn(teacher, tmp_path / "rand", seed=3, progress=False)
    student = AutoModelForCausalLM.from_pretrained(out)
    moe = AutoModelForCausalLM.from_pretrained(teacher)
    assert type(student).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, moe.model.layers[0].self_attn.q_proj.weight)
    width = 2 * 32 + 48  # k experts + the shared expert
    ffn = student.model.layers[0].mlp.gate_proj.weight
    assert ffn.shape[0] == width and abs(float(ffn.detach().std()) - 0.02) < 0.004
    again = AutoModelForCausalLM.from_pretrained(random_ffn(teacher, tmp_path / "again", seed=3, progress=False))
    assert torch.equal(again.model.layers[1].mlp.down_proj.weight, student.model.layers[1].mlp.down_proj.weight)


def dense_teacher(path):
    config = AutoConfig.for_model("qwen3", vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, eos_token_id=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("importance", ["minitron", "mean"])
def test_d2d_keeps_the_most_active_neurons(importance, tmp_path, text_dir):
    teacher = dense_teacher(tmp_path / "dense")
    out = d2d(teacher, str(text_dir), tmp_path / "pruned", width=16, tokens=512, seq_len=64, progress=False,
              importance=importance)
    record = json.loads((out / "m2d_d2d.json").read_text())
    assert record["importance"] == importance
    pruned = AutoModelForCausalLM.from_pretrained(out)
    full = AutoModelForCausalLM.from_pretrained(teacher)
    assert pruned.config.intermediate_size == 16
    # brute force from the full model's own forward on the same tokens: modelopt's mcore_minitron aggregation
    # (per-sequence mean |h|, squared, summed over sequences, square root) or the mean over all tokens
    from megatron_m2d.data.text import token_blocks
    blocks = token_blocks(byte_tokenizer(), str(text_dir), 512, 64)
    activations = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: activations.__setitem__(i, a[0]))
             for i, layer in enumerate(full.model.layers)]
    with torch.no_grad():
        full(input_ids=blocks)
    for h in hooks:
        h.remove()
    for layer in range(2):
        h = activations[layer].double().abs()  # [sequences, tokens, 48]
        score = h.mean(1).pow(2).sum(0).sqrt() if importance == "minitron" else h.reshape(-1, 48).mean(0)
        expected = sorted(torch.topk(score, 16).indices.tolist())
        assert record["kept"][str(layer)] == expected
        assert torch.equal(pruned.model.layers[layer].mlp.down_proj.weight,
                           full.model.layers[layer].mlp.down_proj.weight[:, expected])


def test_d2d_refuses_moe_and_bad_width(tiny, tmp_path, text_dir):
    with pytest.raises(M2DError, match="use `m2d densify`"):
        d2d(tiny("qwen3_moe"), str(text_dir), tmp_path / "x", width=8, progress=False)
    with pytest.raises(M2DError, match="--width"):
        d2d(dense_teacher(tmp_path / "dense"), str(text_dir), tmp_path / "y", width=99, progress=False)


def test_d2d_width_matched_to_a_students_parameter_count(tmp_path):
    """--match: the FFN width (multiple of 64) whose pruned model has the student's parameter count."""
    from megatron_m2d.baselines.d2d import matched_width, parameter_count
    from megatron_m2d.demo import FIXTURE_MOE
    from megatron_m2d.planning.shapes import student_of

    dense = AutoConfig.for_model("qwen3", vocab_size=1024, hidden_size=128, intermediate_size=1024,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    target = parameter_count(dense) - 3 * 3 * 128 * (1024 - 640) + 1000  # a model with width 640, give or take
    assert matched_width(dense, target) == 640
    with pytest.raises(M2DError, match="pick a smaller dense teacher"):
        matched_width(dense, 1000)
    # the fixture's dense sibling has the MoE's attention: it matches the K=k=2 student at the student's width
    fixture_dense = AutoConfig.from_pretrained(Path(FIXTURE_MOE).parent / "fixture-dense")
    student = student_of(AutoConfig.from_pretrained(FIXTURE_MOE), 2)
    assert matched_width(fixture_dense, parameter_count(student)) == student.intermediate_size == 256


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_sweep_rewrites_each_family_student_as_densify_writes_it(family, tiny, text_dir, tmp_path):
    """The sweep overwrites the loaded student's FFNs in place: DeepSeek's zero-padded dense FFN, GPT-OSS's one
    expert in its fused interleaved layout with biases. Each configuration's perplexity equals that of the
    checkpoint densify writes for it."""
    from megatron_m2d.data.text import token_stream
    from megatron_m2d.evaluation.perplexity import load_model, stream_perplexity

    model = tiny(family, layers=3)
    stats = calibrate(model, str(text_dir), tmp_path / "stats", tokens=512, seq_len=64, gram=True, progress=False)
    rows = sweep(model, tmp_path / "sweep", scorings=["reap", "selection_freq"], groupings=["weight_cluster"],
                 scalings=["proportional"], selects=[4], stats=stats.path, eval_data=str(text_dir),
                 eval_tokens=512, seq_len=64, save_checkpoints=True, progress=False)
    assert len({round(r["ppl"], 6) for r in rows}) == 2  # the configurations differ, and each is rewritten
    for row in rows:
        student, tokenizer = load_model(tmp_path / "sweep" / "checkpoints" / row["key"].replace("|", "_"))
        tokens = token_stream(tokenizer, str(text_dir), 512, role="eval")
        assert stream_perplexity(student, tokens, seq_len=64)["ppl"] == pytest.approx(row["ppl"], rel=1e-5)


def test_d2d_match_is_checked_as_an_input_model(tmp_path, capsys):
    from megatron_m2d.cli import main

    dense = Path(__file__).resolve().parent.parent / "megatron_m2d" / "assets" / "fixture-dense"
    code = main(["d2d", "--model", str(dense), "--match", str(tmp_path / "nope"), "--data", "fixture",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("m2d: error:") and "nope" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
