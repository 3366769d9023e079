"""`m2d eval`: held-out perplexity, or lm-eval harness tasks, of a HF model."""

from __future__ import annotations

import json

from megatron_m2d.cli.common import comma_list


def register(commands) -> None:
    p = commands.add_parser("eval", help="held-out perplexity, and lm-eval harness tasks, of a HF model")
    p.add_argument("--model", required=True, help="HF model directory (MoE or dense)")
    p.add_argument("--data", default="fixture",
                   help="perplexity text, its eval split: a file or directory, a named source (fixture = Julius "
                        "Caesar, wikitext2, ...) or a HF datasets name")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of --data read for perplexity")
    p.add_argument("--method", default="nonoverlapping", choices=["nonoverlapping", "sliding"],
                   help="perplexity windows: side by side, or sliding by --stride")
    p.add_argument("--stride", type=int, help="sliding window stride (default: seq_len / 2)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, run instead of perplexity (default: none)")
    p.add_argument("--include-path", help="folder of local lm-eval YAML tasks (default: lm-eval's own tasks only)")
    p.add_argument("--limit", type=int, help="lm-eval: items per task (default: all)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: the task's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", help="write results.json and a copy of the model's card with these results (README.md, "
                                 "model-index) into this new directory (default: print only; the model's own "
                                 "directory is never written)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    if args.tasks:
        from megatron_m2d.evaluation.harness import as_evaluations, run_tasks

        results = run_tasks(args.model, comma_list(args.tasks), args.include_path, args.limit, args.num_fewshot,
                            device=args.device)
        if args.json:
            print(json.dumps(results, indent=1))
        for task, metrics in results.items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "sample_len"))
        if args.out:
            save(args, results, as_evaluations(results, args.num_fewshot, args.limit))
        return
    from megatron_m2d.evaluation.perplexity import as_evaluation, perplexity_of_dir

    result = perplexity_of_dir(args.model, args.data, args.device, seq_len=args.seq_len,
                               max_tokens=args.max_tokens, method=args.method, stride=args.stride)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.3f} ({result['method']}, {result['tokens']} tokens scored, "
              f"windows of {args.seq_len})")
    if args.out:
        save(args, result, [as_evaluation(result, args.data, args.seq_len)])


def save(args, results: dict, evaluations: list) -> None:
    """Results beside the card that would carry them, in a new directory: `m2d eval` never writes into the
    model it evaluates (copy README.md over the model's own when publishing)."""
    from megatron_m2d.io.model_card import add_evaluation, public_name, read_card, write_card
    from megatron_m2d.io.writer import atomic_directory, write_json

    card = read_card(args.model) or f"# {public_name(args.model)}\n"
    with atomic_directory(args.out, args.overwrite) as tmp:
        write_json(tmp / "results.json", {"model": public_name(args.model), "results": results})
        write_card(tmp, add_evaluation(card, evaluations))
    print(f"results and the updated model card -> {args.out}")
