"""`m2d distill`: the dense student distilled from its MoE teacher (forward KL on logits)."""

from __future__ import annotations


def register(commands) -> None:
    p = commands.add_parser("distill", help="distill a dense student from its MoE teacher (forward KL on logits)")
    p.add_argument("--backend", default="hf", choices=["hf"], help="hf: PyTorch + transformers (torchrun DDP)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True, help="training text (its train split)")
    p.add_argument("--out", required=True)
    for flag, kind, default in (("--steps", int, 200), ("--seq-len", int, 256), ("--micro-batch", int, 8),
                                ("--grad-accum", int, 1), ("--lr", float, 1e-4), ("--min-lr", float, 1e-5),
                                ("--warmup", int, 10), ("--decay", int, 0), ("--temperature", float, 1.0),
                                ("--kd-weight", float, 1.0), ("--teacher-top-k", int, None),
                                ("--train-tokens", int, 2_000_000), ("--save-every", int, 100), ("--seed", int, 0),
                                ("--weight-decay", float, 0.0), ("--clip-grad", float, 1.0)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--schedule", default="wsd", choices=["wsd", "cosine", "constant"])
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=run_distill)


def run_distill(args) -> None:
    from megatron_m2d.distillation.hf import DistillConfig, distill

    fields = DistillConfig.__dataclass_fields__
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = distill(args.teacher, args.student, args.data, args.out, config, args.device)
    print(f"distilled {result['tokens']:,} tokens in {result['steps']} steps -> {result['model']}")
