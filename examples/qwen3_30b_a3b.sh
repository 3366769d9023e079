#!/usr/bin/env bash
# The paper's headline: Qwen3-30B-A3B (48 layers, 128 experts, top-8) -> a 3.34 B dense Qwen3 (FFN 8 x 768 = 6144)
# initialised by DO-ACP (gld_reap, K = k = 8), distilled on ~4 B tokens at seq 4096 with WSD 1e-4 -> 1e-5, global
# batch 128 (7,630 steps); the random-FFN baseline and D2D (Qwen3-4B's FFN pruned to 7,232 = the same 3.34 B)
# distilled on the same tokens from the same teacher.
#
#   TEACHER=/models/Qwen3-30B-A3B DENSE_TEACHER=/models/Qwen3-4B CALIB_DATA=/data/calib.jsonl \
#   TRAIN_DATA=/data/fineweb-edu EVAL_TASKS=arc_easy,arc_challenge,hellaswag,winogrande,mmlu \
#   GPUS=8 examples/qwen3_30b_a3b.sh            # GPUS=64: 8 nodes through SLURM (launch/distill.slurm)
#
# Layouts (`m2d plan`, H100 80GB, bf16, TE): 8 GPUs: TP 1 x DP 8, teacher EP 8, micro-batch 1 -> 64.6 GiB per
# GPU; 64 GPUs: TP 1 x DP 64, teacher EP 8 (within a node), micro-batch 1 -> 60.5 GiB. Calibration and densify
# need one GPU. Every setting is an environment variable (examples/lib/pipeline.sh lists them).
NAME=qwen3-30b-a3b
TEACHER_DEFAULT=/models/Qwen3-30B-A3B
NUM_GROUPS_DEFAULT=8
LAYOUT_8="1 1 8 1"   # GPUs -> "tp pp teacher_ep micro_batch", as planned above
LAYOUT_64="1 1 8 1"
source "$(dirname "${BASH_SOURCE[0]}")/lib/pipeline.sh"
run_pipeline
