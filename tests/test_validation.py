"""The validation layer's rules that the bad-input matrix does not state one by one: mistyped paths never reach
the network, a run that cannot continue keeps what it saved, resumed runs neither lose nor repeat anything."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_m2d.baselines.random_ffn import random_ffn
from megatron_m2d.cli import main
from megatron_m2d.distillation.hf import DistillConfig, distill
from megatron_m2d.errors import M2DError
from megatron_m2d.validation import ASSETS, looks_like_path
from tests.hostile_inputs import error_lines

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    lines = error_lines(capsys.readouterr().err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("m2d: error: "), lines
    return lines[0]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local path was looked up on the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("text,is_path", [
    ("nofile.txt", True), ("./corpus", True), ("~/corpus", True), ("/data/x", True), ("a/b/c", True),
    ("data.jsonl:train", True), ("wikitext:wikitext-2-raw-v1", False), ("HuggingFaceFW/fineweb-edu", False),
    ("allenai/c4:en", False), ("bigcode/the-stack-v1.2", False), ("wikitext2", False)])
def test_what_looks_like_a_local_path(text, is_path):
    assert looks_like_path(text) is is_path


def test_a_hub_name_whose_org_is_a_local_folder_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert looks_like_path("data/nofile") and not looks_like_path("elsewhere/nofile")


@pytest.mark.parametrize("argv,mentions", [
    (["calibrate", "--model", "{moe}", "--data", "nofile.txt", "--out", "{out}"], "nofile.txt: no such file"),
    (["calibrate", "--model", "nonexistent", "--data", "fixture", "--out", "{out}"], "nonexistent: no such model"),
    (["eval", "--model", "{moe}", "--data", "./missing/corpus"], "no such file"),
    (["eval", "--model", "{moe}", "--data", "~/nowhere.jsonl"], "no such file"),
    (["distill", "--teacher", "{moe}", "--student", "Qwen/Qwen3-0.6B", "--data", "fixture", "--out", "{out}"],
     "huggingface-cli download"),
])
def test_mistyped_paths_fail_at_once_without_network(argv, mentions, tiny, tmp_path, capsys, no_network):
    moe = tiny("qwen3_moe")
    argv = [a.format(moe=moe, out=tmp_path / "out") for a in argv]
    started = time.perf_counter()
    line = one_error_line(capsys, argv)
    assert time.perf_counter() - started < 1.0, "validation must answer before any work"
    assert mentions in line


def test_the_package_fixtures_are_an_input_of_every_command(capsys, tmp_path):
    assert "the package's fixtures" in one_error_line(capsys, ["demo", "--quick", "--out", ASSETS, "--overwrite"])
    assert "contains" in one_error_line(capsys, ["demo", "--quick", "--out", ASSETS.parent, "--overwrite"])


def test_overwrite_replaces_an_existing_file(tiny, tmp_path, capsys):
    out = tmp_path / "student"
    out.write_text("an old file")
    assert main(["random-ffn", "--model", str(tiny("qwen3_moe")), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file()


def test_lm_eval_failures_are_one_line(tiny, capsys, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\nmore\nlines")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    line = one_error_line(capsys, ["eval", "--model", tiny("qwen3_moe"), "--tasks", "hellaswag"])
    assert "lm-eval could not run hellaswag" in line and "offline" in line


@pytest.mark.parametrize("argv", [["calibrate", "--model", "nope", "--data", "fixture", "--out", "x"],
                                  ["distill", "--teacher", ".", "--student", ".", "--data", "fixture", "--out", "x",
                                   "--lr", "-1"]])
def test_a_real_process_prints_exactly_one_line(argv, tmp_path):
    """Outside pytest's capture: no library warning or log line joins ours."""
    result = subprocess.run([sys.executable, "-m", "megatron_m2d", *argv], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("m2d: error: ") and not list(tmp_path.iterdir())


# ---- the HF distillation backend: resume and stop ------------------------------------------------------------------

@pytest.fixture
def pair(tiny, tmp_path, text_dir):
    teacher = tiny("qwen3_moe")
    return teacher, random_ffn(teacher, tmp_path / "student", progress=False), str(text_dir)


def run(pair, out, steps, **kwargs):
    teacher, student, data = pair
    config = DistillConfig(steps=steps, seq_len=32, micro_batch=2, save_every=2, train_tokens=2048, warmup=1,
                           **kwargs)
    return distill(teacher, student, data, out, config, device="cpu", progress=False)


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(pair, tmp_path, capsys):
    out = tmp_path / "run"
    run(pair, out, 4)
    newest = out / "checkpoints" / "step_0000004"
    (newest / "model.safetensors").write_bytes(b"\x00" * 100)
    (out / "checkpoints" / "step_0000006.tmp").mkdir()  # what a kill mid-save leaves
    run(pair, out, 6)
    err = capsys.readouterr().err
    assert "skipping unreadable checkpoint" in err and "step_0000004" in err
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone once, no duplicate rows
    assert not (out / "checkpoints" / "step_0000006.tmp").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pair, tmp_path):
    out = tmp_path / "run"
    run(pair, out, 2)  # a good checkpoint at step 2
    good = (out / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes()
    final = (out / "model" / "model.safetensors").read_bytes()  # the 2-step run's result
    with pytest.raises(M2DError, match=r"became NaN or infinite.*last good checkpoint is .*step_0000002"):
        run(pair, out, 8, lr=1e20, clip_grad=0.0)  # the weights overflow within a few steps
    assert (out / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes() == good
    assert (out / "model" / "model.safetensors").read_bytes() == final  # no NaN model written over it


def test_a_run_refused_before_its_first_checkpoint_leaves_nothing(pair, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(M2DError, match="no checkpoint had been saved"):
        run(pair, out, 8, lr=1e20, clip_grad=0.0)
    assert not out.exists()


def test_a_read_only_output_folder_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom nothing is read-only: os.access stands in for the kernel's answer."""
    import os

    moe, out = tiny("qwen3_moe"), tmp_path / "ro" / "student"
    out.parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out.parent else real_access(path, mode))
    line = one_error_line(capsys, ["random-ffn", "--model", moe, "--out", out])
    assert "cannot write in" in line and not list(out.parent.iterdir())


def test_an_os_error_during_the_run_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """A disk that fills or a permission that changes mid-run: the OSError's own words, one line, no leftovers."""
    from megatron_m2d.io import writer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(writer, "save_file", full)
    line = one_error_line(capsys, ["random-ffn", "--model", tiny("qwen3_moe"), "--out", tmp_path / "student"])
    assert "No space left on device" in line
    assert [p.name for p in tmp_path.iterdir() if "student" in p.name] == []
