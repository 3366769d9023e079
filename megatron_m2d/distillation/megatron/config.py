"""RunConfig: the single source of a Megatron distillation run's settings.

A run is described by one file (YAML or JSON) whose keys are RunConfig's fields; command-line flags (`--tp 2`,
`--teacher-ep 4`, one per field) override it, and the resolved config is saved in every checkpoint. Pure Python:
the planner and the launchers read it without importing megatron-core.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from megatron_m2d.errors import M2DError

SCHEDULES = ("wsd", "cosine", "constant")
PRECISIONS = ("bf16", "fp32")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
RECOMPUTE = ("selective", "full")


def _f(default, help: str, choices=None, required: bool = False):
    """A field with its command-line help (the default is appended where the flag is listed)."""
    return field(default=default, metadata={"help": help, "choices": choices, "required": required})


@dataclass(frozen=True)
class RunConfig:
    # what to distill, from what data, into where
    teacher: str | None = _f(None, "MoE teacher: a `m2d convert hf-to-megatron` directory, or a HF directory "
                                   "(converted into <out>/converted/teacher first)", required=True)
    student: str | None = _f(None, "dense student: a `m2d convert hf-to-megatron` directory, or a HF directory "
                                   "(converted into <out>/converted/student first)", required=True)
    data: list | dict | None = _f(None, "preprocessed data prefixes (`m2d preprocess` output, path without "
                                        ".bin/.idx), optionally weighted: `0.7 web 0.3 code`", required=True)
    split: str = _f("98,2,0", "train,valid,test proportions of every prefix's documents")
    out: str | None = _f(None, "run directory: checkpoints, logs, the exported student", required=True)
    # parallelism
    tp: int = _f(1, "tensor-parallel size (student and teacher)")
    pp: int = _f(1, "pipeline-parallel size (student and teacher; non-interleaved 1F1B)")
    teacher_ep: int = _f(1, "expert-parallel size of the teacher: its experts spread over the data-parallel "
                            "ranks of a stage (MoE parallel folding; the student has none)")
    micro_batch: int = _f(1, "sequences per forward pass on each data-parallel rank")
    global_batch: int | None = _f(None, "sequences per optimizer step, a multiple of micro-batch x data-parallel "
                                        "size (unset: one micro-batch per rank)")
    seq_len: int = _f(4096, "tokens per sequence")
    # optimisation
    steps: int = _f(1000, "optimizer steps")
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(1e-5, "final learning rate")
    schedule: str = _f("wsd", "learning-rate schedule after the warmup", SCHEDULES)
    warmup: int | None = _f(None, "linear warmup steps (unset: 10 % of --steps, as the HF backend)")
    decay: int = _f(0, "wsd: steps of the final decay (0: the last 10 %)")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to norms and biases)")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    # the loss
    temperature: float = _f(1.0, "softmax temperature T of the forward KL (the KL is scaled by T^2)")
    kd_weight: float = _f(1.0, "loss = kd_weight x T^2 KL + (1 - kd_weight) x LM cross-entropy")
    teacher_top_k: int | None = _f(None, "experts per token of the teacher's routers (paper: 2 x its top-k; "
                                         "unset: as trained)")
    # precision and memory
    precision: str = _f("bf16", "student and teacher weights and activations (bf16 needs a GPU)", PRECISIONS)
    fp8: str | None = _f(None, "FP8 GEMMs for the student through Transformer Engine (the teacher never)",
                         FP8_FORMATS)
    fp8_recipe: str = _f("delayed", "FP8 scaling recipe (tensorwise: TE >= 2.2, blockwise: TE >= 2.3)",
                         FP8_RECIPES)
    recompute: str | None = _f(None, "activation recompute of the student: selective (attention) or full "
                                     "(every layer)", RECOMPUTE)
    sequence_parallel: bool | None = _f(None, "sequence parallelism (unset: on when --tp > 1; a MoE teacher "
                                              "needs it under TP)")
    use_distributed_optimizer: bool | None = _f(None, "shard optimizer state over data-parallel ranks "
                                                      "(unset: on with CUDA; megatron-core's needs a GPU)")
    # bookkeeping
    seed: int = _f(0, "seed of the data order and of everything random")
    save_every: int = _f(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(3, "keep the last N checkpoints")
    eval_every: int = _f(100, "validation KD and LM loss every N steps (0: never)")
    eval_iters: int = _f(10, "validation batches (of global-batch sequences) per evaluation")
    log_every: int = _f(10, "log every N steps")
    tensorboard: bool = _f(True, "write TensorBoard event files under <out>/tensorboard")
    wandb_project: str | None = _f(None, "also log to this Weights & Biases project (needs wandb)")
    peak_tflops: float | None = _f(None, "per-device dense peak TFLOP/s that MFU is stated against (unset: the "
                                         "GPU's datasheet bf16 peak, or a measured matmul rate on CPU)")
    check_teacher: bool = _f(True, "compare the teacher's logits with its HF checkpoint before the first step")
    export: bool = _f(True, "export the final student to <out>/model as a HF directory")
    make_vocab_size_divisible_by: int = _f(128, "vocabulary padding when a HF input is converted first")

    # ---- reading and writing --------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """A run config file: YAML (.yaml/.yml) or JSON, keys = field names."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise M2DError(f"cannot read run config {path}: {e.strerror or e}") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise M2DError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise M2DError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise M2DError(f"{path}: a run config is a mapping of settings, not {type(values).__name__}")
        return cls().with_overrides(values, source=str(path))

    def with_overrides(self, values: dict, source: str = "overrides") -> "RunConfig":
        """A copy with `values` (field name -> value; dashes allowed) set, each checked against its type."""
        known = {f.name: f for f in fields(self)}
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise M2DError(f"{source}: unknown setting {key!r}")
            clean[name] = _coerce(name, known[name].type, value, source)
        return replace(self, **clean)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    # ---- checks -----------------------------------------------------------------------------------------------

    def validate(self, required: tuple[str, ...] | None = None) -> "RunConfig":
        """One-line M2DError for the first setting that cannot work; the config itself when all can. Checks that
        need the models or the world size live where those are known (parallel.plan_layout, models).
        `required`: the fields that must be set (default: all a run needs; a plan needs teacher and student)."""
        for f in fields(self):
            needed = f.metadata.get("required") if required is None else f.name in required
            if needed and getattr(self, f.name) in (None, "", [], {}):
                raise M2DError(f"--{_flag(f.name)} is required")
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise M2DError(f"--{_flag(f.name)} {value!r}: choose from {', '.join(choices)}")
        for name in ("tp", "pp", "teacher_ep", "micro_batch", "seq_len", "steps", "save_every",
                     "keep_checkpoints", "eval_iters", "log_every", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise M2DError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "decay", "eval_every", "weight_decay", "clip_grad", "min_lr"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise M2DError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.global_batch is not None and self.global_batch < 1:
            raise M2DError(f"--global-batch must be >= 1, got {self.global_batch}")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise M2DError(f"--teacher-top-k must be >= 1, got {self.teacher_top_k}")
        if not self.lr > 0 or self.min_lr > self.lr:
            raise M2DError(f"--lr must be > 0 and >= --min-lr (got {self.lr} and {self.min_lr})")
        if self.warmup_steps >= self.steps:
            raise M2DError(f"--warmup {self.warmup} must be shorter than --steps {self.steps}")
        if self.schedule == "wsd" and self.decay > self.steps - self.warmup_steps:
            raise M2DError(f"--decay {self.decay} exceeds the {self.steps - self.warmup_steps} steps after the "
                           "warmup")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise M2DError(f"--kd-weight must lie in [0, 1], got {self.kd_weight}")
        if not self.temperature > 0:
            raise M2DError(f"--temperature must be > 0, got {self.temperature}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise M2DError("--adam-beta1 and --adam-beta2 must lie in [0, 1)")
        if self.sequence_parallel and self.tp == 1:
            raise M2DError("--sequence-parallel needs --tp > 1 (it splits the sequence over tensor-parallel ranks)")
        if self.fp8 and self.precision != "bf16":
            raise M2DError("--fp8 trains the student in FP8 GEMMs over bf16 weights: it needs --precision bf16")
        if self.fp8:
            from megatron_m2d.convert.megatron_model import te_available

            if not te_available():
                raise M2DError("--fp8 needs Transformer Engine, which is not importable here "
                               "(install transformer_engine[pytorch], or drop --fp8)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise M2DError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        from megatron_m2d.distillation.megatron.data import parse_blend, parse_split

        if self.data is not None:
            parse_blend(self.data)
        parse_split(self.split)
        return self

    # ---- derived values -----------------------------------------------------------------------------------------

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    @property
    def decay_steps(self) -> int:
        """Steps of the wsd schedule's final decay."""
        return self.decay or max(1, self.steps // 10)


# ---- command line ---------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(annotation: str) -> str:
    """'int | None' -> 'int' (annotations are strings under `from __future__ import annotations`)."""
    return [t.strip() for t in str(annotation).split("|") if t.strip() != "None"][0]


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
           "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
           "list": lambda v: isinstance(v, (list, str)), "dict": lambda v: isinstance(v, dict)}


def _coerce(name: str, annotation, value, source: str):
    """`value` checked against the field's type (ints are accepted for floats; None where the field allows)."""
    kinds = [t.strip() for t in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise M2DError(f"{source}: {name} cannot be null")
    if not any(_CHECKS[k](value) for k in kinds if k in _CHECKS):
        raise M2DError(f"{source}: {name} must be {' or '.join(k for k in kinds if k != 'None')}, got {value!r}")
    return float(value) if kinds[0] == "float" else value


def add_run_arguments(parser: argparse.ArgumentParser, defaults_shown: dict[str, str] | None = None,
                      notes: dict[str, str] | None = None) -> None:
    """One flag per RunConfig field (`--teacher-ep` for teacher_ep). Flags not given stay out of the namespace
    (argparse.SUPPRESS), so only what the user typed overrides the run config file. `defaults_shown`: how a
    field's default reads in its help ("{}" = the RunConfig default); `notes`: added to a field's help."""
    for f in fields(RunConfig):
        kind = _base_type(f.type)
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata["help"]
        if not f.metadata.get("required"):
            shown = "none" if default is None else default  # "None" reads as a Python repr
            help_text += f" (default: {(defaults_shown or {}).get(f.name, '{}').format(shown)})"
        else:  # not required by argparse: a run config file may set it instead
            help_text += " (required: here or in the --config file)"
        if notes and f.name in notes:
            help_text += f"; {notes[f.name]}"
        kwargs = dict(default=argparse.SUPPRESS, help=help_text.replace("%", "%%"), dest=f.name)
        if f.name == "data":
            kwargs.update(nargs="+", metavar="PREFIX")
        elif kind == "bool":
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif f.metadata.get("choices"):
            kwargs.update(choices=list(f.metadata["choices"]))
        else:
            kwargs.update(type={"int": int, "float": float}.get(kind, str))
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)


def config_from_args(config_file: str | None, args: argparse.Namespace) -> RunConfig:
    """The run config file (if any) with the flags given on the command line set over it."""
    base = RunConfig.from_file(config_file) if config_file else RunConfig()
    names = {f.name for f in fields(RunConfig)}
    return base.with_overrides({k: v for k, v in vars(args).items() if k in names}, source="command line")
