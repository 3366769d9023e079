"""Flags and helpers more than one subcommand shares."""

from __future__ import annotations

import argparse


def calibration_flags(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("--data", required=data_required,
                        help="local .txt/.jsonl file or directory, or a HF datasets name ('name:config')")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--gram", action="store_true",
                        help="also run every expert on every token for the all-token Gram (costs E/top-k x)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
