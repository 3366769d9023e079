"""`m2d plan` on the command line: the run config file and flags of `m2d distill --backend megatron`, a table or
JSON, --strict for launch scripts, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_m2d.cli import main

TEACHER = Path(__file__).resolve().parent.parent / "examples" / "configs" / "qwen3-30b-a3b"


@pytest.fixture
def run_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"teacher: {TEACHER}\nseq_len: 4096\nmicro_batch: 1\nglobal_batch: 256\nteacher_ep: 8\n"
                    "steps: 3815\n")
    return path


def test_headline_plan_from_a_run_config(run_config, capsys):
    assert main(["plan", "--config", str(run_config), "--groups", "8", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "student  densified K=8: 3.34 B parameters" in out
    assert "16 of 128 experts per GPU" in out and "fits" in out
    assert "3,815 steps" in out and "GPU-hours" in out


def test_flags_override_the_file_and_json_is_complete(run_config, capsys):
    assert main(["plan", "--config", str(run_config), "--groups", "8", "--gpus", "16", "--teacher-ep", "16",
                 "--recompute", "full", "--tokens", "1e9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["teacher_ep"] == 16 and plan["layout"]["recompute"] == "full"
    assert plan["layout"]["dp"] == 16 and plan["layout"]["micro_batches"] == 16
    assert plan["tokens"] == 1e9 and plan["fits"] is True
    assert plan["memory"]["parts"]["activations"] < plan["memory"]["activations_by_recompute"]["none"] / 10


def test_strict_refuses_a_layout_that_does_not_fit(run_config, capsys):
    code = main(["plan", "--config", str(run_config), "--groups", "8", "--gpus", "8", "--teacher-ep", "1",
                 "--strict"])
    captured = capsys.readouterr()
    assert code == 2 and "DOES NOT FIT" in captured.out
    assert captured.err.strip() == ("m2d: error: the run does not fit: 109.6 GiB per GPU of 79.1; smallest change "
                                    "that fits: --teacher-ep 4")


def test_plan_with_a_student_directory(tmp_path, capsys):
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}))
    assert main(["plan", "--teacher", str(TEACHER), "--student", str(student), "--gpus", "8", "--teacher-ep", "8",
                 "--seq-len", "4096", "--gpu", "h200", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["student_params"] == pytest.approx(3.34e9, rel=0.01) and plan["accelerator"] == "H200 141GB"
    assert plan["layout"]["global_batch"] == 8  # unset: one micro-batch per data-parallel rank


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "8"], "--teacher is required"),
    (["--gpus", "8", "--teacher", str(TEACHER)], "give --student"),
    (["--gpus", "8", "--teacher", str(TEACHER), "--groups", "8", "--tp", "3"], "TP 3 does not divide"),
    (["--gpus", "0", "--teacher", str(TEACHER), "--groups", "8"], "--gpus must be at least 1"),
    (["--gpus", "8", "--teacher", str(TEACHER), "--groups", "200"], "--groups 200"),
    (["--gpus", "8", "--teacher", "/nonexistent", "--groups", "8"], "no such model directory"),
    (["--gpus", "8", "--teacher", str(TEACHER), "--groups", "8", "--mfu", "1.5"], "--mfu must be at most 1"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2d: error:") and message in err and len(err.strip().splitlines()) == 1
