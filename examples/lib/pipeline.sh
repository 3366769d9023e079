# The paper's pipeline for one MoE teacher, shared by the per-model scripts in examples/ (source it; do not run it).
#
# calibrate -> densify (+ the D2D and random-FFN baselines at the same size) -> convert -> preprocess -> distill
# (every student from the same teacher on the same tokens) -> export -> eval, ending with one table.
#
# The model script sets NAME, TEACHER_DEFAULT, NUM_GROUPS_DEFAULT and LAYOUT_<gpus>="tp pp teacher_ep micro_batch"
# for the GPU counts it was planned for (`m2d plan`), then calls run_pipeline. Everything else is an environment
# variable, so CI runs the very same scripts on the fixture with tiny budgets (tests/test_examples.py):
#   TEACHER DENSE_TEACHER(D2D; unset: no D2D)  CALIB_DATA TRAIN_DATA EVAL_DATA EVAL_TASKS  WORK
#   GPUS NODES LAUNCH(torchrun|slurm)  TP PP TEACHER_EP MICRO_BATCH  SEQ_LEN GLOBAL_BATCH TRAIN_TOKENS SPLIT
#   LR MIN_LR WARMUP SAVE_EVERY PRECISION  CALIB_TOKENS CALIB_SEQ_LEN DEVICE DTYPE  SCORING SELECT NUM_GROUPS
#   STUDENTS (default "densified random-ffn d2d")  STAGES (default: all, in the order above)
# Each stage skips work whose output is already complete, so a rerun after a failure continues.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
M2D=${M2D:-m2d}

log() { echo "== $NAME: $*"; }
die() { echo "examples: error: $*" >&2; exit 2; }
wants() { [[ " ${STAGES} " == *" $1 "* ]]; }

setup() {
  TEACHER=${TEACHER:-$TEACHER_DEFAULT}
  WORK=${WORK:-runs/$NAME}
  NUM_GROUPS=${NUM_GROUPS:-$NUM_GROUPS_DEFAULT}
  SELECT=${SELECT:-$NUM_GROUPS}  # K experts kept per layer (K = k: pure pruning)
  SCORING=${SCORING:-gld_reap}  # DO-ACP, the paper's best
  CALIB_DATA=${CALIB_DATA:?set CALIB_DATA (a .txt/.jsonl file or directory, or a HF datasets name)}
  TRAIN_DATA=${TRAIN_DATA:?set TRAIN_DATA (.txt/.jsonl files or directories to distil on)}
  EVAL_DATA=${EVAL_DATA:-wikitext2}
  CALIB_TOKENS=${CALIB_TOKENS:-262144}
  CALIB_SEQ_LEN=${CALIB_SEQ_LEN:-2048}
  DEVICE=${DEVICE:-cuda}
  DTYPE=${DTYPE:-bfloat16}
  PRECISION=${PRECISION:-bf16}
  GPUS=${GPUS:-8}
  NODES=${NODES:-$(((GPUS + 7) / 8))}
  LAUNCH=${LAUNCH:-$([[ $NODES -gt 1 ]] && echo slurm || echo torchrun)}
  SEQ_LEN=${SEQ_LEN:-4096}
  GLOBAL_BATCH=${GLOBAL_BATCH:-128}
  TRAIN_TOKENS=${TRAIN_TOKENS:-4000000000}  # the paper's ~4 B tokens
  STEPS=$(((TRAIN_TOKENS + GLOBAL_BATCH * SEQ_LEN - 1) / (GLOBAL_BATCH * SEQ_LEN)))
  WARMUP=${WARMUP:-100}
  SAVE_EVERY=${SAVE_EVERY:-500}
  LR=${LR:-1e-4}
  MIN_LR=${MIN_LR:-1e-5}
  SPLIT=${SPLIT:-99,1,0}
  STUDENTS=${STUDENTS:-densified random-ffn d2d}
  STAGES=${STAGES:-calibrate densify baselines convert preprocess distill export eval}
  local planned="LAYOUT_$GPUS" tp pp ep mb
  read -r tp pp ep mb <<<"${!planned:-}"
  TP=${TP:-$tp}; PP=${PP:-$pp}; TEACHER_EP=${TEACHER_EP:-$ep}; MICRO_BATCH=${MICRO_BATCH:-$mb}
  [[ -n "$TP" && -n "$PP" && -n "$TEACHER_EP" && -n "$MICRO_BATCH" ]] ||
    die "no layout planned for $GPUS GPUs: set TP, PP, TEACHER_EP and MICRO_BATCH (m2d plan helps)"
  [[ -z "${DENSE_TEACHER:-}" ]] && STUDENTS=${STUDENTS//d2d/}
  mkdir -p "$WORK/students" "$WORK/megatron" "$WORK/data" "$WORK/runs"
}

stage_calibrate() {
  [[ -f $WORK/stats/meta.json ]] && return
  log "calibrate on $CALIB_TOKENS tokens (all-token Gram for DO-ACP; resumable)"
  $M2D calibrate --model "$TEACHER" --data "$CALIB_DATA" --tokens "$CALIB_TOKENS" --seq-len "$CALIB_SEQ_LEN" \
    --gram --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/stats"
}

stage_densify() {
  [[ -f $WORK/students/densified/config.json ]] && return
  log "densify: $SCORING, K=$SELECT experts kept, k=$NUM_GROUPS groups"
  $M2D densify --model "$TEACHER" --stats "$WORK/stats" --scoring "$SCORING" --select "$SELECT" --groups "$NUM_GROUPS" \
    --out "$WORK/students/densified"
}

stage_baselines() {
  if [[ ! -f $WORK/students/random-ffn/config.json ]]; then
    log "baseline: the teacher's attention with a random FFN of the same width"
    $M2D random-ffn --model "$TEACHER" --groups "$NUM_GROUPS" --out "$WORK/students/random-ffn"
  fi
  if [[ -n "${DENSE_TEACHER:-}" && ! -f $WORK/students/d2d/config.json ]]; then
    log "baseline: D2D, $DENSE_TEACHER's FFN pruned to the densified student's parameter count"
    $M2D d2d --model "$DENSE_TEACHER" --match "$WORK/students/densified" --data "$CALIB_DATA" \
      --tokens "$CALIB_TOKENS" --seq-len "$CALIB_SEQ_LEN" --device "$DEVICE" --dtype "$DTYPE" \
      --out "$WORK/students/d2d"
  fi
}

stage_convert() {
  local student
  if [[ ! -f $WORK/megatron/teacher/m2d_convert.json ]]; then
    log "convert the teacher to Megatron-Core (TP $TP, PP $PP, EP $TEACHER_EP; any layout loads it)"
    $M2D convert hf-to-megatron --model "$TEACHER" --out "$WORK/megatron/teacher" --tp "$TP" --pp "$PP" \
      --ep "$TEACHER_EP"
  fi
  for student in $STUDENTS; do
    [[ -f $WORK/megatron/$student/m2d_convert.json ]] && continue
    log "convert student $student"
    $M2D convert hf-to-megatron --model "$WORK/students/$student" --out "$WORK/megatron/$student" --tp "$TP" \
      --pp "$PP"
  done
}

stage_preprocess() {
  [[ -f $WORK/data/train.idx ]] && return
  log "tokenize the training text with the students' tokenizer (the teacher's)"
  # shellcheck disable=SC2086  # TRAIN_DATA may name several inputs
  $M2D preprocess --input $TRAIN_DATA --tokenizer "$WORK/students/densified" --out "$WORK/data/train"
}

yaml_float() {  # 1e-4 -> 1.000000e-04: YAML 1.1 (PyYAML) reads an exponent without a dot as a string
  awk -v x="$1" 'BEGIN { printf "%.6e", x }'
}

write_run_config() {  # student -> $WORK/runs/<student>.yaml, the one file both launchers read
  cat >"$WORK/runs/$1.yaml" <<EOF
# $NAME: distil $1 from the MoE teacher (written by examples/lib/pipeline.sh)
teacher: $WORK/megatron/teacher
student: $WORK/megatron/$1
data: [$WORK/data/train]
split: "$SPLIT"
out: $WORK/runs/$1
tp: $TP
pp: $PP
teacher_ep: $TEACHER_EP
micro_batch: $MICRO_BATCH
global_batch: $GLOBAL_BATCH
seq_len: $SEQ_LEN
steps: $STEPS
lr: $(yaml_float "$LR")
min_lr: $(yaml_float "$MIN_LR")
schedule: wsd
warmup: $WARMUP
save_every: $SAVE_EVERY
precision: $PRECISION
EOF
}

stage_distill() {
  local student
  for student in $STUDENTS; do
    [[ -f $WORK/runs/$student/model/config.json ]] && continue
    write_run_config "$student"
    log "distill $student: $STEPS steps of $GLOBAL_BATCH x $SEQ_LEN tokens on $GPUS GPUs ($LAUNCH)"
    if [[ $LAUNCH == slurm ]]; then  # --wait: the next stages need the result
      sbatch --wait --nodes "$NODES" --gpus-per-node "$((GPUS / NODES))" "$ROOT/launch/distill.slurm" \
        "$WORK/runs/$student.yaml"
    else
      NPROC=$GPUS "$ROOT/launch/torchrun.sh" "$WORK/runs/$student.yaml"
    fi
  done
}

stage_export() {
  local student
  for student in $STUDENTS; do  # the run exports its final student itself; this only checks it is there
    [[ -f $WORK/runs/$student/model/config.json ]] || die "$WORK/runs/$student/model is missing: did distill finish?"
  done
}

stage_eval() {
  local student table=$WORK/results.md
  log "evaluate"
  {
    echo "| model | held-out perplexity (${EVAL_DATA}) |"
    echo "|---|---|"
    echo "| teacher | $($M2D eval --model "$TEACHER" --data "$EVAL_DATA" | awk '{print $2}') |"
    for student in $STUDENTS; do
      echo "| $student, before | $($M2D eval --model "$WORK/students/$student" --data "$EVAL_DATA" | awk '{print $2}') |"
      echo "| $student, distilled | $($M2D eval --model "$WORK/runs/$student/model" --data "$EVAL_DATA" | awk '{print $2}') |"
    done
  } >"$table"
  if [[ -n "${EVAL_TASKS:-}" ]]; then
    for student in $STUDENTS; do
      $M2D eval --model "$WORK/runs/$student/model" --tasks "$EVAL_TASKS" | sed "s/^/$student: /" >>"$table"
    done
  fi
  cat "$table"
}

run_pipeline() {
  set -euo pipefail
  setup
  local stage
  for stage in calibrate densify baselines convert preprocess distill export eval; do
    if wants "$stage"; then "stage_$stage"; fi
  done
}
