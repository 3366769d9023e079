"""The Megatron run config (file + flags), the parallel layout arithmetic and the learning-rate schedules."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_m2d.distillation.megatron.config import RunConfig, add_run_arguments, config_from_args
from megatron_m2d.distillation.megatron.parallel import plan_layout
from megatron_m2d.errors import M2DError

REQUIRED = dict(teacher="t", student="s", data=["prefix"], out="o")


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_override_the_run_config_file_and_the_rest_keeps_its_value(suffix, tmp_path):
    path = tmp_path / f"run{suffix}"
    values = dict(REQUIRED, tp=2, seq_len=128, data={"prefixes": ["a", "b"], "weights": [0.7, 0.3]},
                  sequence_parallel=True)
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    args = parse("--config", str(path), "--seq-len", "256", "--teacher-ep", "2", "--sequence-parallel", "false")
    config = config_from_args(args.config, args)
    assert (config.tp, config.seq_len, config.teacher_ep, config.sequence_parallel) == (2, 256, 2, False)
    assert config.data == {"prefixes": ["a", "b"], "weights": [0.7, 0.3]} and config.lr == RunConfig().lr
    saved = tmp_path / "saved.json"
    config.save(saved)
    assert RunConfig.from_file(saved) == config  # what a checkpoint records reads back the same


@pytest.mark.parametrize("text, message", [
    ('{"tp": 2, "tensor_parallel": 4}', "unknown setting 'tensor_parallel'"),
    ('{"tp": "two"}', "tp must be int"),
    ('{"lr": true}', "lr must be float"),
    ('[1, 2]', "a mapping of settings"),
    ('{"tp": 2', "not valid JSON"),
])
def test_a_bad_run_config_file_is_one_line(text, message, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(M2DError, match=message) as error:
        RunConfig.from_file(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("settings, message", [
    (dict(teacher=None), "--teacher is required"),
    (dict(tp=0), "--tp must be >= 1"),
    (dict(kd_weight=1.5), "--kd-weight must lie in"),
    (dict(warmup=1000, steps=1000), "--warmup 1000 must be shorter"),
    (dict(min_lr=1.0, lr=0.1), "--lr must be > 0 and >= --min-lr"),
    (dict(schedule="linear"), "--schedule 'linear'"),
    (dict(sequence_parallel=True), "--sequence-parallel needs --tp > 1"),
    (dict(fp8="hybrid", precision="fp32"), "--fp8 .* needs --precision bf16"),
    (dict(data=["0.5", "a", "b"]), "weights and prefixes must alternate"),
    (dict(split="90,x,0"), "split"),
])
def test_settings_that_cannot_work_are_one_line(settings, message):
    with pytest.raises(M2DError, match=message) as error:
        RunConfig(**{**REQUIRED, **settings}).validate()
    assert "\n" not in str(error.value)


def test_fp8_without_transformer_engine_is_one_line():
    pytest.importorskip("megatron.core")
    from megatron_m2d.convert.megatron_model import te_available

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(M2DError, match="--fp8 needs Transformer Engine"):
        RunConfig(**REQUIRED, fp8="hybrid").validate()


def test_layout_is_the_rest_of_the_world_and_the_global_batch_must_divide():
    layout = plan_layout(RunConfig(**REQUIRED, tp=2, pp=2, teacher_ep=4, micro_batch=2, global_batch=32), 16)
    assert (layout.dp, layout.num_micro_batches) == (4, 4)
    assert plan_layout(RunConfig(**REQUIRED, micro_batch=3), 4).global_batch == 12  # unset: one micro-batch
    with pytest.raises(M2DError, match="--global-batch 30 is not a multiple of --micro-batch 2 x data-parallel "
                                       "size 4 = 8"):
        plan_layout(RunConfig(**REQUIRED, tp=2, pp=2, micro_batch=2, global_batch=30), 16)
    with pytest.raises(M2DError, match="6 ranks do not split into --tp 4"):
        plan_layout(RunConfig(**REQUIRED, tp=4), 6)
    with pytest.raises(M2DError, match="--teacher-ep 3 does not divide the 4 ranks"):
        plan_layout(RunConfig(**REQUIRED, tp=2, teacher_ep=3), 4)


def test_schedules_warm_up_and_end_at_min_lr():
    """megatron-core's OptimizerParamScheduler, one step ahead of each update (schedule.py): update 0 of a
    10-step warmup runs at lr/10, the last update at --min-lr; WSD holds the peak until its decay."""
    pytest.importorskip("megatron.core")
    from megatron_m2d.distillation.megatron.schedule import learning_rate_at

    for schedule in ("wsd", "cosine"):
        config = RunConfig(**REQUIRED, steps=100, warmup=10, lr=1.0, min_lr=0.1, schedule=schedule, decay=20)
        rates = [learning_rate_at(config, step) for step in range(100)]
        assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
        assert rates[-1] == pytest.approx(0.1) and min(rates) >= 0.1 - 1e-12
        if schedule == "wsd":
            assert all(r == pytest.approx(1.0) for r in rates[9:80]) and rates[80] < 1.0
        else:
            assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    constant = RunConfig(**REQUIRED, steps=10, warmup=0, lr=0.5, schedule="constant")
    assert {learning_rate_at(constant, s) for s in range(10)} == {0.5}


def test_every_flag_has_help_with_its_default():
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    for action in parser._actions[1:]:
        assert action.help and ("(default:" in action.help or action.dest in
                                ("teacher", "student", "data", "out")), action.dest


def test_shared_flags_state_both_backends_defaults():
    """`m2d distill --help` shows the HF backend's default beside the Megatron one where they differ: the table
    it reads (cli/distill.HF_DEFAULTS) is the HF DistillConfig's, and every other shared default is equal."""
    from dataclasses import fields

    from megatron_m2d.cli.distill import HF_DEFAULTS
    from megatron_m2d.distillation.hf import DistillConfig

    hf = {f.name: f.default for f in fields(DistillConfig)}
    run = {f.name: f.default for f in fields(RunConfig)}
    for name in hf.keys() & run.keys():
        assert HF_DEFAULTS.get(name, run[name]) == hf[name], name
    assert RunConfig(**REQUIRED, steps=50).warmup_steps == 5  # unset warmup: 10 % of the steps, in both
