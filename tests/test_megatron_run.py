"""`m2d distill --backend megatron` end to end on CPU (gloo, test-only patches): a run from HF directories trains,
validates, saves and exports; killed with SIGKILL and started again it continues the same curve bitwise; bad
input is one line, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_m2d.cli import main
from megatron_m2d.convert.provider import META
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)
from tests.megatron_engine import make_pair, preprocessed_plays, run_killable, train_rows

pytest.importorskip("megatron.core")
pytest.importorskip("modelopt")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def data_prefix(pair, tmp_path_factory):
    return preprocessed_plays(pair, tmp_path_factory.mktemp("data"))


# ---- bad input: one line, non-zero exit, nothing written ----------------------------------------------------------

def distill(pair, data, out, capsys, *flags, teacher=None, student=None):
    capsys.readouterr()  # what building the inputs printed
    return main(["distill", "--backend", "megatron", "--teacher", str(teacher or pair["teacher"]),
                 "--student", str(student or pair["student"]), "--data", str(data),
                 "--out", str(out), "--precision", "fp32", "--seq-len", "16", "--steps", "2", "--warmup", "0",
                 *map(str, flags)])


def assert_one_line_error(code, capsys, out, message):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("m2d: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_different_vocabularies_are_one_line(pair, data_prefix, tmp_path, capsys):
    from megatron_m2d.baselines.random_ffn import random_ffn
    from megatron_m2d.testing.tiny import build_tiny_moe

    other = random_ffn(build_tiny_moe(tmp_path / "moe", vocab_size=300), tmp_path / "student300", progress=False)
    code = distill(pair, data_prefix, tmp_path / "run", capsys, student=other)
    assert_one_line_error(code, capsys, tmp_path / "run", "teacher and student vocabularies differ (259 vs 300")


@pytest.mark.parametrize("flags, message", [
    (["--tp", "3"], "student: --tp 3 does not divide the 4 attention heads"),
    (["--micro-batch", "2", "--global-batch", "3"], "--global-batch 3 is not a multiple of --micro-batch 2"),
    (["--fp8", "hybrid", "--precision", "bf16"], "--fp8 needs Transformer Engine"),
])
def test_impossible_layouts_and_fp8_without_te_are_one_line(pair, data_prefix, tmp_path, capsys, flags, message):
    from megatron_m2d.convert.megatron_model import te_available

    if "--fp8" in flags and te_available():
        pytest.skip("Transformer Engine is installed here")
    code = distill(pair, data_prefix, tmp_path / "run", capsys, *flags)
    assert_one_line_error(code, capsys, tmp_path / "run", message)


@pytest.mark.parametrize("damage, message", [("truncated", "truncated"), ("zeros", "same logit for every token"),
                                             ("other weights", "does not compute what its HF checkpoint")])
def test_a_corrupted_teacher_checkpoint_is_one_line(megatron_cpu, pair, data_prefix, tmp_path, capsys,  # noqa: F811
                                                    damage, message):
    """A truncated shard fails to load; a checkpoint of zeros or of another model's weights (same shapes, still
    naming the original HF checkpoint) loads, and the teacher check stops it before the first step."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from megatron_m2d.testing.tiny import build_tiny_moe

    teacher = tmp_path / "teacher"
    if damage == "truncated":
        shutil.copytree(pair["teacher"], teacher)
        for shard in teacher.glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        edit = (lambda model: [p.zero_() for p in model.parameters()]) if damage == "zeros" else None
        hf_to_megatron_checkpoint(build_tiny_moe(tmp_path / "other", seed=7, edit=edit), teacher, progress=False)
        meta = json.loads((teacher / META).read_text())
        (teacher / META).write_text(json.dumps({**meta, "source": str(pair["teacher_hf"])}))
    code = distill(pair, data_prefix, tmp_path / "run", capsys, teacher=teacher)
    assert_one_line_error(code, capsys, tmp_path / "run", message)


# ---- a whole run ---------------------------------------------------------------------------------------------------

def test_a_run_from_hf_directories_trains_validates_saves_and_exports(megatron_cpu, pair, data_prefix,  # noqa: F811
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_m2d.distillation.megatron.config import RunConfig
    from megatron_m2d.distillation.megatron.run import run

    out = tmp_path / "run"
    config = RunConfig(teacher=str(pair["teacher_hf"]), student=str(pair["student_hf"]), data=[str(data_prefix)],
                       out=str(out), precision="fp32", seq_len=32, micro_batch=2, global_batch=4, steps=4,
                       warmup=1, lr=1e-3, save_every=2, eval_every=2, eval_iters=1, log_every=1)
    result = run(config)
    assert result["steps"] == 4 and result["tokens"] == 4 * 4 * 32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "valid"] == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_0000002", "step_0000004"]
    assert (out / "converted" / "teacher" / META).is_file() and (out / "converted" / "student" / META).is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 259 and "istill" in (out / "model" / "README.md").read_text()


def test_kill_9_mid_run_then_a_restart_continues_the_same_curve(megatron_cpu, pair, data_prefix,  # noqa: F811
                                                                tmp_path):
    """Same layout, same seed: the restarted run resumes from the last checkpoint (step 2) and its losses, gradient
    norms and learning rates from step 3 on equal the uninterrupted run's bitwise (fp32 CPU is deterministic;
    the data order comes from the consumed-samples count). The killed run is a process (and session) of its own,
    so what megatron-core's checkpoint writer started dies with it."""
    from megatron_m2d.distillation.megatron.config import RunConfig
    from megatron_m2d.distillation.megatron.run import run

    def settings(out):
        return dict(teacher=str(pair["teacher"]), student=str(pair["student"]), data=[str(data_prefix)],
                    out=str(out), precision="fp32", seq_len=32, micro_batch=2, global_batch=4, steps=5, warmup=1,
                    lr=1e-3, save_every=2, eval_every=0, log_every=1, check_teacher=False, export=False,
                    tensorboard=False)

    assert run_killable("tests.megatron_engine:run_killed_after", settings(tmp_path / "killed"), 3) == -9
    assert [r["step"] for r in train_rows(tmp_path / "killed")] == [1, 2]
    run(RunConfig(**settings(tmp_path / "killed")))
    run(RunConfig(**settings(tmp_path / "whole")))
    whole, resumed = train_rows(tmp_path / "whole"), train_rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for ours, theirs in zip(resumed, whole):
        assert all(ours[k] == theirs[k] for k in ("loss", "kd_loss", "lm_loss", "grad_norm", "lr")), ours["step"]


def test_without_a_gpu_the_megatron_backend_says_so_in_one_line(pair, data_prefix, tmp_path, capsys):
    """No test patches in this test: megatron-core cannot run here, and the run stops before writing anything."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = distill(pair, data_prefix, tmp_path / "run", capsys)
    assert_one_line_error(code, capsys, tmp_path / "run", "needs a CUDA GPU")

