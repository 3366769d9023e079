#!/usr/bin/env bash
# GPT-OSS-20B (24 layers, 32 experts top-4, sinks, alternating 128-token windows) -> a 4.19 B GPT-OSS with one
# expert of width 4 x 2880 = 11,520 and top-1 routing (transformers has no dense class with GPT-OSS attention),
# DO-ACP K = k = 4, distilled like the headline (~4 B tokens, seq 4096, WSD 1e-4 -> 1e-5, global batch 128);
# random-FFN baseline. Hub checkpoints store experts in MXFP4: calibrate/densify dequantise one expert at a time,
# but `m2d convert` needs a bf16 teacher (dequantise it once, as the convert error says).
#
#   TEACHER=/models/gpt-oss-20b-bf16 CALIB_DATA=/data/calib.jsonl TRAIN_DATA=/data/fineweb-edu GPUS=8 \
#   examples/gpt_oss_20b.sh
#
# Layouts (`m2d plan`, H100 80GB, bf16, TE): 8 GPUs: TP 1 x DP 8, teacher EP 8, micro-batch 1 -> 64.9 GiB per
# GPU; 64 GPUs: TP 1 x DP 64, teacher EP 8 -> 59.8 GiB.
NAME=gpt-oss-20b
TEACHER_DEFAULT=/models/gpt-oss-20b-bf16
NUM_GROUPS_DEFAULT=4
LAYOUT_8="1 1 8 1"   # GPUs -> "tp pp teacher_ep micro_batch", as planned above
LAYOUT_64="1 1 8 1"
source "$(dirname "${BASH_SOURCE[0]}")/lib/pipeline.sh"
run_pipeline
