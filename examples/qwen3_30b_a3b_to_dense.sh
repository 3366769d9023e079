#!/usr/bin/env bash
# Qwen3-30B-A3B (48 layers, 128 experts, top-8) -> a 3.3 B dense Qwen3 (intermediate 8 x 768 = 6144), the paper's
# best configuration: DO-ACP (gld_reap), K = k = 8, uniform scaling. Needs the HF checkpoint on local disk.
# Memory: one decoder layer (~1.2 GB in bf16) plus the calibration activations, never the 61 GB model.
set -euo pipefail
MODEL=${MODEL:-/models/Qwen3-30B-A3B}
DATA=${DATA:-/data/fineweb-edu-sample.jsonl}   # .txt/.jsonl file or directory; or a HF datasets name when online
WORK=${WORK:-./runs/qwen3-30b}
mkdir -p "$WORK"

# 1. Routing statistics over 256 k tokens, with the all-token Gram the D-optimal kernel uses (every expert on
#    every token: ~16x the MoE compute of a forward pass, so run it on a GPU). Resumable if killed.
m2d calibrate --model "$MODEL" --data "$DATA" --tokens 262144 --seq-len 2048 --batch-size 4 \
  --gram --device cuda --dtype bfloat16 --out "$WORK/stats"

# 2. Look at the routing before choosing.
m2d inspect "$WORK/stats" --plot "$WORK/routing.png"

# 3. The dense student: standard Qwen3ForCausalLM, loads in transformers and vLLM as is.
m2d densify --model "$MODEL" --stats "$WORK/stats" --scoring gld_reap --select 8 --out "$WORK/dense-do-acp-k8"

# 4. A merged variant from the same statistics: keep 16 experts, merge pairs by output similarity.
m2d densify --model "$MODEL" --stats "$WORK/stats" --scoring selection_freq --select 16 --groups 8 \
  --grouping output_cluster --scaling proportional --out "$WORK/dense-sf-k16-oc"
