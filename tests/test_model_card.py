"""Model cards in the HF hub's conventions, for every checkpoint m2d writes: front matter parsed and checked, the same
shape for students and baselines, the distillation record replacing "not distilled", results in the card and its
model-index without `m2d eval` writing into the model it evaluates, the stated dtype equal to the saved one, files
0644. And the output loads and generates in a process that has plain transformers and nothing of ours."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys

import pytest
import yaml

from megatron_m2d.baselines.random_ffn import random_ffn
from megatron_m2d.cli import main
from megatron_m2d.densification.run import densify
from megatron_m2d.distillation.hf import DistillConfig, distill
from megatron_m2d.io.model_card import (Distillation, Evaluation, add_distillation, add_evaluation, public_name,
                                        weights_dtype)
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)

LICENSED_CARD = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# A tiny MoE\n"


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match[1])


def headings(card: str) -> list[str]:
    return re.findall(r"(?m)^## (.+)$", card)


def file_digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("given, expected", [
    ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"),
    ("/data/hf/hub/models--Qwen--Qwen3-30B-A3B/snapshots/0123abc", "Qwen/Qwen3-30B-A3B"),
    ("/home/me/models/my-moe/", "my-moe"),
    ("~/models/my-moe", "my-moe"),
    ("./students/dense", "students/dense"),
])
def test_public_name_never_an_absolute_path(given, expected):
    assert public_name(given) == expected


@pytest.fixture
def student(tiny, text_dir, tmp_path):
    teacher = tiny("qwen3_moe")
    (teacher / "README.md").write_text(LICENSED_CARD)
    out = densify(teacher, tmp_path / "student", "gld_reap", select=4, data=str(text_dir), progress=False,
                  calibration=dict(tokens=512, seq_len=64)).path
    return teacher, out


def test_densified_card_follows_hub_conventions(student):
    teacher, out = student
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == teacher.name and not str(meta["base_model"]).startswith("/")
    assert meta["base_model_relation"] == "finetune"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert "megatron_m2d" in meta["tags"] and "moe-to-dense" in meta["tags"]
    assert headings(card)[:3] == ["Model", "Usage", "How it was made"]
    assert "AutoModelForCausalLM.from_pretrained" in card and "not verified" in card  # usage, vLLM stated honestly
    assert f"| weights | {weights_dtype(out)} |" in card and weights_dtype(out) == "float32"
    body = re.sub(r"```.*?```", "", card.split("\n---\n", 1)[1], flags=re.S)  # prose and tables, not the snippet
    assert not re.search(r"\[\d|\{'|\[\[", body), "a Python repr in the card's prose or tables"
    assert str(teacher) not in card and "Not distilled" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_baselines_have_the_same_card_shape(student, tmp_path):
    teacher, out = student
    baseline = random_ffn(teacher, tmp_path / "random", progress=False)
    card = (baseline / "README.md").read_text()
    # the student's extra table aside, the same sections in the same order, the same front matter keys
    assert [h for h in headings((out / "README.md").read_text()) if h != "Kept experts per MoE layer"] == headings(card)
    assert set(front_matter(card)) == set(front_matter((out / "README.md").read_text()))
    assert front_matter(card)["license"] == "other" and "baseline" in front_matter(card)["tags"]


def test_distilled_card_records_the_run_and_eval_writes_only_its_out(student, tmp_path, text_dir, capsys):
    teacher, out = student
    config = DistillConfig(steps=2, seq_len=32, micro_batch=2, lr=1e-3, min_lr=1e-4, train_tokens=2048)
    model = distill(teacher, out, str(text_dir), tmp_path / "run", config, device="cpu", progress=False)["model"]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "Not distilled" not in card and "## Distillation" in card and "forward KL" in card
    assert f"| weights | {weights_dtype(tmp_path / 'run' / 'model')} |" in card
    assert front_matter(card)["base_model"] == teacher.name
    assert 'path = "run/model"' in card and f'path = "{out.name}"' not in card  # usage names the distilled model

    before = file_digests(tmp_path / "run" / "model")
    assert main(["eval", "--model", model, "--data", str(text_dir), "--seq-len", "32", "--max-tokens", "512",
                 "--out", str(tmp_path / "evaluated")]) == 0
    assert file_digests(tmp_path / "run" / "model") == before  # the evaluated model is an input: never written
    written = (tmp_path / "evaluated" / "README.md").read_text()
    index = front_matter(written)["model-index"][0]["results"][0]
    assert index["metrics"][0]["type"] == "perplexity" and index["metrics"][0]["value"] > 1
    results = json.loads((tmp_path / "evaluated" / "results.json").read_text())
    assert abs(results["results"]["ppl"] - index["metrics"][0]["value"]) < 1e-3
    assert "## Distillation" in written and "| perplexity |" in written


def test_card_updates_replace_rather_than_pile_up():
    card = ("---\nbase_model: t\n---\n# m\n\n## Model\n\n| property | value |\n|---|---|\n| weights | bfloat16 |\n\n"
            "## Distillation\n\nNot distilled.\n\n## Evaluation\n\nNone yet.\n")
    ppl = lambda v: Evaluation(metric="perplexity", value=v, dataset="fixture", dataset_name="Julius Caesar")
    card = add_evaluation(card, [ppl(300.0)])
    card = add_evaluation(card, [ppl(200.0), Evaluation("acc", 0.5, "cloze", "cloze")])
    results = front_matter(card)["model-index"][0]["results"]
    assert sorted((r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results) == [
        ("acc", 0.5), ("perplexity", 200.0)]
    assert card.count("| perplexity |") == 1
    # distillation: the record replaces "not distilled", the stated dtype follows the saved one, and results of
    # the model before distillation are dropped (they are not the distilled model's)
    card = add_distillation(card, Distillation("hf", "t", "fixture", 1000, 2, {"lr": 0.001}), weights="float32")
    assert "Not distilled" not in card and "| weights | float32 |" in card and "bfloat16" not in card
    assert "model-index" not in front_matter(card) and "| perplexity |" not in card
    assert headings(card) == ["Model", "Distillation", "Evaluation"]


def test_densified_fixture_generates_with_plain_transformers(tmp_path):
    """In a fresh process that imports transformers and nothing of ours (no megatron_m2d on the path)."""
    fixture = os.path.join(os.path.dirname(__file__), "..", "megatron_m2d", "assets", "fixture-moe")
    assert main(["densify", "--model", fixture, "--data", "fixture", "--tokens", "1024", "--seq-len", "128",
                 "--scoring", "selection_freq", "--out", str(tmp_path / "dense")]) == 0
    script = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(tmp_path / 'dense')!r}
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
ids = tokenizer("Friends, Romans, countrymen,", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
text = tokenizer.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
assert out.shape[1] == ids.input_ids.shape[1] + 12 and isinstance(text, str)  # undistilled: often just newlines
assert not any(m.startswith("megatron_m2d") for m in sys.modules)
print(type(model).__name__, str(model.dtype), repr(text))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Qwen3ForCausalLM torch.bfloat16"), result.stdout


def test_convert_round_trip_keeps_the_card_and_records_the_export(megatron_cpu, student, tmp_path):  # noqa: F811
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    _, out = student
    checkpoint = hf_to_megatron_checkpoint(out, tmp_path / "megatron", progress=False)
    back = megatron_to_hf_checkpoint(checkpoint, tmp_path / "back", progress=False)
    card = (back / "README.md").read_text()
    assert headings(card)[:3] == ["Model", "Usage", "How it was made"] and "## Conversion" in card
    assert "exported from Megatron-Core" in card and f"| weights | {weights_dtype(back)} |" in card
    assert front_matter(card)["base_model"] == front_matter((out / "README.md").read_text())["base_model"]
    assert (back / "m2d_plan.json").read_text() == (out / "m2d_plan.json").read_text()
