"""Bad input: a one-line message, a non-zero exit, and nothing left at (or beside) the output path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.cli import main
from megatron_m2d.testing.tiny import byte_tokenizer


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed while building models
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_clean_failure(code, err, out, pattern):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("m2d: error: "), err
    assert pattern in err[0], err[0]
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


@pytest.fixture
def moe(tiny, tmp_path):
    return tiny("qwen3_moe", name="moe")


@pytest.fixture
def stats(moe, text_dir, tmp_path):
    return calibrate(moe, str(text_dir), tmp_path / "stats", tokens=256, seq_len=64, progress=False).path


def densify_args(model, out, *extra):
    return ["densify", "--model", model, "--scoring", "reap", "--out", out, *extra]


@pytest.mark.parametrize("model_type,fields,message", [
    ("qwen3", dict(intermediate_size=64, head_dim=16), "not a MoE model"),
    ("phimoe", dict(intermediate_size=32, num_local_experts=4), "unknown MoE family"),
])
def test_not_a_supported_moe(capsys, tmp_path, text_dir, model_type, fields, message):
    model = tmp_path / model_type
    config = AutoConfig.for_model(model_type, vocab_size=259, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, **fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(model, out, "--data", text_dir)), out, message)


@pytest.mark.parametrize("flags,message", [
    (["--select", "9"], "exceeds the 8 experts"),
    (["--select", "1", "--groups", "2"], "smaller than --groups"),
    (["--select", "2", "--groups", "0"], "at least 1"),
])
def test_impossible_sizes(capsys, moe, stats, tmp_path, flags, message):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(moe, out, "--stats", stats, *flags)), out, message)


def sharded_copy(moe, tmp_path):
    """The tiny model re-saved as two shards with an index."""
    model = AutoModelForCausalLM.from_pretrained(moe)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="150KB")
    byte_tokenizer().save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    return path, shards


def test_missing_shard(capsys, moe, tmp_path, text_dir):
    path, shards = sharded_copy(moe, tmp_path)
    shards[-1].unlink()
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(path, out, "--data", text_dir)), out, "missing safetensors shard")


def test_truncated_shard(capsys, moe, tmp_path, text_dir):
    path, shards = sharded_copy(moe, tmp_path)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(path, out, "--data", text_dir)), out, "corrupt safetensors shard")


def test_empty_calibration_data(capsys, moe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(moe, out, "--data", empty)), out, "is empty")
    stats_out = tmp_path / "stats_out"
    code, err = run_cli(capsys, "calibrate", "--model", moe, "--data", empty, "--out", stats_out)
    assert_clean_failure(code, err, stats_out, "is empty")


def test_stats_from_another_model(capsys, tiny, stats, tmp_path):
    other = tiny("qwen3_moe", name="other", seed=1)
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(other, out, "--stats", stats)), out, "another model")


def test_output_path_exists(capsys, moe, stats, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, *densify_args(moe, out, "--stats", stats))
    assert code == 2 and len(err) == 1 and "exists" in err[0] and "--overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    assert run_cli(capsys, *densify_args(moe, out, "--stats", stats, "--overwrite"))[0] == 0
    assert (out / "m2d_plan.json").is_file() and not (out / "keep.txt").exists()


def test_pickled_weights_are_refused(capsys, tmp_path, moe, text_dir):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((moe / "config.json").read_text())
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, *densify_args(path, out, "--data", text_dir)), out, "pickled weights")


def test_console_script_exit_code(tmp_path):
    """The installed entry point, in a fresh process: non-zero status, one line on stderr."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "megatron_m2d.cli", "densify", "--model", str(tmp_path / "nope"),
                             "--scoring", "reap", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"m2d: error: model directory not found: {tmp_path / 'nope'}"]
    assert not out.exists()


def test_plan_json_is_valid(capsys, moe, stats, tmp_path):
    out = tmp_path / "ok"
    assert run_cli(capsys, *densify_args(moe, out, "--stats", stats))[0] == 0
    plan = json.loads((out / "m2d_plan.json").read_text())
    assert plan["method"]["scoring"] == "reap" and set(plan["layers"]) == {"0", "1"}
