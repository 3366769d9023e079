#!/usr/bin/env bash
# DeepSeek-V2-Lite (27 layers, the first dense; 64 routed experts top-6 + 2 shared; MLA) -> a 2.66 B dense
# DeepSeek-V2 (every layer dense, FFN 6 x 1408 + the 2 shared experts = 11,264; MLA kept), DO-ACP K = k = 6,
# distilled like the headline (~4 B tokens, seq 4096, WSD 1e-4 -> 1e-5, global batch 128); random-FFN baseline.
# No D2D by default: no dense DeepSeek-V2 exists whose FFN pruning reaches 2.66 B (set DENSE_TEACHER to one).
#
#   TEACHER=/models/DeepSeek-V2-Lite CALIB_DATA=/data/calib.jsonl TRAIN_DATA=/data/fineweb-edu GPUS=8 \
#   examples/deepseek_v2_lite.sh
#
# Layouts (`m2d plan`, H100 80GB, bf16, TE): 8 GPUs: TP 1 x DP 8, teacher EP 8, micro-batch 1 -> 50.5 GiB per
# GPU; 64 GPUs: TP 1 x DP 64, teacher EP 8 -> 47.2 GiB. MLA needs Transformer Engine under megatron-core >= 0.19
# (see the README's conversion section).
NAME=deepseek-v2-lite
TEACHER_DEFAULT=/models/DeepSeek-V2-Lite
NUM_GROUPS_DEFAULT=6
LAYOUT_8="1 1 8 1"   # GPUs -> "tp pp teacher_ep micro_batch", as planned above
LAYOUT_64="1 1 8 1"
source "$(dirname "${BASH_SOURCE[0]}")/lib/pipeline.sh"
run_pipeline
