"""The README's first command, end to end, in a reduced mode (fewer tokens and methods)."""

from __future__ import annotations

import csv
import math

from megatron_m2d.cli import main
from megatron_m2d.demo import run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rows = run_demo(out, quick=True)
    labels = [r["model"] for r in rows]
    assert labels[0] == "teacher (MoE)" and len(rows) == 6
    assert {"DO-ACP (gld_reap)", "SF (selection_freq)", "random selection", "random FFN"} <= set(labels)
    for row in rows:
        assert math.isfinite(row["before"]) and row["before"] > 1
        assert row["after"] is None or math.isfinite(row["after"])
    with (out / "demo.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert "held-out perplexity" in capsys.readouterr().out
    for name in ("demo.png", "sweep/results.md", "sweep/ppl_by_scoring.png", "student-gld_reap/m2d_plan.json"):
        assert (out / name).is_file(), name
    # running again without --overwrite refuses cleanly
    capsys.readouterr()
    assert main(["demo", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_offline_tool_never_imports_megatron(tmp_path):
    """calibrate + densify + inspect in a fresh process: no megatron (or modelopt) module gets imported."""
    import subprocess
    import sys

    script = f"""
import sys
from megatron_m2d.cli import main
from megatron_m2d.testing.tiny import build_tiny_moe, write_sample_text
model = build_tiny_moe({str(tmp_path / 'm')!r})
text = write_sample_text({str(tmp_path / 't')!r})
assert main(["densify", "--model", str(model), "--data", str(text), "--tokens", "256", "--seq-len", "64",
             "--scoring", "gld_reap", "--out", {str(tmp_path / 'd')!r}]) == 0
assert main(["inspect", {str(tmp_path / 'd' / 'm2d_stats')!r}]) == 0
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "modelopt", "transformer_engine"))
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
