"""Where the MoE -> dense transformation is exact, the dense logits must equal the MoE logits.

Tolerance: fp32 throughout; the dense FFN computes the same products as the MoE but sums them in another order
(one wide matmul instead of k small ones plus index_add), so differences are fp32 re-association noise, ~1e-6
relative. atol = 1e-4 on logits of magnitude ~1 leaves two orders of margin and still fails on any real error
(a wrong scale, expert or layer changes logits by >= 1e-2 on these models).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2d.densification.run import densify
from megatron_m2d.families import FAMILIES as ADAPTERS
from megatron_m2d.testing.tiny import tiny_config
from tests.conftest import FAMILIES

ATOL = 1e-4


def logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_report(path):
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}


def identical_experts(model):
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):  # every stack, biases included (GPT-OSS)
            for param in mlp.experts.parameters(recurse=False):
                param[:] = param[0].clone()
        if hasattr(mlp, "shared_expert_gate"):  # a constant sigmoid gate (0.5): its calibration mean is exact
            mlp.shared_expert_gate.weight.zero_()


def constant_router(model):
    for layer in model.model.layers:
        router = getattr(layer.mlp, "gate", None) or getattr(layer.mlp, "router", None)
        if router is not None:  # weight, GPT-OSS's bias and DeepSeek-V3's correction bias
            for tensor in [*router.parameters(), *router.buffers()]:
                tensor.zero_()
        if hasattr(layer.mlp, "shared_expert_gate"):
            layer.mlp.shared_expert_gate.weight.zero_()


def model_type(family):
    return tiny_config(family).model_type


def renormalises(family):
    """Whether the tiny teacher's top-k weights can be made to sum to one (norm_topk_prob where it is a choice):
    transformers' DeepSeek-V2 router never renormalises, so identical experts are not exact there."""
    adapter = ADAPTERS[model_type(family)]
    return adapter.renormalizes(tiny_config(family, norm_topk_prob=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("select,grouping", [(2, "round_robin"), (5, "output_cluster")])
def test_identical_experts_are_exact(family, select, grouping, tiny, text_dir, tmp_path):
    """(a) All experts identical, renormalising router, uniform scaling: dense == MoE (DeepSeek-V3 with its
    routed_scaling_factor 2.5 and shared expert, GPT-OSS with its biases). With K > k the groups merge identical
    experts, which is still exact."""
    if not renormalises(family):
        pytest.skip("the router never renormalises: covered by the all-experts-active test")
    teacher = tiny(family, edit=identical_experts, norm_topk_prob=True)
    student = densify(teacher, tmp_path / "dense", "selection_freq", select=select, grouping=grouping,
                      data=str(text_dir), progress=False, calibration=dict(tokens=512, seq_len=64)).path
    assert load_report(student) == {}
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    expected, got = logits(teacher, ids), logits(student, ids)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_active_constant_router_is_exact(family, tiny, text_dir, tmp_path):
    """(b) top-k = E, constant router, K = E: each expert weighs 1/E (times DeepSeek's routed_scaling_factor), as
    uniform scaling gives."""
    num_experts = 4
    field = ADAPTERS[model_type(family)].num_experts_field
    groups = {"n_group": 1, "topk_group": 1} if model_type(family) == "deepseek_v3" else {}
    teacher = tiny(family, edit=constant_router, **{field: num_experts, "num_experts_per_tok": num_experts}, **groups)
    student = densify(teacher, tmp_path / "dense", "conditional_prob", select=num_experts,
                      data=str(text_dir), progress=False, calibration=dict(tokens=512, seq_len=64)).path
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(2))
    expected, got = logits(teacher, ids), logits(student, ids)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


def test_tied_embeddings_are_exact(tiny, text_dir, tmp_path):
    """Tied input/output embeddings (the fixture, many small models): the head is not stored twice."""
    teacher = tiny("qwen3_moe", edit=identical_experts, tie_word_embeddings=True)
    student = densify(teacher, tmp_path / "dense", "reap", data=str(text_dir), progress=False,
                      calibration=dict(tokens=512, seq_len=64)).path
    assert load_report(student) == {}
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(logits(student, ids), logits(teacher, ids), atol=ATOL, rtol=0)


def test_pruning_changes_logits(tiny, text_dir, tmp_path):
    """The exactness tests above could pass vacuously if the FFN did not matter: with distinct experts and K < E
    the dense model must differ from the teacher."""
    teacher = tiny("qwen3_moe")
    student = densify(teacher, tmp_path / "dense", "selection_freq", data=str(text_dir), progress=False,
                      calibration=dict(tokens=512, seq_len=64)).path
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(3))
    assert (logits(student, ids) - logits(teacher, ids)).abs().max() > 1e-3


def test_teacher_dense_layers_of_another_width_use_the_one_expert_layout(tiny, text_dir, tmp_path):
    """Qwen3-MoE with an mlp_only layer wider than k*I: the dense class cannot hold two widths, so the student is
    a Qwen3-MoE with one expert; the teacher's dense layer is copied and the result is still exact."""
    teacher = tiny("qwen3_moe", layers=3, mlp_only_layers=[1], intermediate_size=96, edit=identical_experts)
    result = densify(teacher, tmp_path / "dense", "reap", data=str(text_dir), progress=False,
                     calibration=dict(tokens=512, seq_len=64))
    assert result.plan["student"]["layout"] == "one_expert"
    assert result.plan["student"]["architecture"] == "Qwen3MoeForCausalLM"
    assert sorted(result.plan["layers"]) == ["0", "2"]
    assert load_report(result.path) == {}
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(logits(result.path, ids), logits(teacher, ids), atol=ATOL, rtol=0)
