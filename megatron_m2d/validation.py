"""One validation layer for every subcommand: arguments and paths are checked here before any work starts, with
one rule per flag (the same check and the same message wherever the flag appears) and one rule per kind of path.
The stages call the same path rules from their Python API (`check_output`), so a library user is protected too.

Adding a command: flags named like the existing ones (--model, --teacher, --data, --stats, --out, --seq-len,
--steps, ...) are checked with no change here. A new numeric flag gets a row in NUMBERS; a new path flag a row in
INPUTS, or in COMMAND_INPUTS when its meaning differs by command (or by `direction`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_m2d.errors import M2DError

ASSETS = Path(__file__).resolve().parent / "assets"  # the committed fixtures: an input of every command


@dataclass(frozen=True)
class Bound:
    """Inclusive `low`/`high`, exclusive `above`; floats must also be finite."""
    low: float | None = None
    high: float | None = None
    above: float | None = None

    def problem(self, value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.above is not None and not value > self.above:
            return f"must be greater than {self.above:g}"
        if self.low is not None and value < self.low:
            return f"must be at least {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}"
        return None


# argparse dest -> its range, whichever command has the flag
NUMBERS = {
    "tokens": Bound(1), "seq_len": Bound(2), "batch_size": Bound(1), "max_tokens": Bound(2), "eval_tokens": Bound(2),
    "train_tokens": Bound(1), "stride": Bound(1), "micro_batch": Bound(1), "grad_accum": Bound(1),
    "select": Bound(1), "groups": Bound(1), "width": Bound(1), "teacher_top_k": Bound(1),
    "merge_alpha": Bound(0, 1), "kernel_lambda": Bound(above=0), "max_shard_gb": Bound(above=0),
    "steps": Bound(1), "save_every": Bound(1), "log_every": Bound(1), "lr": Bound(above=0), "min_lr": Bound(0),
    "warmup": Bound(0), "decay": Bound(0), "temperature": Bound(above=0), "kd_weight": Bound(0, 1),
    "weight_decay": Bound(0), "clip_grad": Bound(0), "limit": Bound(1), "num_fewshot": Bound(0),
    "tp": Bound(1), "pp": Bound(1), "ep": Bound(1), "vpp": Bound(1), "make_vocab_size_divisible_by": Bound(1),
    "seed": Bound(0, 2**32 - 1), "gpus": Bound(1), "mfu": Bound(above=0, high=1), "memory_gb": Bound(above=0),
    "reserve_gb": Bound(0), "teacher_ep": Bound(1), "global_batch": Bound(1), "keep_checkpoints": Bound(1),
    "eval_every": Bound(0), "eval_iters": Bound(1), "peak_tflops": Bound(above=0), "workers": Bound(1),
}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# argparse dest -> kind of input path; COMMAND_INPUTS overrides per command (or command + direction)
INPUTS = {"model": "hf_model", "teacher": "hf_model", "student": "hf_model", "stats": "stats", "data": "data",
          "eval_data": "data", "include_path": "directory", "input": "path", "tokenizer": "tokenizer",
          "match": "hf_model"}
# keyed by command, or (command, direction or backend); None: not a path this command reads
COMMAND_INPUTS = {("convert", "megatron-to-hf"): {"model": "megatron_checkpoint"},
                  **{command: {"model": "hf_moe"} for command in ("calibrate", "densify", "sweep", "random-ffn")},
                  "plan": {"teacher": "model_config", "student": "model_config", "data": None},
                  ("distill", "megatron"): {"teacher": "model_dir", "student": "model_dir", "data": "dataset_prefix"}}
OUTPUTS = ("out", "plot")
NOT_WRITTEN = {"plan": ("out",)}  # `m2d plan` reads the run's config, --out included, and writes nothing


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate(args) -> None:
    """Every check that needs no model computation, in the order a user would fix them."""
    check_numbers(args)
    inputs = check_inputs(args)
    for dest in OUTPUTS:
        if getattr(args, dest, None) and dest not in NOT_WRITTEN.get(getattr(args, "command", None), ()):
            check_output(getattr(args, dest), inputs, flag(dest))


def check_numbers(args) -> None:
    for dest, bound in NUMBERS.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, str):  # comma-separated lists (sweep --select 2,4)
            try:
                values = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise M2DError(f"{flag(dest)} {value!r}: expected comma-separated integers") from None
        for v in values:
            problem = bound.problem(v)
            if problem:
                raise M2DError(f"{flag(dest)} {problem} (got {v})")
    if getattr(args, "lr", None) is not None and getattr(args, "min_lr", None) is not None and args.min_lr > args.lr:
        raise M2DError(f"--min-lr {args.min_lr:g} exceeds --lr {args.lr:g}")
    device = getattr(args, "device", None)
    if isinstance(device, str) and not DEVICE.fullmatch(device):
        raise M2DError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def _input_kinds(args) -> dict[str, str]:
    kinds = dict(INPUTS)
    command = getattr(args, "command", None)
    variant = getattr(args, "direction", None) or getattr(args, "backend", None)
    kinds.update(COMMAND_INPUTS.get(command, {}))
    kinds.update(COMMAND_INPUTS.get((command, variant), {}))
    return {dest: kind for dest, kind in kinds.items() if kind and getattr(args, dest, None) is not None}


def check_inputs(args) -> list[tuple[str, Path]]:
    """Open every input far enough to know it is what its flag says; returns the local paths read."""
    read: list[tuple[str, Path]] = []
    for dest, kind in _input_kinds(args).items():
        given = getattr(args, dest)
        for value in map(str, given if isinstance(given, (list, tuple)) else [given]):
            read += [(flag(dest), path) for path in CHECKS[kind](value, flag(dest))]
            if kind in ("hf_model", "hf_moe"):
                _check_positions(args, value, flag(dest))
    return read


def looks_like_path(text: str) -> bool:
    """A local path, mistyped or not, must never be sent to the hub: it contains a path separator (beyond one
    'org/name' whose org is not a local folder), starts with '.' or '~', or ends in a file extension."""
    name = text.split(":", 1)[0]
    if text.startswith((".", "~", "/")) or "\\" in text or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,9}$", name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and (Path(parts[0]).exists() or "" in parts))


def _hf_model(value: str, what: str, moe: bool = False) -> list[Path]:
    from megatron_m2d.io.model_checks import check_hf_model

    path = Path(value)
    if not path.exists() and not looks_like_path(value):
        raise M2DError(f"{what} {value}: no such model directory (m2d reads local safetensors checkpoints; "
                       f"fetch a hub model with `huggingface-cli download {value} --local-dir DIR`)")
    check_hf_model(path, moe)
    return [path]


def _megatron_checkpoint(value: str, what: str) -> list[Path]:
    from megatron_m2d.convert.dcp_read import read_metadata
    from megatron_m2d.convert.provider import read_provider_config

    path = Path(value)
    if not path.is_dir():
        raise M2DError(f"{what} {value}: no such checkpoint directory")
    read_provider_config(path)
    read_metadata(path)  # named classes only, before anything else reads the file
    return [path]


def _stats(value: str, what: str) -> list[Path]:
    from megatron_m2d.calibration.store import Statistics

    if not Path(value).is_dir():
        raise M2DError(f"{what} {value}: no such statistics directory")
    Statistics(value)
    return [Path(value)]


def _data(value: str, what: str) -> list[Path]:
    from megatron_m2d.data.text import NAMED_SOURCES

    if value in NAMED_SOURCES:
        return [Path(location) for location, _ in NAMED_SOURCES[value].values() if Path(location).exists()]
    if Path(value).exists():
        return [Path(value)]
    if looks_like_path(value):
        raise M2DError(f"{what} {value}: no such file or directory (a HF datasets name looks like "
                       "'name[:config]' or 'org/name[:config]')")
    return []  # a HF datasets name, read by `datasets` when the stage needs it


def _directory(value: str, what: str) -> list[Path]:
    if not Path(value).is_dir():
        raise M2DError(f"{what} {value}: no such directory")
    return [Path(value)]


def _path(value: str, what: str) -> list[Path]:
    if not Path(value).exists():
        raise M2DError(f"{what} {value}: no such file or directory")
    return [Path(value)]


def _tokenizer(value: str, what: str) -> list[Path]:
    from megatron_m2d.io.model_checks import TOKENIZER_FILES

    _directory(value, what)
    if not any((Path(value) / name).is_file() for name in TOKENIZER_FILES):
        raise M2DError(f"{what} {value} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])})")
    return [Path(value)]


def _model_config(value: str, what: str) -> list[Path]:
    """A model only planned from: its config.json or m2d_convert.json is read, its weights need not be there."""
    from megatron_m2d.convert.provider import META, read_provider_config
    from megatron_m2d.io.checkpoint import Checkpoint

    if not Path(value).is_dir():
        raise M2DError(f"{what} {value}: no such model directory")
    if (Path(value) / META).is_file():
        read_provider_config(value)
    else:
        Checkpoint.read_config(Path(value))
    return [Path(value)]


def _model_dir(value: str, what: str) -> list[Path]:
    """A `m2d convert` directory (Megatron checkpoint) or a HF model directory."""
    from megatron_m2d.convert.provider import META

    if (Path(value) / META).is_file():
        return _megatron_checkpoint(value, what)
    return _hf_model(value, what)


def _dataset_prefix(value: str, what: str) -> list[Path]:
    """Indexed-dataset prefixes (`m2d preprocess` output; numbers among them are blend weights): their files are
    inputs no output may touch. The engine checks the pairs themselves (indexed.check_prefix), after the model
    pair and the layout, so that a user fixes them in that order."""
    try:
        float(value)
        return []
    except ValueError:
        return [path for path in (Path(value + ".idx"), Path(value + ".bin")) if path.exists()]


CHECKS = {"hf_model": _hf_model, "model_config": _model_config, "model_dir": _model_dir,
          "dataset_prefix": _dataset_prefix, "hf_moe": lambda value, what: _hf_model(value, what, moe=True), "megatron_checkpoint": _megatron_checkpoint, "stats": _stats, "data": _data,
          "directory": _directory, "path": _path, "tokenizer": _tokenizer}


def _check_positions(args, model: str, what: str) -> None:
    import json

    seq_len = getattr(args, "seq_len", None)
    try:
        positions = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return  # Checkpoint() above reported an unreadable config already
    if isinstance(seq_len, int) and isinstance(positions, int) and seq_len > positions:
        raise M2DError(f"--seq-len {seq_len} exceeds the {positions} positions of {what} {model} "
                       "(max_position_embeddings)")


def real(path: str | Path) -> Path:
    """The path with every symlink resolved (also through parents that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _local_inputs(inputs):
    """(name, existing local path) for every input: named data sources stand for their files; hub names and
    paths that do not exist cannot be written over."""
    from megatron_m2d.data.text import NAMED_SOURCES

    for item in [("the package's fixtures", ASSETS), *inputs]:
        name, value = item if isinstance(item, tuple) else ("input", item)
        if value is None:
            continue
        if str(value) in NAMED_SOURCES:
            locations = [location for location, _ in NAMED_SOURCES[str(value)].values()]
        else:
            locations = [value]
        yield from ((name, Path(p)) for p in locations if Path(p).exists() or Path(p).is_symlink())


def check_output(out: str | Path, inputs, what: str = "--out") -> None:
    """An output never is, contains or lies inside an input (real paths, symlinks resolved), and its folder is
    there and writable. `inputs`: paths, or (flag, path) pairs for the message."""
    target = real(out)
    for name, path in _local_inputs(inputs):
        source = real(path)
        if target == source or source in target.parents:
            relation = "is" if target == source else "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise M2DError(f"{what} {out} {relation} {name} {path}: m2d never writes over, into or around its inputs")
    parent = Path(out).parent
    if not parent.is_dir():
        raise M2DError(f"{what} {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise M2DError(f"{what} {out}: cannot write in {parent} (permission denied or read-only)")
    if Path(out).is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise M2DError(f"{what} {out}: cannot write in it (permission denied or read-only)")
