"""`m2d distill`: the dense student distilled from its MoE teacher (forward KL on logits).

Two backends share the flags they have in common: `hf` (PyTorch + transformers, torchrun DDP; small scale, the
demo's) and `megatron` (Megatron-Core: TP/PP/DP, an expert-parallel teacher, FP8; pretraining scale), whose
settings are a run config file (`--config`, YAML or JSON) that the flags override.
"""

from __future__ import annotations

import argparse

from megatron_m2d.cli.common import is_main_process
from megatron_m2d.errors import M2DError

# the HF backend's defaults where they differ from the Megatron run config's (tests compare with DistillConfig)
HF_DEFAULTS = {"steps": 200, "seq_len": 256, "micro_batch": 8}
# flags only the HF backend reads: (type, default, help)
HF_ONLY = {"grad_accum": (int, 1, "micro-batches per optimizer step, per process"),
           "train_tokens": (int, 2_000_000, "tokens of the training text packed into blocks"),
           "device": (str, "auto", "auto (cuda when available), cpu, cuda, cuda:N")}
_NOT_SETTINGS = {"backend", "config", "handler", "command"}


def register(commands) -> None:
    from megatron_m2d.distillation.megatron.config import add_run_arguments

    p = commands.add_parser("distill", help="distill a dense student from its MoE teacher (forward KL on logits)",
                            description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backend", default="hf", choices=["hf", "megatron"],
                   help="hf: PyTorch + transformers (torchrun DDP); megatron: Megatron-Core at scale (default: hf)")
    p.add_argument("--config", default=None,
                   help="--backend megatron: run config file (YAML or JSON, keys = the settings below, e.g. "
                        "seq_len); flags given here override it (default: none)")
    add_run_arguments(p, defaults_shown={k: f"{v} with --backend hf, {{}} with megatron"
                                         for k, v in HF_DEFAULTS.items()},
                      notes={"data": "--backend hf: one training text source instead (file, directory, named "
                                     "source or HF datasets name); its train split is packed into blocks",
                             "teacher": "--backend hf: a HF directory", "student": "--backend hf: a HF directory",
                             "out": "either backend resumes a run directory it finds"})
    group = p.add_argument_group("--backend hf only")
    for name, (kind, default, text) in HF_ONLY.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=argparse.SUPPRESS,
                           help=f"{text} (default: {default})")
    p.set_defaults(handler=run_distill)


def run_distill(args) -> None:
    from megatron_m2d.distillation.megatron.config import RunConfig

    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    run_only = set(RunConfig.__dataclass_fields__) - _hf_settings() - {"teacher", "student", "data", "out"}
    if args.backend == "megatron":
        _refuse(set(given) & set(HF_ONLY), "--backend hf")
        _run_megatron(args)
    else:
        _refuse(set(given) & run_only | ({"config"} if args.config else set()), "--backend megatron")
        _run_hf(given)


def _hf_settings() -> set[str]:
    from megatron_m2d.distillation.megatron.config import RunConfig

    shared = {"steps", "seq_len", "micro_batch", "lr", "min_lr", "schedule", "warmup", "decay", "weight_decay",
              "clip_grad", "temperature", "kd_weight", "teacher_top_k", "seed", "save_every", "log_every"}
    return shared & set(RunConfig.__dataclass_fields__)


def _refuse(names: set[str], backend: str) -> None:
    if names:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(names))
        raise M2DError(f"{flags}: only with {backend}")


def _run_hf(given: dict) -> None:
    from megatron_m2d.distillation.hf import DistillConfig, distill

    for name in ("teacher", "student", "data", "out"):
        if not given.get(name):
            raise M2DError(f"--{name} is required")
    if len(given["data"]) != 1:
        raise M2DError("--backend hf reads one training text source (--data PATH)")
    fields = DistillConfig.__dataclass_fields__
    config = DistillConfig(**{k: v for k, v in given.items() if k in fields})
    result = distill(given["teacher"], given["student"], given["data"][0], given["out"], config,
                     given.get("device", HF_ONLY["device"][1]))
    if is_main_process():
        print(f"distilled {result['tokens']:,} tokens in {result['steps']} steps -> {result['model']}")


def _run_megatron(args) -> None:
    from megatron_m2d.cli.convert import require_megatron_core

    require_megatron_core()
    from megatron_m2d.distillation.megatron.config import config_from_args
    from megatron_m2d.distillation.megatron.run import run

    from megatron_m2d.distillation.megatron.parallel import is_logging_rank

    result = run(config_from_args(args.config, args))
    if is_logging_rank():
        print(f"distilled {result['tokens']:,} tokens in {result['steps']} steps -> "
              f"{result['model'] or result['checkpoint']}")
