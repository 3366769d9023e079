"""Export of a distillation checkpoint: the student loads in plain transformers with the Megatron student's logits,
with its tokenizer, and a model card that carries the densify record and the distillation record; the end of a
run (a fresh process) and `m2d convert megatron-to-hf` write the same directory."""

from __future__ import annotations

import filecmp

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
from megatron_m2d.densification.run import densify
from megatron_m2d.distillation.megatron import checkpointing, export
from megatron_m2d.distillation.megatron.checkpointing import TrainState
from tests.megatron_cpu import causal_mask, megatron_cpu  # noqa: F401  (fixture)
from tests.megatron_training import RunSettings, TinyTraining


class DistillSettings(RunSettings):
    """The run config fields the card reads (RunConfig's names)."""

    def to_dict(self) -> dict:
        return {**super().to_dict(), "teacher": "Qwen/Qwen3-30B-A3B", "data": [0.7, "web", 0.3, "code"],
                "split": "98,2,0", "steps": 10, "global_batch": 4, "seq_len": 16, "schedule": "wsd", "min_lr": 1e-5,
                "warmup": 2, "decay": 2, "weight_decay": 0.01, "clip_grad": 1.0, "adam_beta1": 0.9,
                "adam_beta2": 0.95, "temperature": 2.0, "kd_weight": 0.75, "teacher_top_k": 4,
                "precision": "fp32", "fp8": None}


def test_exported_student_loads_in_transformers_with_the_megatron_logits(megatron_cpu, tiny, text_dir,  # noqa: F811
                                                                        tmp_path):
    from megatron_m2d.cli import main

    dense = densify(tiny("qwen3_moe"), tmp_path / "dense", "gld_reap", data=str(text_dir), progress=False,
                    calibration=dict(tokens=256, seq_len=32)).path
    student = hf_to_megatron_checkpoint(dense, tmp_path / "student", progress=False)
    run = TinyTraining(student, seed=0)
    run.step()
    state = TrainState(step=1, consumed_train_samples=4, tokens=64, valid={"kd_loss": 1.5, "lm_loss": 3.75})
    state.record_train({"kd_loss": 1.0, "lm_loss": 3.0, "lr": 1e-3})
    state.record_train({"kd_loss": 1.469, "lm_loss": 4.0, "lr": 1e-3})  # the card states the mean of the window
    ckpt = checkpointing.save_checkpoint(tmp_path / "ckpt", 1, [run.ddp], run.optimizer, run.scheduler, state,
                                         DistillSettings(), student)

    out = export.export_student(ckpt, tmp_path / "model", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"  # the dense class densify wrote
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(3))
    run.model.eval()
    with torch.no_grad():
        megatron = run.model(ids, torch.arange(12).expand_as(ids), attention_mask=causal_mask(12))
        ours = hf(input_ids=ids).logits
    # fp32, different kernels: re-association noise only (a wrong or stale tensor moves logits by > 1e-2)
    assert torch.allclose(ours, megatron[..., :ours.shape[-1]], atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("fox").input_ids == AutoTokenizer.from_pretrained(dense)("fox").input_ids

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "Not distilled" not in card
    assert "Kept experts per MoE layer" in card  # the densify record
    assert 'path = "model"' in card and f'vllm serve {dense.name}`' not in card  # usage: the exported directory
    for text in ("## Distillation", "`Qwen/Qwen3-30B-A3B`", "`web` (weight 0.7), `code` (weight 0.3)", "| tokens | 64",
                 "final train loss (mean of the last 2 steps) | KD (forward KL) 1.2345, LM 3.5000",
                 "KD (forward KL) 1.5000", "wsd: lr 0.001 -> 1e-05", "T = 2.0"):
        assert text in card, text
    assert filecmp.cmp(out / "m2d_plan.json", dense / "m2d_plan.json", shallow=False)

    # `m2d convert megatron-to-hf` on the checkpoint, and the end-of-run export in a fresh process: same files
    assert main(["convert", "megatron-to-hf", "--model", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    export.export_after_training(ckpt, tmp_path / "after")
    for other in (tmp_path / "cli", tmp_path / "after"):
        assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in out.iterdir())
        for path in out.iterdir():
            if path.name == "README.md":  # the card's usage snippet names its own directory
                assert (other / path.name).read_text() == path.read_text().replace('"model"', f'"{other.name}"') \
                    .replace("vllm serve model`", f"vllm serve {other.name}`")
                continue
            assert filecmp.cmp(path, other / path.name, shallow=False), path.name
