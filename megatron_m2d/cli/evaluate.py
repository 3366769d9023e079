"""`m2d eval`: held-out perplexity, or lm-eval harness tasks, of a HF model."""

from __future__ import annotations

import json

from megatron_m2d.cli.common import comma_list


def register(commands) -> None:
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
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    if args.tasks:
        from megatron_m2d.evaluation.harness import run_tasks

        results = run_tasks(args.model, comma_list(args.tasks), args.include_path, args.limit, args.num_fewshot,
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
