"""The `m2d` command line. Each subcommand is a thin shell over the Python API of its stage."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_m2d import __version__
from megatron_m2d.densification.grouping import GROUPINGS
from megatron_m2d.densification.merge import MERGES, SCALINGS
from megatron_m2d.densification.scoring import SCORINGS, KernelOptions
from megatron_m2d.errors import M2DError


def _calibration_flags(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("--data", required=data_required,
                        help="local .txt/.jsonl file or directory, or a HF datasets name ('name:config')")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--gram", action="store_true",
                        help="also run every expert on every token for the all-token Gram (costs E/top-k x)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2d", description="Turn a HF Mixture-of-Experts LM into a dense LM.")
    parser.add_argument("--version", action="version", version=f"megatron_m2d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("calibrate", help="record routing statistics of a HF MoE over calibration text")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    _calibration_flags(p, data_required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="statistics directory to write")
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("densify", help="score, select, group, merge and export a dense HF checkpoint")
    p.add_argument("--model", required=True, help="HF MoE checkpoint directory (safetensors)")
    p.add_argument("--stats", help="statistics from `m2d calibrate` (omit to calibrate first on --data)")
    p.add_argument("--scoring", required=True, choices=list(SCORINGS))
    p.add_argument("--select", type=int, help="K experts kept per layer (default: k)")
    p.add_argument("--groups", type=int, help="k groups = dense width in experts (default: the model's top-k)")
    p.add_argument("--grouping", default="round_robin", choices=list(GROUPINGS))
    p.add_argument("--scaling", default="uniform", choices=list(SCALINGS))
    p.add_argument("--merge", default="average", choices=list(MERGES))
    p.add_argument("--merge-alpha", type=float, default=0.5, help="share of the others merged in by --merge partial")
    p.add_argument("--kernel-gram", default="auto", choices=["auto", "all", "gated"],
                   help="D-optimal Gram: all-token (needs calibrate --gram), gate-weighted, or auto (default): "
                        "all-token when the statistics have it")
    p.add_argument("--kernel-activation", default="reap", choices=["reap", "rms"], help="ACP weight of gld_reap")
    p.add_argument("--kernel-lambda", type=float, default=1.0, help="ridge = this x mean(diag K) / k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="largest safetensors shard written; one shard is held in memory while written (default 1)")
    _calibration_flags(p, data_required=False)
    p.add_argument("--out", required=True, help="dense HF checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("inspect", help="per-layer summary of statistics, and a heatmap of expert scores")
    p.add_argument("stats")
    p.add_argument("--plot", help="write a PNG heatmap here")
    p.add_argument("--score", default="selection_freq", help="per-expert quantity to plot")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = commands.add_parser("eval", help="held-out perplexity, and lm-eval harness tasks, of a HF model")
    p.add_argument("--model", required=True, help="HF model directory (MoE or dense)")
    p.add_argument("--data", default="fixture",
                   help="eval text: file/dir, named source (fixture, wikitext2, ...) or HF dataset (default fixture)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--method", default="nonoverlapping", choices=["nonoverlapping", "sliding"])
    p.add_argument("--stride", type=int, help="sliding window stride (default seq_len / 2)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (instead of perplexity)")
    p.add_argument("--include-path", help="folder of local lm-eval YAML tasks")
    p.add_argument("--limit", type=int, help="lm-eval: items per task")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")

    p = commands.add_parser("sweep", help="evaluate a grid of methods from one calibration pass")
    p.add_argument("--model", required=True)
    p.add_argument("--stats", help="statistics (omit to calibrate first on --data, with --gram)")
    p.add_argument("--data", help="calibration text when --stats is omitted")
    p.add_argument("--scorings", default=",".join(SCORINGS))
    p.add_argument("--groupings", default=",".join(GROUPINGS))
    p.add_argument("--scalings", default=",".join(SCALINGS))
    p.add_argument("--select", help="comma-separated K values (default: k)")
    p.add_argument("--groups", type=int, help="k (default: the model's top-k)")
    p.add_argument("--eval-data", default="fixture")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--save-checkpoints", action="store_true", help="also write every dense checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = commands.add_parser("d2d", help="baseline: dense-to-dense FFN width pruning of a dense teacher")
    p.add_argument("--model", required=True, help="dense HF teacher")
    p.add_argument("--width", type=int, required=True, help="FFN width to keep")
    _calibration_flags(p, data_required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("random-ffn", help="baseline: teacher attention with a freshly initialised dense FFN")
    p.add_argument("--model", required=True, help="HF MoE teacher")
    p.add_argument("--groups", type=int, help="width in experts, as densify's k (default: top-k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

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

    p = commands.add_parser("convert", help="HF <-> Megatron-Core distributed checkpoint (needs megatron-core)")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("--model", required=True, help="HF directory (hf-to-megatron) or m2d Megatron checkpoint")
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        p.add_argument(flag, type=int, default=1, help=f"target {what} parallel size (checked against the model; "
                       "one process writes a checkpoint that loads at any size, torchrun with tp*pp*ep ranks "
                       "writes this layout)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the Megatron vocabulary to a multiple of this (must be divisible by --tp)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = commands.add_parser("demo", help="the whole path on the committed fixture MoE (CPU, a few minutes)")
    p.add_argument("--out", default="m2d-demo")
    p.add_argument("--quick", action="store_true", help="tiny token counts: checks the path, not the methods")
    p.add_argument("--overwrite", action="store_true")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "calibrate":
        from megatron_m2d.calibration.run import calibrate

        calibrate(args.model, args.data, args.out, tokens=args.tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, gram=args.gram, device=args.device, dtype=args.dtype,
                  seed=args.seed, overwrite=args.overwrite)
    elif args.command == "densify":
        from megatron_m2d.densification.run import densify

        kernel = KernelOptions(args.kernel_gram, args.kernel_activation, args.kernel_lambda)
        calibration = dict(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, gram=args.gram,
                           device=args.device, dtype=args.dtype, seed=args.seed)
        densify(args.model, args.out, args.scoring, select=args.select, groups=args.groups, stats=args.stats,
                data=args.data, overwrite=args.overwrite, calibration=calibration, grouping=args.grouping,
                scaling=args.scaling, merge=args.merge, merge_alpha=args.merge_alpha, kernel=kernel,
                seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    elif args.command == "inspect":
        from megatron_m2d.calibration.inspect import format_table, inspect_stats

        rows = inspect_stats(args.stats, args.plot, args.score)
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        if args.plot:
            print(f"heatmap of {args.score} -> {args.plot}")
    elif args.command == "eval":
        _run_eval(args)
    elif args.command == "sweep":
        from megatron_m2d.sweep.run import sweep

        sweep(args.model, args.out, _list(args.scorings), _list(args.groupings), _list(args.scalings),
              [int(k) for k in _list(args.select)] if args.select else None, args.groups, args.stats, args.data,
              args.eval_data, args.eval_tokens, args.seq_len, seed=args.seed,
              save_checkpoints=args.save_checkpoints)
    elif args.command == "d2d":
        from megatron_m2d.baselines.d2d import d2d

        d2d(args.model, args.data, args.out, args.width, args.tokens, args.seq_len, args.batch_size, args.device,
            args.dtype, args.seed, args.overwrite)
    elif args.command == "random-ffn":
        from megatron_m2d.baselines.random_ffn import random_ffn

        random_ffn(args.model, args.out, args.groups, args.seed, args.overwrite)
    elif args.command == "distill":
        from megatron_m2d.distillation.hf import DistillConfig, distill

        fields = DistillConfig.__dataclass_fields__
        config = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
        result = distill(args.teacher, args.student, args.data, args.out, config, args.device)
        print(f"distilled {result['tokens']:,} tokens in {result['steps']} steps -> {result['model']}")
    elif args.command == "convert":
        _run_convert(args)
    elif args.command == "demo":
        from megatron_m2d.demo import run_demo

        run_demo(args.out, quick=args.quick, overwrite=args.overwrite)


def _run_convert(args) -> None:
    import importlib.util

    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise M2DError("megatron-core is not installed: pip install 'megatron_m2d[megatron]'")
    import warnings

    # megatron-core announces its fallbacks on import; none of them matters for conversion
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*")
    warnings.filterwarnings("ignore", message=r".*cuda_graph.*")
    from megatron_m2d.convert import checkpoint

    if args.direction == "hf-to-megatron":
        from megatron_m2d.convert.parallel import ParallelSizes

        sizes = ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp)
        out = checkpoint.hf_to_megatron_checkpoint(args.model, args.out, sizes, args.overwrite,
                                                   vocab_divisible_by=args.make_vocab_size_divisible_by)
    else:
        out = checkpoint.megatron_to_hf_checkpoint(args.model, args.out, args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank converts its shard; one reports
        print(f"{args.direction}: {args.model} -> {out}")


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_eval(args) -> None:
    if args.tasks:
        from megatron_m2d.evaluation.harness import run_tasks

        results = run_tasks(args.model, _list(args.tasks), args.include_path, args.limit, args.num_fewshot,
                            device=args.device)
        if args.json:
            print(json.dumps(results, indent=1))
        for task, metrics in results.items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "sample_len"))
        return
    from megatron_m2d.evaluation.perplexity import perplexity_of_dir

    result = perplexity_of_dir(args.model, args.data, args.device, seq_len=args.seq_len,
                               max_tokens=args.max_tokens, method=args.method, stride=args.stride)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.3f} ({result['method']}, {result['tokens']} tokens scored, "
              f"windows of {args.seq_len})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except M2DError as exc:
        print(f"m2d: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
