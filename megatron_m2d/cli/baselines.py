"""`m2d d2d` and `m2d random-ffn`: the baselines a densified student is compared with at the same width."""

from __future__ import annotations

from megatron_m2d.cli.common import calibration_flags


def register(commands) -> None:
    p = commands.add_parser("d2d", help="baseline: dense-to-dense FFN width pruning of a dense teacher")
    p.add_argument("--model", required=True, help="dense HF teacher")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--width", type=int, help="FFN width to keep")
    size.add_argument("--match", metavar="MODEL_DIR",
                      help="keep the FFN width (a multiple of 64) whose parameter count is closest to this HF "
                           "model's, e.g. the densified student (a baseline at the same size)")
    p.add_argument("--importance", default="minitron", choices=["minitron", "mean"],
                   help="neuron importance: per-sequence mean |activation|, then L2 over sequences (Minitron, "
                        "modelopt's mcore_minitron; default), or the mean over all tokens")
    calibration_flags(p, data_required=True, gram=False)  # d2d runs the dense FFNs, there are no experts to pair
    p.add_argument("--seed", type=int, default=0, help="shuffles the calibration documents")
    p.add_argument("--out", required=True, help="dense HF checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_d2d)

    p = commands.add_parser("random-ffn", help="baseline: teacher attention with a freshly initialised dense FFN")
    p.add_argument("--model", required=True, help="HF MoE teacher")
    p.add_argument("--groups", type=int, help="width in experts, as densify's k (default: the model's top-k)")
    p.add_argument("--seed", type=int, default=0, help="seed of the FFN's initialisation")
    p.add_argument("--out", required=True, help="dense HF checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_random_ffn)


def run_d2d(args) -> None:
    from megatron_m2d.baselines.d2d import d2d, matched_width, parameter_count
    from megatron_m2d.io.checkpoint import Checkpoint

    width = args.width
    if args.match:
        width = matched_width(Checkpoint(args.model).config, parameter_count(Checkpoint(args.match).config))
        print(f"FFN width {width} matches the {parameter_count(Checkpoint(args.match).config):,} parameters of "
              f"{args.match}")
    d2d(args.model, args.data, args.out, width, args.tokens, args.seq_len, args.batch_size, args.device,
        args.dtype, args.seed, args.overwrite, importance=args.importance)


def run_random_ffn(args) -> None:
    from megatron_m2d.baselines.random_ffn import random_ffn

    random_ffn(args.model, args.out, args.groups, args.seed, args.overwrite)
