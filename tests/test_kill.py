"""kill -9 in the middle of every long command, then the same command again: the result equals an uninterrupted
run's, what was saved is resumed (not recomputed), and nothing stale is left beside or inside the output.

Each command is killed at a point where it has saved something (a trigger file appears) and at seeded random
moments of its run. Subprocesses on the tiny fixtures: slow-marked (about a minute per command on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_m2d.testing.tiny import build_tiny_moe, write_sample_text

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def m2d(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "megatron_m2d", *map(str, args)], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def m2d_killed(args, trigger=None, delay: float | None = None) -> bool:
    """Start `m2d args`; SIGKILL it when `trigger()` becomes true or after `delay` seconds. True if it was
    killed (False: it finished first)."""
    process = subprocess.Popen([sys.executable, "-m", "megatron_m2d", *map(str, args)], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while process.poll() is None:
        if (trigger is not None and trigger()) or (delay is not None and time.monotonic() - started >= delay):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    return False


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(directory).rglob("*.safetensors")):
        out.update({f"{shard.relative_to(directory)}:{k}": v for k, v in load_file(shard).items()})
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert different == [], different[:5]


def assert_nothing_beside(out: Path, allowed=()) -> None:
    stale = [p.name for p in out.parent.iterdir()  # .OUT.tmp-PID, .OUT.partial, densify's ..OUT.m2d_stats.partial
             if p.name.startswith(".") and f".{out.name}." in p.name and p.name not in allowed]
    assert stale == [], stale


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    # 6 layers and 2k tokens: long enough (a second or so) for kills to land mid-run
    return build_tiny_moe(root / "moe", layers=6), write_sample_text(root / "text", documents=16, repeat=12)


CALIBRATE = ["--tokens", "2048", "--seq-len", "128", "--batch-size", "4", "--gram"]


def timed(*args) -> float:
    """Seconds `m2d args` takes uninterrupted (imports included): the span the random kills fall in."""
    started = time.monotonic()
    m2d(*args)
    return time.monotonic() - started


def kill_points(name: str, seconds: float) -> list[tuple[str, float | None]]:
    """(label, delay): once when the command has saved something (the test's trigger), then at three seeded
    random moments of an uninterrupted run's `seconds` (imports included: a kill before anything is written must
    not leave anything either). A random kill may still come after the command finished: then its output is
    complete, and running it again is refused as an existing output, so the rerun is only made when it is not."""
    rng = random.Random(name)
    return [("saved", None)] + [(f"random{i}", rng.uniform(0.5, max(1.0, 0.95 * seconds))) for i in range(3)]


def test_calibrate_resumes_after_kill(inputs, tmp_path):
    moe, text = inputs
    reference = tmp_path / "reference"
    seconds = timed("calibrate", "--model", moe, "--data", text, *CALIBRATE, "--out", reference)
    for label, delay in kill_points("calibrate", seconds):
        out = tmp_path / f"stats-{label}"
        partial = tmp_path / f".{out.name}.partial"
        trigger = (lambda p=partial: (p / "layer_002.safetensors").exists()) if label == "saved" else None
        killed = m2d_killed(["calibrate", "--model", moe, "--data", text, *CALIBRATE, "--out", out], trigger, delay)
        if not out.exists():
            again = m2d("calibrate", "--model", moe, "--data", text, *CALIBRATE, "--out", out)
        if label == "saved":
            assert killed and "resuming calibration" in again.stdout + again.stderr
        assert_same_tensors(out, reference)
        assert_nothing_beside(out)


def test_densify_resumes_its_calibration_after_kill(inputs, tmp_path):
    moe, text = inputs
    args = ["densify", "--model", moe, "--data", text, *CALIBRATE, "--scoring", "gld_reap", "--select", "4"]
    reference = tmp_path / "reference"
    seconds = timed(*args, "--out", reference)
    for label, delay in kill_points("densify", seconds):
        out = tmp_path / f"student-{label}"
        stats = tmp_path / f"..{out.name}.m2d_stats.partial"  # calibrate's .NAME.partial of densify's .OUT.m2d_stats
        trigger = (lambda p=stats: (p / "layer_003.safetensors").exists()) if label == "saved" else None
        killed = m2d_killed([*args, "--out", out], trigger, delay)
        if not out.exists():
            again = m2d(*args, "--out", out)
        if label == "saved":
            assert killed and "resuming calibration" in again.stdout + again.stderr
        assert_same_tensors(out, reference)
        plan, expected = (json.loads((d / "m2d_plan.json").read_text()) for d in (out, reference))
        assert plan["layers"] == expected["layers"]
        assert_nothing_beside(out)


def test_sweep_continues_after_kill(inputs, tmp_path):
    moe, text = inputs
    stats = tmp_path / "stats"
    m2d("calibrate", "--model", moe, "--data", text, *CALIBRATE, "--out", stats)
    args = ["sweep", "--model", moe, "--stats", stats, "--scorings", "reap,selection_freq,gld_reap,random",
            "--groupings", "round_robin,output_cluster", "--scalings", "uniform", "--select", "2,4",
            "--eval-data", text, "--eval-tokens", "512", "--seq-len", "128"]
    seconds = timed(*args, "--out", tmp_path / "reference")

    def rows(out):
        return {r["key"]: r["ppl"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}

    reference = rows(tmp_path / "reference")
    for label, delay in kill_points("sweep", seconds):
        out = tmp_path / f"sweep-{label}"
        results = out / "results.jsonl"
        trigger = (lambda r=results: r.exists() and r.read_text().count("\n") >= 3) if label == "saved" else None
        m2d_killed([*args, "--out", out], trigger, delay)
        m2d(*args, "--out", out)
        assert rows(out) == reference
        assert len((out / "results.jsonl").read_text().splitlines()) == len(reference)  # no configuration twice
        assert not (out / ".student.tmp").exists()


def test_convert_after_kill(inputs, tmp_path):
    pytest.importorskip("megatron.core")
    moe, _ = inputs
    reference, expected = tmp_path / "reference", tmp_path / "hf-reference"
    seconds = timed("convert", "hf-to-megatron", "--model", moe, "--out", reference)
    m2d("convert", "megatron-to-hf", "--model", reference, "--out", expected)
    for label, delay in kill_points("convert", seconds):
        out = tmp_path / f"megatron-{label}"
        trigger = (lambda o=out: any(o.parent.glob(f".{o.name}.tmp-*/*.distcp"))) if label == "saved" else None
        m2d_killed(["convert", "hf-to-megatron", "--model", moe, "--out", out], trigger, delay)
        if not out.exists():
            m2d("convert", "hf-to-megatron", "--model", moe, "--out", out)
        assert_nothing_beside(out)
        back = tmp_path / f"hf-{label}"
        m2d("convert", "megatron-to-hf", "--model", out, "--out", back)
        assert_same_tensors(back, expected)


def test_hf_distill_resumes_after_kill(inputs, tmp_path):
    moe, text = inputs
    student = tmp_path / "student"
    m2d("random-ffn", "--model", moe, "--out", student)
    args = ["distill", "--teacher", moe, "--student", student, "--data", text, "--steps", "6", "--save-every", "2",
            "--seq-len", "64", "--micro-batch", "2", "--train-tokens", "4096", "--device", "cpu"]
    seconds = timed(*args, "--out", tmp_path / "reference")
    for label, delay in kill_points("distill", seconds):
        out = tmp_path / f"run-{label}"
        trigger = (lambda o=out: (o / "checkpoints" / "step_0000002").is_dir()) if label == "saved" else None
        m2d_killed([*args, "--out", out], trigger, delay)
        again = m2d(*args, "--out", out)
        if label == "saved":
            assert "resuming from" in again.stdout
        assert_same_tensors(out / "model", tmp_path / "reference" / "model")
        steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7))  # every step once, none redone twice
        assert not list((out / "checkpoints").glob("*.tmp")) and not list(out.glob(".*tmp*"))
