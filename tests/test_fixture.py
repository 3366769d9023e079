"""The committed fixture MoE is a real, trained model: it loads, predicts held-out text far better than chance,
routes non-trivially, and makes the scoring methods disagree."""

from __future__ import annotations

import json

import pytest

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.demo import FIXTURE_DENSE, FIXTURE_MOE
from megatron_m2d.densification.scoring import KernelOptions, score_layer
from megatron_m2d.evaluation.perplexity import load_model, perplexity


@pytest.mark.parametrize("path", [FIXTURE_MOE, FIXTURE_DENSE], ids=["moe", "dense"])
def test_fixture_predicts_held_out_text_far_better_than_uniform(path):
    model, tokenizer = load_model(path)
    result = perplexity(model, tokenizer, "fixture", seq_len=256, max_tokens=4096)
    uniform = len(tokenizer)
    assert result["ppl"] < uniform / 10, (result["ppl"], uniform)
    card = json.loads((path / "training.json").read_text())
    assert card["held_out_ppl"] < uniform / 10


def test_fixture_routing_is_balanced_but_not_uniform_and_scorings_disagree(tmp_path):
    stats = calibrate(FIXTURE_MOE, "fixture", tmp_path / "stats", tokens=8192, seq_len=256, gram=True,
                      progress=False)
    selections = set()
    for layer in stats.moe_layers:
        layer_stats = stats.layer(layer)
        freq = layer_stats.selection_freq
        # no collapse onto a few experts: at least 3 in 4 experts serve Macbeth (the fixture leaves 1-4 of 16 idle)
        assert int((layer_stats.sums["count"] == 0).sum()) <= 4
        assert float(freq.max()) > 1.5 * float(freq.mean())  # but not uniform either: experts specialise
        picks = tuple(tuple(score_layer(layer_stats, s, 2, 2, KernelOptions(), 0).experts)
                      for s in ("selection_freq", "conditional_prob", "reap", "gld_reap"))
        selections.add(picks)
        assert len({frozenset(p) for p in picks}) >= 2  # the scorings do not all keep the same experts
