"""Perplexity equals a hand computation; sliding windows score each token once; lm-eval runs a local task."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_m2d.cli import main
from megatron_m2d.data.text import token_stream
from megatron_m2d.evaluation.perplexity import load_model, perplexity, stream_perplexity

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"


def hand_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token | prefix) computed one position at a time, no batching, no cross_entropy."""
    total = 0.0
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].double()
    for position in range(1, len(ids)):
        log_probs = logits[position - 1] - torch.logsumexp(logits[position - 1], dim=-1)
        total -= float(log_probs[ids[position]])
    return total, len(ids) - 1


def test_nonoverlapping_perplexity_equals_hand_computation(tiny, text_dir):
    model, tokenizer = load_model(tiny("qwen3_moe"))
    stream = token_stream(tokenizer, str(text_dir), 200, role="eval")
    total, count = 0.0, 0
    for window in stream[:192].view(3, 64):
        nll, n = hand_nll(model, window)
        total, count = total + nll, count + n
    result = perplexity(model, tokenizer, str(text_dir), seq_len=64, max_tokens=200, batch_size=2)
    assert result["tokens"] == count == 3 * 63
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_window_scores_every_token_once_with_context(tiny, text_dir):
    model, tokenizer = load_model(tiny("qwen3_moe"))
    stream = token_stream(tokenizer, str(text_dir), 150, role="eval")
    result = stream_perplexity(model, stream, seq_len=64, method="sliding", stride=32)
    assert result["tokens"] == len(stream) - 1  # every token but the first, exactly once
    # by hand: each window scores only the tokens no earlier window scored, each from its full window context
    expected_nll, expected_count = 0.0, 0
    scored_until = 0
    for begin in range(0, len(stream) - 1, 32):
        end = min(begin + 64, len(stream))
        window = stream[begin:end]
        with torch.no_grad():
            logits = model(input_ids=window.unsqueeze(0)).logits[0].double()
        for position in range(max(scored_until - begin, 0) + 1, len(window)):
            log_probs = logits[position - 1] - torch.logsumexp(logits[position - 1], -1)
            expected_nll -= float(log_probs[window[position]])
            expected_count += 1
        scored_until = end - 1
        if end == len(stream):
            break
    assert expected_count == result["tokens"]
    assert result["nll"] == pytest.approx(expected_nll / expected_count, rel=1e-5)


def test_eval_cli_perplexity(tiny, text_dir, capsys):
    model = tiny("mixtral")
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", str(text_dir), "--seq-len", "64", "--max-tokens", "256"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_lm_eval_local_task(tiny, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    model = tiny("qwen3_moe")
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--tasks", "caesar_cloze", "--include-path", str(tasks),
                 "--limit", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "caesar_cloze: acc " in out


def test_unknown_task_is_a_clear_error(tiny, capsys):
    pytest.importorskip("lm_eval")
    model = tiny("qwen3_moe")
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
