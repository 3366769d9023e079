"""The README's first command, end to end, in a reduced mode (fewer tokens and methods)."""

from __future__ import annotations

import csv
import math

from megatron_m2d.cli import main
from megatron_m2d.demo import run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    methods = [("gld_reap K=2", dict(scoring="gld_reap")), ("random K=4", dict(scoring="random", select=4))]
    rows = run_demo(out, tokens=2048, eval_tokens=2048, seq_len=64, methods=methods)
    assert [r["model"] for r in rows] == ["teacher (MoE)", "gld_reap K=2", "random K=4"]
    for row in rows:  # a random-weight model sits near the uniform perplexity (vocabulary of 259)
        assert math.isfinite(row["ppl"]) and 100 < row["ppl"] < 1000
    with (out / "demo.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert "held-out perplexity" in capsys.readouterr().out
    assert (out / "dense-gld_reap-k2" / "m2d_plan.json").is_file()
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
