#!/usr/bin/env python
"""HF <-> Megatron-Core distributed checkpoints: the same as `m2d convert`.

    python tools/convert_checkpoint.py hf-to-megatron --model HF_DIR --out MEGATRON_DIR --tp 2 --ep 4
    torchrun --nproc-per-node 8 tools/convert_checkpoint.py hf-to-megatron --model HF_DIR --out DIR --tp 2 --ep 4
    python tools/convert_checkpoint.py megatron-to-hf --model MEGATRON_DIR --out HF_DIR
"""

import sys

from megatron_m2d.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
