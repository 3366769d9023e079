"""`m2d distill`: the dense student distilled from its MoE teacher (forward KL on logits)."""

from __future__ import annotations

from megatron_m2d.cli.common import is_main_process


def register(commands) -> None:
    p = commands.add_parser("distill", help="distill a dense student from its MoE teacher (forward KL on logits)")
    p.add_argument("--backend", default="hf", choices=["hf"], help="hf: PyTorch + transformers (torchrun DDP)")
    p.add_argument("--teacher", required=True, help="HF MoE teacher directory")
    p.add_argument("--student", required=True, help="dense HF student directory (e.g. from `m2d densify`)")
    p.add_argument("--data", required=True, help="training text (its train split): file, directory, named source "
                                                 "or HF datasets name")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, log.jsonl, model/ (resumes if present)")
    for flag, kind, default, text in (
            ("--steps", int, 200, "optimizer steps"),
            ("--seq-len", int, 256, "tokens per sequence"),
            ("--micro-batch", int, 8, "sequences per forward pass, per process"),
            ("--grad-accum", int, 1, "micro-batches per optimizer step, per process"),
            ("--lr", float, 1e-4, "peak learning rate"),
            ("--min-lr", float, 1e-5, "learning rate at the end of the decay"),
            ("--warmup", int, None, "linear warmup steps (default: 10 %% of --steps)"),
            ("--decay", int, 0, "wsd: steps of the final decay (0: the last 10 %% of --steps)"),
            ("--temperature", float, 1.0, "softmax temperature T of the KL (the loss is scaled by T^2)"),
            ("--kd-weight", float, 1.0, "weight of the KL; 1 - this weighs the LM loss"),
            ("--teacher-top-k", int, None, "experts per token the teacher runs (default: as trained; the paper "
                                           "uses 2 x top-k)"),
            ("--train-tokens", int, 2_000_000, "tokens of --data packed into training blocks"),
            ("--save-every", int, 100, "steps between resumable checkpoints"),
            ("--seed", int, 0, "seed of the batch order and of torch"),
            ("--weight-decay", float, 0.0, "AdamW weight decay"),
            ("--clip-grad", float, 1.0, "gradient-norm clip (0: none)")):
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--schedule", default="wsd", choices=["wsd", "cosine", "constant"],
                   help="learning-rate schedule after warmup: warmup-stable-decay, cosine, constant")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:N")
    p.set_defaults(handler=run_distill)


def run_distill(args) -> None:
    from megatron_m2d.distillation.hf import DistillConfig, distill

    fields = DistillConfig.__dataclass_fields__
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = distill(args.teacher, args.student, args.data, args.out, config, args.device)
    if is_main_process():
        print(f"distilled {result['tokens']:,} tokens in {result['steps']} steps -> {result['model']}")
