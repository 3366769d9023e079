"""The Megatron distillation engine on CPU (gloo, tiny models): one step gives the HF backend's loss and gradients;
TP2, PP2, DP2 and an EP2 teacher give the TP1 loss curve; only the student trains; the teacher is checked
against its HF checkpoint (bad input through the CLI: test_megatron_run.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_m2d.convert.provider import read_provider_config
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)
from tests.megatron_engine import (hf_grads_in_megatron_layout, hf_step, make_pair, megatron_grads, micro_batches,
                                   run_config, run_engine, token_ids)

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def engine_for(pair, out, **settings):
    from megatron_m2d.distillation.megatron.loop import build_engine
    from megatron_m2d.distillation.megatron.parallel import initialize

    config = run_config(pair, out, **settings)
    return build_engine(config, initialize(config), pair["student"], pair["teacher"], torch.device("cpu"))


@pytest.mark.parametrize("temperature, kd_weight", [(1.0, 1.0), (2.0, 0.6)])
def test_one_step_gives_the_hf_backends_loss_and_gradients(megatron_cpu, pair, temperature, kd_weight,  # noqa: F811
                                                           tmp_path):
    """TP1, fp32, two micro-batches of 2 x 16 tokens; the HF backend's micro_batch_loss on the same weights and
    tokens. Only summation order differs (fp32): loss to 1e-6 relative, every parameter's gradient to 1e-5 of
    its largest entry (the padded vocabulary rows included: zero on both sides)."""
    from megatron_m2d.distillation.megatron.loop import train_step

    engine = engine_for(pair, tmp_path, temperature=temperature, kd_weight=kd_weight, clip_grad=0.0)
    ids = token_ids(0, 4)
    ours = train_step(engine, micro_batches(ids, 2))
    theirs, hf_grads = hf_step(pair, ids, 2, temperature, kd_weight)
    for key in ("loss", "kd_loss", "lm_loss"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    grads = megatron_grads(engine.models.distillation)  # clip_grad 0: untouched by the optimizer step
    provider = read_provider_config(pair["student"])
    expected = hf_grads_in_megatron_layout(hf_grads, provider.hf_config, provider.vocab_rows, grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-5 * float(expected[name].abs().max())), name


def test_a_one_expert_student_trains_as_its_hf_model_does(megatron_cpu, pair, tmp_path):  # noqa: F811
    """GPT-OSS and OLMoE students are their family's MoE class with one expert (top-1, weight 1): built with a MoE
    layer at expert parallel 1, one step gives the HF backend's loss."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.distillation.megatron.loop import train_step
    from megatron_m2d.testing.tiny import build_tiny_moe

    hf = build_tiny_moe(tmp_path / "one-expert", num_experts=1, num_experts_per_tok=1, moe_intermediate_size=64,
                        norm_topk_prob=False)  # megatron-core routes top-1 pre-softmax only (weight 1 alike)
    one = dict(pair, student_hf=hf, student=hf_to_megatron_checkpoint(hf, tmp_path / "one-megatron", progress=False))
    engine = engine_for(one, tmp_path / "run")
    assert any(type(m).__name__ == "MoELayer" for m in engine.models.distillation.modules())
    ids = token_ids(3, 4)
    ours = train_step(engine, micro_batches(ids, 2))
    theirs, _ = hf_step(one, ids, 2, 1.0, 1.0)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_changes_nothing_computed(megatron_cpu, pair, recompute, tmp_path):  # noqa: F811
    """Recomputing the student's activations in backward gives the same loss and gradients (bitwise on CPU)."""
    from megatron_m2d.distillation.megatron.loop import train_step

    results = []
    for setting in (None, recompute):
        engine = engine_for(pair, tmp_path, recompute=setting, clip_grad=0.0)
        loss = train_step(engine, micro_batches(token_ids(0, 4), 2))["loss"]
        results.append((loss, megatron_grads(engine.models.distillation)))
    (plain, plain_grads), (again, again_grads) = results
    assert again == plain and all(torch.equal(again_grads[k], plain_grads[k]) for k in plain_grads)


def test_only_the_student_trains_and_is_saved(megatron_cpu, pair, tmp_path):  # noqa: F811
    """modelopt froze the teacher: no gradient, no optimizer state, no key in the student's sharded state dict;
    its router runs at --teacher-top-k."""
    engine = engine_for(pair, tmp_path, teacher_top_k=4)
    trainable = [p for p in engine.models.distillation.parameters() if p.requires_grad]
    optimized = [p for group in engine.optimizer.param_groups for p in group["params"]]
    assert len(optimized) == len(trainable) and not any(p.requires_grad for p in engine.models.teacher.parameters())
    keys = set(engine.models.distillation.sharded_state_dict())
    assert keys and not any("teacher" in k for k in keys)
    routers = [m for m in engine.models.teacher.modules() if type(m).__name__ == "TopKRouter"]
    assert routers and all(r.topk == 4 for r in routers)


def test_teacher_check_passes_a_loaded_teacher_and_stops_zeros_and_random_weights(megatron_cpu, pair,  # noqa: F811
                                                                                  tmp_path):
    """Megatron teacher vs transformers streamed from the HF checkpoint (at the expanded top-k too): fp32
    rounding (< 1e-4) passes; zero weights and re-drawn weights stop with one line."""
    from megatron_m2d.distillation.megatron.teacher_check import check_teacher
    from megatron_m2d.errors import M2DError

    engine = engine_for(pair, tmp_path, teacher_top_k=4)
    teacher = engine.models.teacher

    def check():
        return check_teacher(teacher, pair["teacher"], engine.models.vocab_size, 1, 4, torch.device("cpu"), False)

    message = check()
    assert "match" in message and float(message.split("difference ")[1].split()[0]) < 1e-4
    with torch.no_grad():
        saved = [p.clone() for p in teacher.parameters()]
        for p in teacher.parameters():
            p.normal_(0.0, 0.02)
        with pytest.raises(M2DError, match="does not compute what its HF checkpoint"):
            check()
        for p in teacher.parameters():
            p.zero_()
        with pytest.raises(M2DError, match="same logit for every token"):
            check()
        for p, value in zip(teacher.parameters(), saved):
            p.copy_(value)


# ---- 2 gloo processes ------------------------------------------------------------------------------------------

STEPS = 4


@pytest.fixture(scope="module")
def tp1_curve(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    return run_engine(1, run_config(pair, out, lr=1e-3), STEPS, out / "curve.json")


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(micro_batch=2), dict(micro_batch=2, teacher_ep=2)],
                         ids=["tp2", "pp2", "dp2", "ep2-teacher"])
def test_parallel_layouts_follow_the_tp1_loss_curve(pair, tp1_curve, layout, tmp_path):
    """Global batch 4: TP1/TP2/PP2 run 2 micro-batches of 2; DP2 and the EP2 teacher (its experts split over the
    2 data-parallel ranks) one micro-batch of 2 per rank. Layouts change only fp32 summation orders: the 4-step
    curves (loss, KD and LM loss, gradient norm) agree to 1e-5 relative (measured: <= 3e-7). The teacher check
    (teacher alone through the layout's pipeline, logits gathered over TP) passes in every layout first."""
    config = run_config(pair, tmp_path, lr=1e-3, check_teacher=True, **layout)  # the teacher check runs there too
    curve = run_engine(2, config, STEPS, tmp_path / "curve.json")
    for step, (ours, reference) in enumerate(zip(curve, tp1_curve)):
        for key in ("loss", "kd_loss", "lm_loss", "grad_norm"):
            assert ours[key] == pytest.approx(reference[key], rel=1e-5), (step, key)
    assert len(curve) == STEPS
