"""The planner's arithmetic: exact parameter counts and FLOPs against real models, the memory terms' behaviour
under each parallel setting, and the search for the smallest change that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.errors import M2DError
from megatron_m2d.planning.flops import forward_flops, matmul_params, mean_context, step_flops
from megatron_m2d.planning.layout import ACCELERATORS, GiB, Layout
from megatron_m2d.planning.memory import memory_plan
from megatron_m2d.planning.plan import make_plan
from megatron_m2d.planning.report import format_plan, plan_to_dict
from megatron_m2d.planning.shapes import ModelShape, read_hf_config, student_of
from megatron_m2d.testing.tiny import tiny_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"


def tiny_configs() -> dict:
    """One small config of every family the converter maps (MoE teachers and dense students)."""
    dense = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    deepseek = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32,
                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1)
    return {
        "qwen3": AutoConfig.for_model("qwen3", head_dim=16, **dense),
        "qwen2": AutoConfig.for_model("qwen2", tie_word_embeddings=True, **dense),
        "llama": AutoConfig.for_model("llama", **dense),
        "qwen3_moe": tiny_config("qwen3_moe", vocab_size=384),
        "qwen2_moe": tiny_config("qwen2_moe", vocab_size=384, mlp_only_layers=[0]),
        "mixtral": tiny_config("mixtral", vocab_size=384),
        "deepseek_v2": AutoConfig.for_model("deepseek_v2", q_lora_rank=None, **deepseek),
        "deepseek_v3": AutoConfig.for_model("deepseek_v3", q_lora_rank=48, **deepseek),
        "gpt_oss": AutoConfig.for_model("gpt_oss", vocab_size=384, hidden_size=64, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    }


CONFIGS = tiny_configs()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_equals_the_hf_model(name):
    config = CONFIGS[name]
    shape = ModelShape.from_hf_config(config, vocab_rows=config.vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # DeepSeek-V3's routing correction bias is a buffer in HF, a (frozen) tensor of the checkpoint for us
    held = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert shape.total_params() == held


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_equal_torch_flop_counter(name):
    """torch's FlopCounterMode counts the matmuls of a real HF forward (eager attention and experts, which
    compute the full s x s scores and only the routed tokens): our matmul count plus full-context attention
    equals it exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    config = CONFIGS[name]
    config._attn_implementation, config._experts_implementation = "eager", "eager"
    shape = ModelShape.from_hf_config(config, vocab_rows=config.vocab_size)
    model = AutoModelForCausalLM.from_config(config).eval()
    seq = 48
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, seq)))
    full_attention = 2 * shape.heads * (shape.qk_head_dim + shape.v_head_dim) * seq * seq * shape.layers
    assert counter.get_total_flops() == 2 * matmul_params(shape) * seq + full_attention


def test_causal_context_is_the_mean_over_positions():
    for seq, window in ((1, None), (7, None), (64, 4), (64, 64), (64, 100), (5, 1)):
        brute = sum(min(i + 1, window or seq) for i in range(seq)) / seq
        assert mean_context(seq, window) == pytest.approx(brute)


def headline(groups: int = 8):
    teacher_config = read_hf_config(EXAMPLES / "qwen3-30b-a3b")
    return (ModelShape.from_hf_config(student_of(teacher_config, groups), name="student"),
            ModelShape.from_hf_config(teacher_config, name="teacher"))


def test_headline_sizes_and_flops_match_the_published_figures():
    """Qwen3-30B-A3B: 30.5 B parameters, 3.3 B active; the K=8 student 3.34 B; per token ~23 GFLOP to train
    the student and ~7.6 GFLOP for the teacher's forward (megatron-distill.md's estimates)."""
    student, teacher = headline()
    assert teacher.total_params() / 1e9 == pytest.approx(30.5, abs=0.05)
    assert teacher.active_params() / 1e9 == pytest.approx(3.35, abs=0.05)
    assert student.total_params() / 1e9 == pytest.approx(3.34, abs=0.01)
    flops = step_flops(student, teacher, 4096)
    assert flops.student_training / 1e9 == pytest.approx(23.0, rel=0.01)
    assert flops.teacher_forward.total / 1e9 == pytest.approx(7.6, rel=0.02)
    # running the teacher with twice its experts per token adds their matmuls only
    doubled = step_flops(student, teacher, 4096, teacher_top_k=16).teacher_forward
    expert = 2 * 3 * teacher.hidden * teacher.expert_ffn * teacher.layers
    assert doubled.matmul - flops.teacher_forward.matmul == pytest.approx(8 * expert)


def test_sliding_windows_count_what_they_compute():
    shape = ModelShape.from_hf_config(CONFIGS["gpt_oss"], vocab_rows=384)
    assert shape.windows == (4, None)
    per_key = 2 * shape.heads * (shape.qk_head_dim + shape.v_head_dim)
    assert forward_flops(shape, 64).attention == pytest.approx(per_key * (mean_context(64, 4) + 32.5))


def layout(**changes) -> Layout:
    return Layout(gpus=8, seq_len=4096, global_batch=256, teacher_ep=8).with_changes(**changes)


def total(student, teacher, **changes) -> float:
    return memory_plan(student, teacher, layout(**changes), reserve=0).total


def part(student, teacher, key, **changes) -> float:
    return memory_plan(student, teacher, layout(**changes), reserve=0).part(key).bytes


def test_memory_terms_follow_the_layout():
    student, teacher = headline()
    params = student.total_params()
    assert part(student, teacher, "student_weights") == pytest.approx(2 * params)
    assert part(student, teacher, "student_grads") == pytest.approx(4 * params)
    assert part(student, teacher, "optimizer") == pytest.approx(12 * params / 8)
    assert part(student, teacher, "optimizer", use_distributed_optimizer=False) == pytest.approx(12 * params)
    # experts are spread over EP ranks: 16 of 128 per GPU at EP 8, all at EP 1
    experts = 48 * 128 * teacher.expert_params() * 2
    dense = 2 * teacher.total_params() - experts
    assert part(student, teacher, "teacher_weights", teacher_ep=1) == pytest.approx(dense + experts)
    assert part(student, teacher, "teacher_weights") == pytest.approx(dense + experts / 8)
    # recompute and sequence parallelism only ever lower activations; TP splits weights
    none = part(student, teacher, "activations")
    assert part(student, teacher, "activations", recompute="full") < none / 10
    assert part(student, teacher, "activations", tp=2, sequence_parallel=True) < \
        part(student, teacher, "activations", tp=2) < none
    assert part(student, teacher, "student_weights", tp=2) == pytest.approx(params, rel=0.01)
    # the micro-batch scales activations linearly; the first of 4 pipeline stages holds 4 in flight
    assert part(student, teacher, "activations", micro_batch=2) == pytest.approx(2 * none, rel=0.01)
    stage0 = memory_plan(student, teacher, layout(pp=4, teacher_ep=2), reserve=0)
    assert stage0.stage == 0 and stage0.part("activations").bytes == pytest.approx(none, rel=0.02)
    # FP8 adds the cached FP8 weights
    assert total(student, teacher, fp8="hybrid") > total(student, teacher)


def test_a_layout_that_does_not_fit_names_the_part_and_the_smallest_fix():
    student, teacher = headline()
    h100 = ACCELERATORS["h100"]
    plan = make_plan(student, teacher, layout(teacher_ep=1), h100, mfu=0.4, tokens=4e9)
    assert not plan.fits and plan.overflowing.startswith("teacher weights")
    assert plan.fix is not None and plan.fix.changes == ("--teacher-ep 4",)
    assert plan.fix.memory.total <= h100.memory
    # one more step down is needed when the optimizer is not sharded either; cheaper moves come first
    plan = make_plan(student, teacher, layout(teacher_ep=1, use_distributed_optimizer=False), h100, 0.4, 4e9)
    assert "--use-distributed-optimizer" in plan.fix.changes and plan.fix.memory.total <= h100.memory
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "smallest change that fits" in text
    fitting = make_plan(student, teacher, layout(), h100, mfu=0.4, tokens=4e9)
    assert fitting.fits and fitting.fix is None and "fits" in format_plan(fitting)


def test_time_and_gpu_hours():
    student, teacher = headline()
    plan = make_plan(student, teacher, layout(), ACCELERATORS["h100"], mfu=0.4, tokens=4e9)
    per_gpu = 0.4 * 989.4e12 / plan.flops.total
    assert plan.tokens_per_second_per_gpu == pytest.approx(per_gpu)
    assert plan.steps == 3815  # ceil(4e9 / (256 x 4096))
    assert plan.gpu_hours == pytest.approx(3815 * 256 * 4096 / per_gpu / 3600)
    on_64 = make_plan(student, teacher, layout(gpus=64), ACCELERATORS["h100"], mfu=0.4, tokens=4e9)
    assert on_64.seconds == pytest.approx(plan.seconds / 8) and on_64.gpu_hours == pytest.approx(plan.gpu_hours)
    assert plan_to_dict(plan)["memory"]["total"] == plan.memory.total


@pytest.mark.parametrize("changes,message", [
    (dict(tp=3), "TP 3 does not divide"), (dict(pp=5), "PP 5 does not divide"),
    (dict(teacher_ep=3), "teacher EP 3"), (dict(global_batch=100), "global batch 100"),
    (dict(gpus=6), "6 GPUs"), (dict(micro_batch=0), "--micro-batch must be >= 1"),
    (dict(fp8="hybrid", impl="local"), "FP8 needs Transformer Engine"),
    (dict(teacher_top_k=129), "--teacher-top-k 129"),
])
def test_impossible_layouts_are_refused_in_one_line(changes, message):
    student, teacher = headline()
    with pytest.raises(M2DError, match=message):
        make_plan(student, teacher, layout(**changes), ACCELERATORS["h100"], mfu=0.4, tokens=4e9)


def test_one_expert_students_are_planned_at_their_expert_width():
    """GPT-OSS students are the family's own class with one expert of width k x I and top-1 routing."""
    teacher_config = read_hf_config(EXAMPLES / "gpt-oss-20b")
    student = ModelShape.from_hf_config(student_of(teacher_config, 4))
    assert (student.experts, student.top_k, student.expert_ffn) == (1, 1, 4 * 2880)
    assert student.token_ffn_width == 4 * 2880
    teacher = ModelShape.from_hf_config(teacher_config)
    memory = memory_plan(student, teacher, layout(), reserve=0)
    # its single expert is trained like any weight: in the student's weights, not spread over EP ranks
    assert memory.part("student_weights").bytes == pytest.approx(2 * student.total_params(), rel=0.01)


def test_student_of_refuses_bad_group_counts():
    teacher_config = read_hf_config(EXAMPLES / "qwen3-30b-a3b")
    with pytest.raises(M2DError, match="--groups 0"):
        student_of(teacher_config, 0)
    assert student_of(teacher_config, 4).intermediate_size == 4 * 768


def test_converted_directory_gives_the_same_shape(tmp_path):
    """A `m2d convert` directory is read through its m2d_convert.json (HF config + padded vocabulary)."""
    import json

    from megatron_m2d.convert.provider import FORMAT, META

    config = CONFIGS["qwen3"]
    (tmp_path / META).write_text(json.dumps({"format": FORMAT, "hf_config": config.to_dict(), "vocab_rows": 512,
                                             "parallel": {"tp": 1, "pp": 1, "ep": 1, "vpp": None},
                                             "dtype": "bfloat16", "hf_dtypes": {}}))
    shape = ModelShape.from_dir(tmp_path)
    assert shape.vocab_rows == 512 and shape.layers == 2
    assert shape.total_params() == ModelShape.from_hf_config(config, vocab_rows=512).total_params()
    with pytest.raises(M2DError, match="neither m2d_convert.json nor config.json"):
        ModelShape.from_dir(tmp_path / "missing")
