"""The distilled student as a HF directory: the dense class densify wrote, the tokenizer files, and a model card
that adds the distillation record to the densify record.

Everything comes from the training checkpoint itself (weights and provider config, side files with the densify
card and plan, train_state.json and run_config.json), so the end of a run and
`m2d convert megatron-to-hf` on any of its checkpoints write the same directory.
"""

from __future__ import annotations

from pathlib import Path

from megatron_m2d import __version__
from megatron_m2d.convert.checkpoint import SIDE_FILES_DIR
from megatron_m2d.distillation.megatron.checkpoint_files import CONFIG_FILE, STATE_FILE, read_json
from megatron_m2d.errors import M2DError
from megatron_m2d.io import model_card as cards

def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def distillation_record(checkpoint: str | Path) -> dict:
    """What the card states about the distillation, from the checkpoint's train state and run config."""
    checkpoint = Path(checkpoint)
    meta, config = read_json(checkpoint / STATE_FILE), read_json(checkpoint / CONFIG_FILE)
    state = meta["train_state"]
    return {
        "teacher": config.get("teacher"), "data": config.get("data"), "split": config.get("split"),
        "tokens": state.get("tokens"), "steps": state.get("step"), "planned_steps": config.get("steps"),
        "global_batch": config.get("global_batch"), "seq_len": config.get("seq_len"),
        "schedule": {k: config.get(k) for k in ("schedule", "lr", "min_lr", "warmup", "decay", "weight_decay",
                                                 "clip_grad", "adam_beta1", "adam_beta2")},
        "loss": {k: config.get(k) for k in ("temperature", "kd_weight", "teacher_top_k")},
        "final_train": _final_train(state), "final_valid": state.get("valid", {}),
        "layout": meta.get("layout"), "precision": config.get("precision"), "fp8": config.get("fp8"),
        "seed": config.get("seed"), "m2d_version": meta.get("m2d_version"),
    }


def _final_train(state: dict) -> dict:
    """Train losses as the mean of the last steps the checkpoint recorded (one step's loss is one batch's noise),
    with how many steps that is; the last step's value where no window was kept."""
    recent = state.get("recent") or {}
    if not recent:
        return dict(state.get("train") or {})
    values = {key: sum(v) / len(v) for key, v in recent.items() if v}
    values["steps_averaged"] = max(len(v) for v in recent.values())
    return values


def _blend(data) -> str:
    if isinstance(data, dict):
        data = [x for pair in zip(data.get("weights", []), data.get("prefixes", [])) for x in pair] or \
            data.get("prefixes", [])
    if not isinstance(data, list):
        return f"`{data}`"
    if len(data) >= 2 and all(isinstance(w, (int, float)) for w in data[::2]):
        return ", ".join(f"`{p}` (weight {w:g})" for w, p in zip(data[::2], data[1::2]))
    return ", ".join(f"`{p}`" for p in data)


def _loss_text(values: dict) -> str:
    parts = [f"{name} {values[key]:.4f}" for key, name in (("kd_loss", "KD (forward KL)"), ("lm_loss", "LM"))
             if isinstance(values.get(key), (int, float))]
    return ", ".join(parts) or "not recorded"


def _averaged(values: dict) -> str:
    steps = values.get("steps_averaged")
    return f" (mean of the last {steps} steps)" if steps and steps > 1 else ""


def distillation(record: dict) -> cards.Distillation:
    """The card's distillation record (rows of a table, never Python reprs) from `distillation_record`."""
    s, loss, layout = record["schedule"], record["loss"], record.get("layout") or {}
    steps = record.get("steps")
    settings = {
        "split": record.get("split"),
        "batch": f"{steps} step{'' if steps == 1 else 's'} of {record.get('global_batch')} x {record.get('seq_len')} "
                 "tokens",
        "loss": f"{loss.get('kd_weight')} x T^2 KL + {1 - (loss.get('kd_weight') or 0):g} x LM cross-entropy, "
                f"T = {loss.get('temperature')}",
        "teacher experts per token": loss.get("teacher_top_k") or "as trained",
        "schedule": f"{s.get('schedule')}: lr {s.get('lr')} -> {s.get('min_lr')}, warmup {s.get('warmup')}, decay "
                    f"{s.get('decay')}, weight decay {s.get('weight_decay')}, clip {s.get('clip_grad')}, AdamW betas "
                    f"({s.get('adam_beta1')}, {s.get('adam_beta2')})",
        "precision": f"{record.get('precision')}" + (f" + FP8 {record['fp8']}" if record.get("fp8") else ""),
        "layout": f"TP {layout.get('tp')} x PP {layout.get('pp')} x DP {layout.get('dp')}",
        f"final train loss{_averaged(record.get('final_train') or {})}": _loss_text(record.get("final_train") or {}),
        "final validation loss": _loss_text(record.get("final_valid") or {}),
        "seed": record.get("seed"),
        "megatron_m2d": record.get("m2d_version") or __version__,
    }
    return cards.Distillation(backend="Megatron-Core (`m2d distill --backend megatron`)",
                              teacher=str(record.get("teacher")), data=_blend(record.get("data")),
                              tokens=record.get("tokens"), steps=steps, settings=settings)


def model_card(checkpoint: Path, record: dict, directory: Path, name: str) -> str:
    """The densify card with its distillation section holding this run's record (model_card.add_distillation:
    "not distilled" replaced, the student's pre-distillation results dropped, the dtype read back from the
    exported weights in `directory`)."""
    card = cards.read_card(checkpoint / SIDE_FILES_DIR) or cards.new_card(
        teacher=record.get("teacher"), teacher_dir=None, model_dir=directory, name=name,
        title="Distilled dense student", summary="The student's densify record was not available when the "
        "checkpoint was saved.", facts={}, made=[])
    return cards.add_distillation(card, distillation(record), cards.weights_dtype(directory), name)


def export_student(checkpoint_dir: str | Path, out_dir: str | Path, record: dict | None = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """HF directory of the student in a training checkpoint (weights, config, tokenizer files, model card, and
    the densify plan megatron_to_hf_checkpoint copies from the side files). `record` entries override those read
    from the checkpoint. One process; reads one decoder layer at a time."""
    from megatron_m2d.convert.checkpoint import megatron_to_hf_checkpoint

    checkpoint = Path(checkpoint_dir)
    if not is_training_checkpoint(checkpoint):
        raise M2DError(f"{checkpoint} is not a distillation checkpoint (no {STATE_FILE})")
    card_record = {**distillation_record(checkpoint), **(record or {})}

    def write_card(directory: Path) -> None:
        cards.write_card(directory, model_card(checkpoint, card_record, directory, Path(out_dir).name))

    return megatron_to_hf_checkpoint(checkpoint, out_dir, overwrite=overwrite, progress=progress,
                                     write_card=write_card)


def export_after_training(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Rank 0 at the end of a run: `m2d convert megatron-to-hf` in a fresh process. The export builds the model
    at TP1/PP1 to learn its keys, which the training's parallel state (initialised for the run's layout on every
    rank) cannot give in this process without all ranks re-initialising it."""
    from megatron_m2d.distillation.megatron.inputs import run_m2d

    run_m2d(["convert", "megatron-to-hf", "--model", str(checkpoint_dir), "--out", str(out_dir), "--overwrite"],
            f"exporting {checkpoint_dir}")
    return Path(out_dir)
