"""The launchers: the SLURM script's handling of SLURM's environment, on a fake SLURM (the variables sbatch sets,
and `scontrol`, `srun`, `torchrun` and `python` stand-ins on PATH that record what they are asked to run), and
the single-node torchrun script's command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM_SCRIPT = ROOT / "launch" / "distill.slurm"
TORCHRUN_SCRIPT = ROOT / "launch" / "torchrun.sh"
ENTRY = "megatron_m2d.distillation.megatron"

# What each stand-in does. They log one JSON line per call to $FAKE_LOG.
RECORDER = r'''
import json, os, sys, time
with open(os.environ["FAKE_LOG"], "a") as log:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID")
    log.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "env": {k: os.environ[k] for k in keys if k in os.environ}}) + "\n")
if os.environ.get("FAKE_HANG"):
    time.sleep(120)
'''
SCONTROL = r'''
import json, os, re, sys
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args[2]):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            print(part)
            continue
        for item in m.group(2).split(","):
            lo, _, hi = item.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                print(f"{m.group(1)}{i:0{len(lo)}d}")
elif args[:1] == ["requeue"]:
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({"prog": "scontrol", "argv": args}) + "\n")
else:
    sys.exit(f"fake scontrol: unsupported {args}")
'''
SRUN = r'''
import os, subprocess, sys
args, options = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
ntasks, per_node = int(options["ntasks"]), int(options["ntasks-per-node"])
status = 0
for task in range(ntasks):  # real srun runs them at once; one after the other records the same command lines
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_NODEID=str(task // per_node),
               SLURM_LOCALID=str(task % per_node), SLURM_NTASKS=str(ntasks))
    status = max(status, subprocess.run(args, env=env).returncode)
sys.exit(status)
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", SCONTROL), ("srun", SRUN), ("torchrun", RECORDER), ("python", RECORDER)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("teacher: t\nstudent: s\n")
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR",
                                                                                             "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PYTHON=str(bin_dir / "python"),
               SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="8")
    return dict(env=env, config=config, log=log, tmp=tmp_path)


def calls(log: Path, prog: str) -> list[dict]:
    if not log.exists():
        return []
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["prog"] == prog]


def run_script(script: Path, fake: dict, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env={**fake["env"], **env}, capture_output=True,
                          text=True, timeout=60)


def test_one_torchrun_per_node_with_node_rank_and_rendezvous_from_slurm(fake_slurm):
    result = run_script(SLURM_SCRIPT, fake_slurm, fake_slurm["config"], "--steps", "5")
    assert result.returncode == 0, result.stderr
    launched = calls(fake_slurm["log"], "torchrun")
    assert len(launched) == 2
    for node, call in enumerate(launched):
        assert call["argv"] == ["--nnodes", "2", "--nproc-per-node", "8", "--node-rank", str(node),
                                "--master-addr", "gpu07", "--master-port", "23456",  # 20000 + job id % 20000
                                "-m", ENTRY, "--config", str(fake_slurm["config"]), "--steps", "5"]
    assert "2 nodes x 8 GPUs, rendezvous gpu07:23456" in result.stdout


def test_one_task_per_gpu_gets_rank_variables_from_slurm(fake_slurm):
    result = run_script(SLURM_SCRIPT, fake_slurm, fake_slurm["config"], LAUNCH_MODE="task-per-gpu",
                        SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="29999")
    assert result.returncode == 0, result.stderr
    launched = calls(fake_slurm["log"], "python")
    assert [c["env"]["RANK"] for c in launched] == [str(r) for r in range(8)]
    assert [c["env"]["LOCAL_RANK"] for c in launched] == [str(r % 4) for r in range(8)]
    for call in launched:
        assert call["env"]["WORLD_SIZE"] == "8" and call["env"]["LOCAL_WORLD_SIZE"] == "4"
        assert call["env"]["MASTER_ADDR"] == "gpu07" and call["env"]["MASTER_PORT"] == "29999"
        assert call["argv"] == ["-m", ENTRY, "--config", str(fake_slurm["config"])]


def test_time_limit_signal_requeues_the_job(fake_slurm):
    """USR1 (sbatch --signal, 5 minutes before the limit) makes the job requeue itself while training runs."""
    proc = subprocess.Popen(["bash", str(SLURM_SCRIPT), str(fake_slurm["config"])],
                            env={**fake_slurm["env"], "FAKE_HANG": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not calls(fake_slurm["log"], "torchrun") and time.time() < deadline:
            time.sleep(0.1)
        assert calls(fake_slurm["log"], "torchrun"), "training never started"
        proc.send_signal(signal.SIGUSR1)
        while not calls(fake_slurm["log"], "scontrol") and time.time() < deadline:
            time.sleep(0.1)
        assert calls(fake_slurm["log"], "scontrol") == [{"prog": "scontrol", "argv": ["requeue", "123456"]}]
        assert proc.poll() is None, "the job must keep running until SLURM ends it"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what SLURM does to a requeued job: the whole process group
        proc.communicate()


@pytest.mark.parametrize("change,message", [
    (dict(SLURM_JOB_ID=""), "not inside a SLURM job"),
    (dict(SLURM_GPUS_ON_NODE="", GPUS_PER_NODE=""), "GPUs per node unknown"),
    (dict(LAUNCH_MODE="mpi"), "LAUNCH_MODE must be"),
])
def test_bad_environment_is_one_line(fake_slurm, change, message):
    result = run_script(SLURM_SCRIPT, fake_slurm, fake_slurm["config"], **change)
    assert result.returncode == 2 and message in result.stderr
    assert not calls(fake_slurm["log"], "torchrun")


@pytest.mark.parametrize("script", [SLURM_SCRIPT, TORCHRUN_SCRIPT])
def test_missing_run_config_is_refused(fake_slurm, script):
    result = run_script(script, fake_slurm, fake_slurm["tmp"] / "missing.yaml")
    assert result.returncode == 2 and "run config" in result.stderr and "not found" in result.stderr
    result = run_script(script, fake_slurm)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_torchrun_script_command_line(fake_slurm):
    result = run_script(TORCHRUN_SCRIPT, fake_slurm, fake_slurm["config"], "--tp", "2", NPROC="4")
    assert result.returncode == 0, result.stderr
    (call,) = calls(fake_slurm["log"], "torchrun")
    assert call["argv"] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "4", "-m", ENTRY,
                            "--config", str(fake_slurm["config"]), "--tp", "2"]


def tiny_run(root: Path, steps: int) -> Path:
    """A run config for the tiny Qwen3-MoE teacher, its random-FFN student and the fixture plays as paragraphs."""
    from megatron_m2d.baselines.random_ffn import random_ffn
    from megatron_m2d.cli import main
    from megatron_m2d.testing.corpus import paragraph_jsonl
    from megatron_m2d.testing.tiny import build_tiny_moe

    hf_teacher = build_tiny_moe(root / "hf-teacher", "qwen3_moe")
    hf_student = random_ffn(hf_teacher, root / "hf-student", progress=False)
    assert main(["preprocess", "--input", str(paragraph_jsonl(root / "plays.jsonl")), "--tokenizer",
                 str(hf_student), "--out", str(root / "plays"), "--no-progress"]) == 0
    teacher, student = root / "teacher", root / "student"
    for hf, converted in ((hf_teacher, teacher), (hf_student, student)):  # in a process of its own (gloo group)
        subprocess.run([sys.executable, "-m", "megatron_m2d", "convert", "hf-to-megatron", "--model", str(hf),
                        "--out", str(converted)], check=True, capture_output=True, timeout=300)
    config = root / "run.yaml"
    config.write_text(f"teacher: {teacher}\nstudent: {student}\ndata: [{root / 'plays'}]\nout: {root / 'run'}\n"
                      "teacher_ep: 2\nmicro_batch: 1\nglobal_batch: 4\nseq_len: 32\nsteps: " + str(steps) + "\n"
                      "warmup: 1\nsave_every: 2\neval_every: 0\nprecision: fp32\nlog_every: 1\n")
    return config


def test_torchrun_script_runs_two_gloo_processes_end_to_end_and_resumes(tmp_path):
    """launch/torchrun.sh with NPROC=2 on CPU: a real 2-process run (DP 2, the teacher's experts over EP 2) that
    trains, checkpoints and exports; run again with more steps it resumes from its last checkpoint."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("modelopt")
    config = tiny_run(tmp_path, steps=2)
    env = {**os.environ, "NPROC": "2", "M2D_ENTRY": "tests.megatron_killable_main", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(["bash", str(TORCHRUN_SCRIPT), str(config)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    run = tmp_path / "run"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_0000002"]
    assert (run / "model" / "config.json").is_file()  # exported by rank 0 at the end
    second = subprocess.run(["bash", str(TORCHRUN_SCRIPT), str(config), "--steps", "4"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2, 3, 4]  # 3 and 4 only in the rerun
    assert (run / "checkpoints" / "step_0000004").is_dir()
