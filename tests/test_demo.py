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
