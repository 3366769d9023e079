#!/usr/bin/env python
"""Build a small random HF MoE checkpoint of any supported family, with a byte-level tokenizer.

For trying the tools without downloads, reproducing bugs, and sizing memory:

    python tools/build_tiny_moe.py --family mixtral --layers 4 --experts 8 --out /tmp/tiny-mixtral
    python tools/build_tiny_moe.py --family qwen3_moe --layers 24 --experts 64 --hidden 1024 --on-disk --out big

--on-disk writes shard by shard without building the model in memory (any size).
"""

import argparse

from megatron_m2d.testing.tiny import FAMILY_CONFIGS, build_moe_on_disk, build_tiny_moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3_moe", choices=list(FAMILY_CONFIGS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-disk", action="store_true", help="stream to disk; never hold the model in memory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    experts_field = "num_local_experts" if args.family == "mixtral" else "num_experts"
    fields = {experts_field: args.experts, "num_experts_per_tok": args.top_k}
    build = build_moe_on_disk if args.on_disk else build_tiny_moe
    path = build(args.out, args.family, seed=args.seed, layers=args.layers, hidden=args.hidden, **fields)
    print(f"wrote a random {args.family} MoE ({args.layers} layers, {args.experts} experts, top-{args.top_k}) -> {path}")


if __name__ == "__main__":
    main()
