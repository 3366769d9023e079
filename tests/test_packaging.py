"""Packaging as a user meets it: the sdist and wheel carry every file the package reads, the wheel installs into a
fresh virtual environment and `m2d demo --quick` runs there from outside the source tree; the README's set-up
block is what .ci/run runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from readme_commands import setup_commands  # noqa: E402


def _package_files() -> set[str]:
    """Every file the package ships: its sources and its data (caches aside), relative to the repository."""
    package = ROOT / "megatron_m2d"
    return {str(p.relative_to(ROOT)) for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def _clean_env() -> dict[str, str]:
    """The environment a new user has: none of our PYTHONPATH, so only the installed package can be imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "venv" not in p)
    return env


def run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_readme_setup_block_is_two_commands_that_install_the_cpu_torch_first():
    install, tests = setup_commands(ROOT / "README.md")  # exactly two, or this unpacking fails
    # torch first and pinned: any other spec makes pip fetch a multi-GB CUDA build on a fresh machine
    assert install.startswith("pip install torch==2.13.0 ") and "m2d demo" in install, install
    assert tests.startswith("python -m pytest"), tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/readme_commands.py README.md" in ci and "python3 -m venv --clear" in ci


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs_the_demo(tmp_path):
    # sdist first, then the wheel built from the sdist (python -m build's default): a file missing from either
    # shows up here
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], tmp_path, timeout=900)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    shipped = _package_files()
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert shipped <= in_wheel, f"missing from the wheel: {sorted(shipped - in_wheel)}"
    assert any(name.endswith("licenses/LICENSE") for name in in_wheel)
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = shipped | {"LICENSE", "README.md", "pyproject.toml", "pytest.ini", "examples/tasks/caesar_cloze.yaml",
                          "examples/tasks/caesar_cloze.jsonl", "tests/conftest.py", "tools/readme_commands.py"}
    assert expected <= in_sdist, f"missing from the sdist: {sorted(expected - in_sdist)}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, timeout=300)
    python, m2d = venv / "bin" / "python", venv / "bin" / "m2d"
    # the CPU build of torch explicitly first, as the README does (a bare `torch` would resolve a CUDA build)
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, timeout=900)
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, timeout=900)

    away = tmp_path / "elsewhere"  # not the source tree: the package and its data must come from site-packages
    away.mkdir()
    where = run([str(python), "-c", "import megatron_m2d; print(megatron_m2d.__file__)"], away, timeout=120)
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout
    assert run([str(python), "-m", "megatron_m2d", "--version"], away, timeout=120).stdout.startswith("megatron_m2d")
    demo = run([str(m2d), "demo", "--quick", "--out", "demo"], away, timeout=900)
    assert "held-out perplexity" in demo.stdout
    for name in ("demo.csv", "demo.png", "student-gld_reap/README.md", "student-gld_reap/m2d_plan.json"):
        assert (away / "demo" / name).is_file(), name
