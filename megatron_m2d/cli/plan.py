"""`m2d plan`: per-GPU memory, FLOPs, time and GPU-hours of a Megatron distillation run, before it is queued.

It reads the same run config file and flags as `m2d distill --backend megatron` (one flag per RunConfig field),
plus what only a plan needs: the job's GPU count and kind, and an MFU to turn FLOPs into time.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_m2d.planning.layout import ACCELERATORS, GiB

DEFAULT_MFU = 0.40  # Megatron-LM reports 41-47 % on dense GPT training (megatron-distill.md); stated, not measured


def register(commands) -> None:
    from megatron_m2d.distillation.megatron.config import add_run_arguments

    p = commands.add_parser("plan", help="memory per GPU, FLOPs, time and GPU-hours of a Megatron distillation "
                                         "run (pure arithmetic: no GPU, no weights needed)")
    p.add_argument("--config", help="run config file (YAML or JSON), as for `m2d distill --backend megatron`; "
                                    "the flags below override it (default: none, flags only)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    p.add_argument("--gpu", default="h100", choices=sorted(ACCELERATORS),
                   help="accelerator: its memory and dense bf16 peak (default: h100)")
    p.add_argument("--memory-gb", type=float, help="GPU memory in GiB (default: the accelerator's)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"model FLOPs utilisation the time estimate assumes (default: {DEFAULT_MFU})")
    p.add_argument("--tokens", type=float, help="token budget (default: steps x global batch x seq-len)")
    p.add_argument("--groups", type=int, help="plan the student `m2d densify --groups K` would write from the "
                                              "teacher, instead of --student (default: use --student)")
    p.add_argument("--impl", default="te", choices=["te", "local"],
                   help="layer spec: te = Transformer Engine (flash attention, the GPU path), local = "
                        "megatron-core's local spec (unfused attention) (default: te)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="kept free for the CUDA context, NCCL, workspaces and fragmentation (default: 4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
    p.add_argument("--strict", action="store_true",
                   help="exit with an error when the run does not fit (for launch scripts; default: off)")
    add_run_arguments(p)
    p.set_defaults(handler=run_plan)


def run_plan(args) -> None:
    from megatron_m2d.distillation.megatron.config import config_from_args
    from megatron_m2d.errors import M2DError
    from megatron_m2d.planning import make_plan
    from megatron_m2d.planning.layout import Accelerator, Layout
    from megatron_m2d.planning.report import format_plan, plan_to_dict
    from megatron_m2d.planning.shapes import ModelShape, config_of_dir, student_of

    config = config_from_args(args.config, args)
    if not config.teacher:
        raise M2DError("--teacher is required (a HF or `m2d convert` directory; only its config is read)")
    if args.groups is None and not config.student:
        raise M2DError("give --student (a HF or `m2d convert` directory) or --groups K (the student densify "
                       "would write)")
    teacher_config, teacher_rows = config_of_dir(config.teacher)
    teacher = ModelShape.from_hf_config(teacher_config, teacher_rows, name=Path(config.teacher).name)
    if args.groups is not None:
        student = ModelShape.from_hf_config(student_of(teacher_config, args.groups),
                                            name=f"densified K={args.groups}")
    else:
        student = ModelShape.from_dir(config.student)
    if args.gpus < 1:
        raise M2DError(f"--gpus must be >= 1, got {args.gpus}")
    dp = args.gpus // (config.tp * config.pp) or 1
    layout = Layout(gpus=args.gpus, seq_len=config.seq_len, micro_batch=config.micro_batch,
                    global_batch=config.global_batch or config.micro_batch * dp, tp=config.tp, pp=config.pp,
                    teacher_ep=config.teacher_ep, precision=config.precision, fp8=config.fp8,
                    recompute=config.recompute,
                    sequence_parallel=config.tp > 1 if config.sequence_parallel is None else config.sequence_parallel,
                    use_distributed_optimizer=config.use_distributed_optimizer is not False,
                    teacher_top_k=config.teacher_top_k, impl=args.impl)
    accelerator = ACCELERATORS[args.gpu]
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise M2DError(f"--memory-gb must be > 0, got {args.memory_gb}")
        accelerator = Accelerator(accelerator.name.split()[0] + f" {args.memory_gb:g}GiB", int(args.memory_gb * GiB),
                                  accelerator.peak_flops)
    if args.reserve_gb < 0:
        raise M2DError(f"--reserve-gb must be >= 0, got {args.reserve_gb}")
    tokens = args.tokens if args.tokens is not None else config.steps * layout.tokens_per_step
    plan = make_plan(student, teacher, layout, accelerator, args.mfu, tokens, args.reserve_gb * GiB)
    print(json.dumps(plan_to_dict(plan), indent=1) if args.json else format_plan(plan))
    if args.strict and not plan.fits:
        fix = f"; smallest change that fits: {' '.join(plan.fix.changes)}" if plan.fix else ""
        raise M2DError(f"the run does not fit: {plan.memory.total / GiB:.1f} GiB per GPU of "
                       f"{accelerator.memory / GiB:.1f}{fix}")

