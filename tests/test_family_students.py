"""Every family's densified student: transformers loads it with no custom code and generates (test_export), and its
Megatron-Core conversion round-trips bitwise and gives the HF logits."""

from __future__ import annotations

import pytest

from megatron_m2d.densification.run import densify
from megatron_m2d.errors import M2DError
from tests.conftest import FAMILIES
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)
from tests.convert_models import assert_logits_match, assert_round_trip, hf_logits, ids_for, megatron_logits


@pytest.mark.parametrize("family,extra", [(f, {}) for f in FAMILIES] + [
    ("qwen3_moe", {"layers": 3, "mlp_only_layers": [1], "intermediate_size": 96})])  # one-expert student
def test_student_converts_bitwise_and_gives_hf_logits(megatron_cpu, family, extra, tiny, text_dir, tmp_path):  # noqa: F811
    """Every family's student, as densify writes it: dense classes (Qwen3, Qwen2, Mistral), DeepSeek's own class
    with every layer dense (MLA kept), the one-expert students (GPT-OSS with biases; Qwen3-MoE whose dense layer
    is wider): HF -> Megatron -> HF bitwise, and HF's logits (fp32 on CPU: the two implementations order a few
    sums differently, 1e-4 on logits of order 1). OLMoE's student is an OLMoE, refused with the reason."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.convert.megatron_model import megatron_core_version

    teacher = tiny(family, **({"layers": 3} if family in ("deepseek_v2", "deepseek_v3") else {}), **extra)
    student = densify(teacher, tmp_path / "dense", "gld_reap", data=str(text_dir), progress=False,
                      calibration=dict(tokens=256, seq_len=64)).path
    if family == "olmoe":
        with pytest.raises(M2DError, match="normalises each head separately"):
            hf_to_megatron_checkpoint(student, tmp_path / "megatron")
        return
    if family in ("deepseek_v2", "emo_like") and megatron_core_version() >= (0, 19):
        pytest.skip("megatron-core 0.19 builds MLA only with q compression (see build_gpt_model)")
    checkpoint, _ = assert_round_trip(student, tmp_path)
    ids = ids_for(11)
    assert_logits_match(megatron_logits(checkpoint, ids), hf_logits(student, ids), atol=1e-4)


@pytest.mark.parametrize("family,fields", [("gpt_oss", {"num_local_experts": 4}), ("qwen3_moe", {"num_experts": 4})])
def test_renormalised_top1_over_several_experts_is_refused(family, fields):
    """megatron-core softmaxes over all experts before a top-1 choice: a teacher whose top-1 weight is always 1.0
    (renormalised) over several experts has no Megatron equivalent; one line, not megatron-core's ValueError."""
    from megatron_m2d.convert.megatron_model import transformer_config_kwargs
    from megatron_m2d.testing.tiny import tiny_config

    config = tiny_config(family, num_experts_per_tok=1, norm_topk_prob=True, **fields)
    with pytest.raises(M2DError, match="renormalised top-1 routing over 4 experts"):
        transformer_config_kwargs(config)
