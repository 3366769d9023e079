#!/usr/bin/env python
"""Tokenize text into megatron-core indexed datasets: the same as `m2d preprocess` (Megatron-LM's script of this
name is not in the megatron-core wheel).

    python tools/preprocess_data.py --input corpus/ --tokenizer STUDENT_HF_DIR --out data/corpus --workers 16
"""

import sys

from megatron_m2d.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
