"""The family adapters compute what transformers computes: one expert's output, the routing, the packing of an
expert into the module's stacks; MXFP4 experts dequantise exactly as transformers dequantises them; and a
checkpoint that disagrees with its config is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.densification.run import densify
from megatron_m2d.families import FAMILIES, family_of
from megatron_m2d.families.experts import expert_outputs, pack_expert
from megatron_m2d.io import mxfp4
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.testing.tiny import with_mxfp4_experts
from tests.conftest import FAMILIES as CASES
from tests.test_errors import run_cli
from tests.test_statistics import SEQ, TOKENS, brute_force


def model_and_family(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, family_of(model.config)


@pytest.mark.parametrize("case", CASES)
def test_expert_outputs_and_packing_match_transformers(case, tiny):
    """E_i(x) equals the experts module's own forward with every token routed to i alone (weight 1), for all
    experts at once and for a subset; packing the checkpoint's expert i reproduces the module's stacks."""
    path = tiny(case)
    model, family = model_and_family(path)
    ckpt = Checkpoint(path)
    layer = family.moe_layers(model.config)[0]
    experts = model.model.layers[layer].mlp.experts
    x = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = torch.stack([experts(x, torch.full((13, 1), e), torch.ones(13, 1))
                                 for e in range(family.num_experts(model.config))])
        assert torch.allclose(expert_outputs(experts, x), reference, atol=1e-6, rtol=1e-5)
        assert torch.allclose(expert_outputs(experts, x, [3, 1]), reference[[3, 1]], atol=1e-6, rtol=1e-5)
    for e in (0, family.num_experts(model.config) - 1):
        for name, row in pack_expert(experts, family.read_expert(ckpt, layer, e)).items():
            assert torch.equal(row, getattr(experts, name)[e]), (e, name)


def test_deepseek_v3_routing_selects_with_the_correction_bias_and_weights_without_it(tiny):
    """The selection is top-k of sigmoid + e_score_correction_bias inside the chosen groups; the applied weights
    are the selected sigmoid scores, renormalised (norm_topk_prob), times routed_scaling_factor (2.5); the paper's
    p_t is the sigmoid score."""
    model, family = model_and_family(tiny("deepseek_v3"))
    mlp = model.model.layers[1].mlp
    x = torch.randn(200, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routing = family.route(mlp, x)
    scores = torch.sigmoid(x @ mlp.gate.weight.T)
    assert torch.allclose(routing.probs, scores, atol=1e-6)
    applied = scores.gather(1, routing.indices)
    assert torch.allclose(routing.weights, 2.5 * applied / applied.sum(-1, keepdim=True), atol=1e-6)
    # the bias moves the choice away from the plain top-k of the scores on some tokens (it matters here)
    plain = torch.topk(scores, 2, dim=-1).indices.sort(-1).values
    assert (routing.indices.sort(-1).values != plain).any()


def test_deepseek_v2_group_limited_greedy_statistics_match_brute_force(tiny, text_dir, tmp_path):
    """DeepSeek-V2's group_limited_greedy top-k (the top topk_group groups by their best expert, then top-k inside
    them), streamed: the same selection and applied weights as the HF model's own forward, and a selection that
    differs from plain greedy top-k on some tokens (the group limit acts)."""
    teacher = tiny("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=1)
    reference = brute_force(teacher, text_dir)
    stats = calibrate(teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, dtype="float32",
                      progress=False)  # fp32 like the reference: bf16 GEMMs would flip near-tied selections
    greedy = calibrate(tiny("deepseek_v2", name="plain", topk_method="greedy"), str(text_dir),
                       tmp_path / "greedy-stats", tokens=TOKENS, seq_len=SEQ, dtype="float32", progress=False)
    for layer, ref in reference.items():
        sums = stats.layer(layer).sums
        assert torch.equal(sums["count"], ref["count"])
        assert torch.allclose(sums["weight_sum"], ref["weight_sum"], atol=1e-5)
        assert torch.allclose(sums["prob_selected_sum"], ref["prob_selected_sum"], atol=1e-5)
        assert not torch.equal(sums["count"], greedy.layer(layer).sums["count"])


def test_mxfp4_dequantisation_equals_transformers(tmp_path):
    """Every FP4 code and a range of exponents, on the same tensors: bitwise equal to transformers' own
    dequantisation (whole stacks and one expert's rows), in bfloat16 and float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 64, 2, 16), generator=g, dtype=torch.uint8)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # both nibbles through all 16 codes
    scales = torch.randint(100, 150, (3, 64, 2), generator=g, dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert theirs.shape == (3, 64, 64)
        assert torch.equal(mxfp4.dequantise(blocks, scales, dtype), theirs)
        assert torch.equal(mxfp4.dequantise(blocks[1], scales[1], dtype), theirs[1])


@pytest.fixture
def mxfp4_teacher(tiny, tmp_path):
    return with_mxfp4_experts(tiny("gpt_oss", dtype=torch.bfloat16), tmp_path / "mxfp4")


def test_mxfp4_statistics_match_brute_force_on_transformers_dequantised_model(mxfp4_teacher, text_dir, tmp_path):
    """Calibrating the MXFP4 checkpoint (dequantised one expert at a time) gives the brute-force statistics of the
    model transformers itself loads from it (it dequantises MXFP4 on CPU)."""
    reference = brute_force(mxfp4_teacher, text_dir)
    stats = calibrate(mxfp4_teacher, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, gram=True,
                      dtype="float32", progress=False)  # the reference computes in fp32
    for layer, ref in reference.items():
        sums = stats.layer(layer).sums
        assert torch.equal(sums["count"], ref["count"])
        for name in ("prob_selected_sum", "weight_sum", "reap_sum", "gram", "out_sum_all"):
            error = float((sums[name].double() - ref[name]).abs().max())
            assert error <= 1e-5 + 1e-5 * float(ref[name].abs().max()), (name, error)


def test_mxfp4_densify_equals_densify_of_the_dequantised_copy(mxfp4_teacher, text_dir, tmp_path):
    """The same student, bitwise, from the MXFP4 checkpoint and from transformers' dequantised save of it; no
    quantization_config in the student."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dequantised = tmp_path / "dequantised"
    dequantised.mkdir()
    packed = load_file(mxfp4_teacher / "model.safetensors")
    tensors = {k: v for k, v in packed.items() if not k.endswith(("_blocks", "_scales"))}
    for name in [k.removesuffix("_blocks") for k in packed if k.endswith("_blocks")]:
        tensors[name] = convert_moe_packed_tensors(packed[name + "_blocks"], packed[name + "_scales"])
    save_file(tensors, dequantised / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dequantised / name).write_bytes((mxfp4_teacher / name).read_bytes())
    config = json.loads((mxfp4_teacher / "config.json").read_text())
    config.pop("quantization_config")
    (dequantised / "config.json").write_text(json.dumps(config))
    students = []
    for teacher in (mxfp4_teacher, dequantised):
        stats = calibrate(teacher, str(text_dir), tmp_path / f"stats-{teacher.name}", tokens=256, seq_len=64,
                          progress=False)
        students.append(densify(teacher, tmp_path / f"dense-{teacher.name}", "reap", select=4, stats=stats.path,
                                progress=False).path)
    a, b = (load_file(s / "model-00001-of-00001.safetensors") for s in students)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantization_config" not in json.loads((students[0] / "config.json").read_text())


def cli_error(capsys, *args) -> str:
    """The one `m2d: error:` line of a refused command (exit 2)."""
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("m2d: error: "), err
    return err[0]


def test_mxfp4_tensor_of_the_wrong_shape_is_one_line(mxfp4_teacher, text_dir, tmp_path, capsys):
    tensors = load_file(mxfp4_teacher / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[key] = tensors[key][:, :, :1].repeat(1, 1, 2).contiguous()  # one group too many for its blocks
    save_file(tensors, mxfp4_teacher / "model.safetensors", metadata={"format": "pt"})
    for command in (["calibrate", "--data", text_dir], ["densify", "--scoring", "reap", "--data", text_dir]):
        err = cli_error(capsys, *command, "--model", mxfp4_teacher, "--out", tmp_path / "out")
        assert "down_proj: MXFP4 blocks" in err and "do not fit" in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["deepseek_v2", "gpt_oss", "qwen3_moe"])
def test_config_expert_count_disagreeing_with_weights_is_one_line(case, tiny, text_dir, tmp_path, capsys):
    """Per-expert (DeepSeek, Qwen3) and fused (GPT-OSS) layouts: a config announcing more experts than the weights
    hold, or fewer, is refused before any work."""
    teacher = tiny(case)
    loaded = AutoConfig.from_pretrained(teacher)
    family = family_of(loaded)
    field = loaded.attribute_map.get(family.num_experts_field, family.num_experts_field)  # the name on disk
    config = json.loads((teacher / "config.json").read_text())
    for count in (config[field] + 2, config[field] - 1):
        (teacher / "config.json").write_text(json.dumps({**config, field: count}))
        for command in (["calibrate", "--data", text_dir], ["densify", "--scoring", "reap", "--data", text_dir]):
            err = cli_error(capsys, *command, "--model", teacher, "--out", tmp_path / "out")
            assert f"routed experts, its config says {family.num_experts_field} = {count}" in err
            assert not (tmp_path / "out").exists()


def test_every_family_declares_a_known_dense_target():
    for family in FAMILIES.values():
        assert family.dense_model_type is None or family.dense_model_type in (
            "qwen3", "qwen2", "mistral", family.model_type)
