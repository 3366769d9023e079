"""The per-model recipes in examples/ run end to end on the fixture: the same scripts, with the fixture's paths and
tiny budgets through their environment variables, so none of them rots.

All three use the fixture MoE (a Qwen3-MoE) as the teacher: what differs between the scripts is their declared
defaults and layouts, and the shared pipeline (examples/lib/pipeline.sh) runs every stage: calibrate, densify, the
random-FFN and D2D baselines (the fixture's dense sibling as the D2D teacher), convert, preprocess, distill through
launch/torchrun.sh on 2 CPU processes (gloo, with the test suite's CPU patches), export, eval.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "megatron_m2d" / "assets"
SCRIPTS = ["qwen3_30b_a3b.sh", "deepseek_v2_lite.sh", "gpt_oss_20b.sh"]


def fixture_env(work: Path, **changes) -> dict:
    from megatron_m2d.testing.corpus import paragraph_jsonl

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "M2D": f"{sys.executable} -m megatron_m2d", "PYTHONPATH": os.pathsep.join(
               [str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           # the fixture and tiny budgets
           "TEACHER": str(ASSETS / "fixture-moe"), "DENSE_TEACHER": str(ASSETS / "fixture-dense"),
           "CALIB_DATA": "fixture", "TRAIN_DATA": str(paragraph_jsonl(work / "plays.jsonl")), "EVAL_DATA": "fixture",
           "WORK": str(work / "run"), "CALIB_TOKENS": "2048", "CALIB_SEQ_LEN": "64", "DEVICE": "cpu",
           "DTYPE": "float32", "PRECISION": "fp32", "NUM_GROUPS": "2", "SELECT": "2",
           # 2 CPU processes: DP 2, the teacher's 16 experts over EP 2
           "GPUS": "2", "TP": "1", "PP": "1", "TEACHER_EP": "2", "MICRO_BATCH": "1", "SEQ_LEN": "64",
           "GLOBAL_BATCH": "4", "TRAIN_TOKENS": "512", "WARMUP": "0", "SAVE_EVERY": "1", "SPLIT": "98,2,0",
           "M2D_ENTRY": "tests.megatron_killable_main"}
    env.update(changes)
    return env


def run_recipe(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, capture_output=True, text=True,
                          timeout=1800)


def check_results(work: Path, students: list[str]) -> None:
    table = (work / "results.md").read_text()
    for student in students:
        assert (work / "runs" / student / "model" / "config.json").is_file()
        assert (work / "runs" / f"{student}.yaml").is_file()  # the one run config both launchers read
        assert f"| {student}, distilled |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "perplexity" not in line]
    assert all(float(line.split("|")[2]) > 1.0 for line in rows), table


def test_headline_recipe_runs_every_stage_on_the_fixture(tmp_path):
    """examples/qwen3_30b_a3b.sh, every stage; the baselines are built and converted, the densified student is
    distilled and evaluated (distilling all three is the slow test below). Run again, every stage sees its output
    complete and is skipped."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("modelopt")
    env = fixture_env(tmp_path, STUDENTS="densified")
    result = run_recipe("qwen3_30b_a3b.sh", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_results(tmp_path / "run", ["densified"])
    for baseline in ("random-ffn", "d2d"):
        assert (tmp_path / "run" / "students" / baseline / "config.json").is_file()
    again = run_recipe("qwen3_30b_a3b.sh", {**env, "STAGES": "calibrate densify baselines convert preprocess "
                                                               "distill export"})
    assert again.returncode == 0 and "== qwen3-30b-a3b:" not in again.stdout, again.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_recipes_distill_every_student_on_the_fixture(tmp_path, script):
    """Each script with the densified student and both baselines distilled and evaluated (the fixture stands in
    for the DeepSeek and GPT-OSS teachers, which need a GPU; D2D is on, since the fixture has a dense sibling)."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("modelopt")
    result = run_recipe(script, fixture_env(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_results(tmp_path / "run", ["densified", "random-ffn", "d2d"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipes_refuse_an_unplanned_gpu_count_in_one_line(tmp_path, script):
    env = fixture_env(tmp_path, GPUS="3")
    for name in ("TP", "PP", "TEACHER_EP", "MICRO_BATCH"):
        env.pop(name)
    result = run_recipe(script, env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("examples: error: no layout planned for 3 GPUs: set TP, PP, TEACHER_EP and "
                                     "MICRO_BATCH (m2d plan helps)")
