"""The run's teacher and student: what they are (read before anything is converted or written, so a pair that
cannot work stops in a second), and their Megatron checkpoints. A `m2d convert hf-to-megatron` directory is used
as it is; a HF directory is converted into <out>/converted/<role> first (streamed, one parameter at a time, by
`m2d convert` in a process of its own, so its one-process layout does not meet the run's process groups) and
reused by later runs and resumes while its source is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_m2d.convert.provider import META
from megatron_m2d.distillation.megatron.config import RunConfig
from megatron_m2d.errors import M2DError

SIDE_FILES_DIR = "hf_side_files"  # where `m2d convert hf-to-megatron` keeps the HF tokenizer files
# what torchrun and SLURM set; the conversion process must not join the run's process group. TORCHELASTIC_* too: with
# TORCHELASTIC_USE_AGENT_STORE=True the child's init_process_group waits on the elastic agent's store forever
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


def child_environment() -> dict[str, str]:
    """This process's environment without the launcher's rendezvous variables."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}


@dataclass(frozen=True)
class ModelInput:
    path: Path
    hf_config: object  # transformers PretrainedConfig
    vocab_rows: int  # the Megatron output layer's (padded) vocabulary
    tokenizer_dir: Path
    converted: bool  # already a `m2d convert` directory


def describe(config: RunConfig, role: str) -> ModelInput:
    """--teacher or --student, read without converting or loading any weight."""
    from transformers import AutoConfig

    from megatron_m2d.convert.dense_mapping import padded_vocab
    from megatron_m2d.convert.provider import read_provider_config

    path = Path(getattr(config, role))
    if (path / META).is_file():
        provider = read_provider_config(path)
        return ModelInput(path, provider.hf_config, provider.vocab_rows, path / SIDE_FILES_DIR, True)
    if not (path / "config.json").is_file():
        raise M2DError(f"--{role} {path}: neither a `m2d convert hf-to-megatron` directory ({META}) nor a HF "
                       "model directory (config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise M2DError(f"--{role} {path}: unreadable config.json ({str(e).splitlines()[0]})") from None
    return ModelInput(path, hf_config, padded_vocab(hf_config, config.make_vocab_size_divisible_by), path, False)


def megatron_checkpoints(config: RunConfig) -> tuple[Path, Path]:
    """(student, teacher) Megatron checkpoint directories; HF inputs converted once, on global rank 0, while the
    other ranks wait."""
    from megatron_m2d.distillation.megatron.parallel import on_one_rank

    return tuple(Path(on_one_rank(lambda role=role: str(_megatron_checkpoint(config, role))))
                 for role in ("student", "teacher"))


def _megatron_checkpoint(config: RunConfig, role: str) -> Path:
    model = describe(config, role)
    if model.converted:
        return model.path
    target = Path(config.out) / "converted" / role
    if _converted_from(target) == str(model.path.resolve()):
        return target
    if target.exists():
        raise M2DError(f"{target} holds a conversion of another model; remove it or choose another --out")
    print(f"converting the {role} {model.path} -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    run_m2d(["convert", "hf-to-megatron", "--model", str(model.path), "--out", str(target),
             "--make-vocab-size-divisible-by", str(config.make_vocab_size_divisible_by)], f"converting the {role}")
    return target


def run_m2d(arguments: list[str], what: str) -> None:
    """`m2d <arguments>` in a fresh process outside the run's process group; its one-line error becomes ours."""
    done = subprocess.run([sys.executable, "-m", "megatron_m2d", *arguments], env=child_environment(),
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("m2d: error: ") if lines else f"exit status {done.returncode}"
        raise M2DError(f"{what} failed: {reason}")


def _converted_from(target: Path) -> str | None:
    try:
        return json.loads((target / META).read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        return None
