"""`m2d densify` and `m2d sweep`: one dense student from a method, or a grid of methods evaluated."""

from __future__ import annotations

from megatron_m2d.cli.common import calibration_flags, comma_list
from megatron_m2d.densification.grouping import GROUPINGS
from megatron_m2d.densification.merge import MERGES, SCALINGS
from megatron_m2d.calibration.store import CP_KINDS
from megatron_m2d.densification.scoring import RIDGES, SCORINGS, KernelOptions


def register(commands) -> None:
    p = commands.add_parser("densify", help="score, select, group, merge and export a dense HF checkpoint")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    p.add_argument("--stats", help="statistics from `m2d calibrate` (default: calibrate first on --data and keep "
                                   "them in OUT/m2d_stats)")
    p.add_argument("--scoring", required=True, choices=list(SCORINGS), help="expert importance (README: Methods)")
    p.add_argument("--select", type=int, help="K experts kept per layer (default: k, pure pruning)")
    p.add_argument("--groups", type=int, help="k groups = dense width in experts (default: the model's top-k)")
    p.add_argument("--grouping", default="round_robin", choices=list(GROUPINGS),
                   help="how the K kept experts form k groups (only when K > k)")
    p.add_argument("--scaling", default="uniform", choices=list(SCALINGS),
                   help="scale of each group's down projection: r/k, or by its routing mass")
    p.add_argument("--merge", default="average", choices=list(MERGES),
                   help="importance-weighted average of a group, or its dominant expert plus a share of the others")
    p.add_argument("--merge-alpha", type=float, default=0.5, help="share of the others merged in by --merge partial")
    p.add_argument("--kernel-gram", default="auto", choices=["auto", "all", "gated"],
                   help="D-optimal Gram: all-token (needs calibrate --gram), gate-weighted, or auto (default): "
                        "all-token when the statistics have it")
    p.add_argument("--kernel-activation", default="reap", choices=["reap", "rms"], help="ACP weight of gld_reap")
    p.add_argument("--kernel-lambda", type=float, default=1.0,
                   help="D-optimal ridge = this x mean(diag K) / n (n: see --kernel-ridge)")
    p.add_argument("--kernel-ridge", default="selected", choices=list(RIDGES),
                   help="n of the ridge: K, the experts selected (default, the public DO-ACP code), or k, the groups")
    p.add_argument("--cp", default="probability", choices=list(CP_KINDS),
                   help="conditional probability (conditional_prob, gram_logdet's weights, the rms activation): "
                        "the paper's Eq. 3, mean softmax probability where selected (default), or the routing "
                        "weight the model applies (renormalised top-k)")
    p.add_argument("--seed", type=int, default=0, help="seed of `random` selection and of calibration's shuffle")
    p.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="largest safetensors shard written; one shard is held in memory while written")
    calibration_flags(p, data_required=False,
                      data_help="calibration text when --stats is not given (default: none; the calibration flags "
                                "below apply then): file, directory, named source or HF datasets name")
    p.add_argument("--out", required=True, help="dense HF checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_densify)

    p = commands.add_parser("sweep", help="evaluate a grid of methods from one calibration pass")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    p.add_argument("--stats", help="statistics from `m2d calibrate` (default: calibrate first on --data, with --gram)")
    p.add_argument("--data", help="calibration text when --stats is not given (default: none; one of the two "
                                  "is needed)")
    p.add_argument("--scorings", default=",".join(SCORINGS), help="comma-separated scorings")
    p.add_argument("--groupings", default=",".join(GROUPINGS), help="comma-separated groupings (used when K > k)")
    p.add_argument("--scalings", default=",".join(SCALINGS), help="comma-separated down-projection scalings")
    p.add_argument("--select", help="comma-separated K values (default: k)")
    p.add_argument("--groups", type=int, help="k (default: the model's top-k)")
    p.add_argument("--eval-data", default="fixture", help="perplexity text (its eval split): as `m2d eval --data`")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens of --eval-data scored per configuration")
    p.add_argument("--seq-len", type=int, default=256, help="window of the perplexity evaluation, and of "
                                                            "calibration when there are no --stats")
    p.add_argument("--save-checkpoints", action="store_true", help="also write every dense checkpoint")
    p.add_argument("--cp", default="probability", choices=list(CP_KINDS), help="conditional probability (as densify)")
    p.add_argument("--seed", type=int, default=0, help="seed of `random` selection and of calibration's shuffle")
    p.add_argument("--out", required=True, help="directory of results.jsonl/csv/md and the plots (resumable)")
    p.set_defaults(handler=run_sweep)


def run_densify(args) -> None:
    from megatron_m2d.densification.run import densify

    kernel = KernelOptions(args.kernel_gram, args.kernel_activation, args.kernel_lambda, args.kernel_ridge)
    calibration = dict(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, gram=args.gram,
                       device=args.device, dtype=args.dtype, seed=args.seed)
    densify(args.model, args.out, args.scoring, select=args.select, groups=args.groups, stats=args.stats,
            data=args.data, overwrite=args.overwrite, calibration=calibration, grouping=args.grouping,
            scaling=args.scaling, merge=args.merge, merge_alpha=args.merge_alpha, kernel=kernel,
            seed=args.seed, cp=args.cp, max_shard_bytes=int(args.max_shard_gb * 1024**3))


def run_sweep(args) -> None:
    from megatron_m2d.sweep.run import sweep

    sweep(args.model, args.out, comma_list(args.scorings), comma_list(args.groupings), comma_list(args.scalings),
          [int(k) for k in comma_list(args.select)] if args.select else None, args.groups, args.stats, args.data,
          args.eval_data, args.eval_tokens, args.seq_len, seed=args.seed, save_checkpoints=args.save_checkpoints,
          cp=args.cp)
