#!/usr/bin/env bash
# The GPU paths of ESA runner, checked by one script on one GPU (at most 8 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh [--cpu-only] [--model M] [OUT_DIR]
#
# OUT_DIR defaults to $OUT (the device machine's output folder), else outputs/gpu_check_<time>.
# Everything is written under it: each run's out-dir, logs/<run>.log and .rc, summary.json.
# On the embedded model and the bundled corpus it checks (correctness first, timings last):
#   1  benchmarks/bench_sensitivity.py on cuda: ratios + CUDA peak memory (fp32; bf16 for grad_x_weight, act_mag)
#   2  the same ESA command on cuda fp32, cuda bf16 and cpu fp32: Top-K Jaccard per seed, perplexity rel. diff.
#   3  --device-map auto --offload with a small GPU budget (ESA_GPU_BUDGET_BYTES): some blocks run on the
#      CPU, and the scores must match the plain cuda fp32 run (same Top-K, scores within rel 1e-5)
#   4  scripts/find_super_weights.py in bf16 on cuda finds the same candidates as on cpu fp32
#   5  --metric grad_x_weight,act_mag,obs,taylor2 on cuda bf16 vs cpu fp32: Top-K Jaccard per metric
#   6  --quantize rtn --bits 8 on cuda bf16: every condition within 0.5 % of the unquantized model;
#      --bits 4 on cuda bf16 vs cpu fp32: each condition's perplexity ratio
#   7  a cuda fp32 run SIGKILLed during its evaluations, then --resume'd: equal to check 2's uninterrupted run
#   8  torchrun --nproc_per_node 1 (nccl), plain and --shard fsdp: equal to the plain cuda fp32 run
#   9  --eval-tasks (arc_easy, a few items) on cuda bf16 vs cpu fp32: accuracy per condition
#  10  the activations evaluator (same runs as 9): per-layer max |h| and the massive activations
# The table gives per check what was compared, the tolerance, and each run's peak memory (CUDA, else RSS).
# The cpu fp32 reference runs go in the background beside the device runs (on a GPU the machine's cores
# are otherwise idle), and the benchmarks start once both are done.
# --cpu-only (CI's smoke mode): every cuda step runs on the cpu in fp32 with tiny sizes, the bf16
# steps of checks 1-2 are skipped, torchrun uses gloo, and every comparison must then be exact; unless
# --model is given, every run but the detector's (which needs the real model's outliers) uses a tiny
# random Llama with the real tokenizer (the tests' tiny_model_dir), so the whole list fits CI.  The
# comparisons and the table are benchmarks/gpu_check_report.py (checks 5-10: gpu_check_paths.py); the
# exit status is non-zero if any check fails.
# PYTHON=... chooses the interpreter (default: the repository's .venv/bin/python, else python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu MODEL=smollm2-135m MODEL_GIVEN="" OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) MODE=cpu-only ;;
    --model) MODEL="$2" MODEL_GIVEN=1; shift ;;
    -h|--help) sed -n '2,/^# PYTHON=/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-${OUT:-outputs/gpu_check_$(date +%Y%m%d_%H%M%S)}}"
mkdir -p "$OUTDIR/logs" "$OUTDIR/tmp" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO" || exit 2

PY="${PYTHON:-}"
[ -n "$PY" ] || { [ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"; } || PY=python3
CORPUS="$REPO/esa/resources/sample_corpus.txt"

# offline, and nothing written outside OUTDIR: temp files, matplotlib's cache, no bytecode
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export TMPDIR="$OUTDIR/tmp" MPLCONFIGDIR="$OUTDIR/tmp/matplotlib"
# the embedded model's converted copy: read from the usual cache if it is there, else converted into OUTDIR
# (and removed at the end: it is the whole model)
OWN_CACHE=""
if [ ! -f "${ESA_CACHE_DIR:-$HOME/.cache/esa}/smollm2-135m-instruct/config.json" ]; then
  export ESA_CACHE_DIR="$OUTDIR/esa_cache" && OWN_CACHE="$ESA_CACHE_DIR"
fi

if [ "$MODE" = cpu-only ]; then
  DEV=cpu DEV_DTYPE=fp32 BUDGET_S=100000 TASKS_LIMIT=2
  # one torch thread: on a small shared machine (CI) spinning worker threads are 10-100x slower when a
  # neighbour is busy, and the tiny sizes gain little from a second thread
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  ESA_SIZES=(--max-length 32 --max-samples 4 --eval-samples 2 --batch-size 2 --topk 20)
  # checks 5, 6, 9, 10: one seed, two calibration windows, one evaluation window
  PATH_SIZES=(--max-length 32 --max-samples 2 --eval-samples 1 --batch-size 2 --topk 20 --seeds 0)
  BENCH_SIZES=(--tokens 32 --max-length 32 --batch-size 1 --repeats 1 --metrics grad_x_weight,act_mag
               --perturb-ks 1,100 --no-seeds-memory)
  SW_SIZES=(--eval-samples 2 --max-length 32)
  SW_DTYPE=fp32
else
  DEV=cuda DEV_DTYPE=bf16 BUDGET_S=470 TASKS_LIMIT=20  # 8 minutes, less the report
  ESA_SIZES=(--max-length 128 --max-samples 16 --eval-samples 8 --batch-size 4 --topk 100)
  PATH_SIZES=(--max-length 128 --max-samples 8 --eval-samples 4 --batch-size 4 --topk 100 --seeds 0)
  BENCH_SIZES=(--tokens 2048 --max-length 256 --batch-size 4 --repeats 3 --hutchinson-samples 4)
  SW_SIZES=(--eval-samples 8 --max-length 256)
  SW_DTYPE=bf16
fi
# check 3's GPU weight budget (set ESA_GPU_BUDGET_BYTES to override it, e.g. for another --model): for the
# fp32 SmolLM2-135M, 300 MB put the embeddings and blocks 0-11 on the GPU and blocks 12-29 on the CPU
GPU_BUDGET="${ESA_GPU_BUDGET_BYTES:-300000000}"

# run NAME LIMIT_S CMD...: logs/NAME.log, logs/NAME.rc (the exit status, 124 = timed out)
run() {
  local name="$1" limit="$2" left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ "$left" -lt 15 ]; then
    echo "not run: the time budget was spent" >"$OUTDIR/logs/$name.rc"
    printf '  %-14s not run (time budget spent)\n' "$name"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  # in a subshell: the shell's own "Killed" line of check 7's SIGKILLed run goes to the log, not the table
  ( timeout "$limit" "$@"; exit $? ) >"$OUTDIR/logs/$name.log" 2>&1
  rc=$?
  echo "$rc" >"$OUTDIR/logs/$name.rc"
  printf '  %-14s exit %-3s %4d s\n' "$name" "$rc" $((SECONDS - t0))
}

# the cpu fp32 references of checks 2, 4, 5, 6b, 9, 10
cpu_references() {
  run esa_cpu_fp32 120 "${ESA[@]}" --device cpu --dtype fp32 --out-dir "$OUTDIR/esa_cpu_fp32"
  run multi_cpu_fp32 150 "${MULTI[@]}" --device cpu --dtype fp32 --out-dir "$OUTDIR/multi_cpu_fp32"
  run quant4_cpu_fp32 120 "${QUANT[@]}" --bits 4 --device cpu --dtype fp32 --out-dir "$OUTDIR/quant4_cpu_fp32"
  run evals_cpu_fp32 120 "${EVALS[@]}" --device cpu --dtype fp32 --out-dir "$OUTDIR/evals_cpu_fp32"
  run sw_cpu_fp32 90 "${SW[@]}" --device cpu --dtype fp32 --out-dir "$OUTDIR/sw_cpu_fp32"
}

echo "gpu_check ($MODE) of $MODEL into $OUTDIR"
if [ -n "$OWN_CACHE" ]; then  # the embedded model's one-time conversion, before two runs at once could both start it
  "$PY" -c "import sys; from esa.model.loading import prepare_source; prepare_source(sys.argv[1])" "$MODEL" || exit 2
fi
RUN_MODEL="$MODEL"  # the model of every run but the detector's
if [ "$MODE" = cpu-only ] && [ -z "$MODEL_GIVEN" ]; then
  RUN_MODEL="$OUTDIR/tiny_model"
  # the tests' tiny Llama (tests/realmodels.py: 2 blocks of width 16, seeded, the real tokenizer)
  "$PY" -c "import sys; from pathlib import Path; from tests.realmodels import tiny_model_dir
tiny_model_dir(Path(sys.argv[1]))" "$RUN_MODEL" >"$OUTDIR/logs/tiny_model.log" 2>&1 || {
    echo "gpu_check.sh: could not write the tiny model (see $OUTDIR/logs/tiny_model.log)" >&2; exit 2; }
fi
BASE=("$PY" esa_runner.py --model "$RUN_MODEL" --data-file "$CORPUS" --mode global)
ESA=("${BASE[@]}" --metric grad_x_weight --perturb zero --seeds 0,1 "${ESA_SIZES[@]}")
MULTI=("${BASE[@]}" --metric grad_x_weight,act_mag,obs,taylor2 --perturb zero "${PATH_SIZES[@]}")
QUANT=("${BASE[@]}" --metric grad_x_weight --quantize rtn "${PATH_SIZES[@]}")
EVALS=("${BASE[@]}" --metric magnitude --perturb zero --controls none --evaluate perplexity,activations
       --eval-tasks arc_easy --tasks-limit "$TASKS_LIMIT" "${PATH_SIZES[@]}")
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
BENCH=("$PY" benchmarks/bench_sensitivity.py --model "$RUN_MODEL" --data-file "$CORPUS" "${BENCH_SIZES[@]}")
SW=("$PY" scripts/find_super_weights.py --model "$MODEL" --data-file "$CORPUS" "${SW_SIZES[@]}")

# the correctness runs first, the benchmark last: if the time budget runs out, timings are what is lost.
# The cpu references run beside the device runs: on a GPU on half the cores (the cuda runs' own CPU work
# keeps the rest); in cpu-only mode as a second single-threaded stream (most of each run is its imports)
if [ "$MODE" = gpu ]; then REF_THREADS="${CPU_REF_THREADS:-$(( $(nproc) / 2 ))}"; else REF_THREADS=1; fi
( export OMP_NUM_THREADS="$REF_THREADS"; cpu_references ) &
REFS=$!
run esa_dev_fp32 120 "${ESA[@]}" --device "$DEV" --dtype fp32 --out-dir "$OUTDIR/esa_dev_fp32"
[ "$MODE" = gpu ] && run esa_dev_bf16 90 "${ESA[@]}" --device cuda --dtype bf16 --out-dir "$OUTDIR/esa_dev_bf16"
run esa_offload 120 env ESA_GPU_BUDGET_BYTES="$GPU_BUDGET" "${ESA[@]}" --device "$DEV" --dtype fp32 \
  --device-map auto --offload --out-dir "$OUTDIR/esa_offload"
run multi_dev 120 "${MULTI[@]}" --device "$DEV" --dtype "$DEV_DTYPE" --out-dir "$OUTDIR/multi_dev"
run quant8_dev 90 "${QUANT[@]}" --bits 8 --device "$DEV" --dtype "$DEV_DTYPE" --out-dir "$OUTDIR/quant8_dev"
run quant4_dev 90 "${QUANT[@]}" --bits 4 --device "$DEV" --dtype "$DEV_DTYPE" --out-dir "$OUTDIR/quant4_dev"
# killed by SIGKILL at its third evaluation (exit 137), then resumed into the same out-dir
run resume_killed 120 env ESA_FAULT=condition:3 "${ESA[@]}" --device "$DEV" --dtype fp32 \
  --out-dir "$OUTDIR/resume_dev"
run resume_dev 120 "${ESA[@]}" --device "$DEV" --dtype fp32 --out-dir "$OUTDIR/resume_dev" \
  --resume "$OUTDIR/resume_dev"
run torchrun_dev 120 "${TORCHRUN[@]}" "${ESA[@]:1}" --device "$DEV" --dtype fp32 --out-dir "$OUTDIR/torchrun_dev"
run fsdp_dev 120 "${TORCHRUN[@]}" "${ESA[@]:1}" --device "$DEV" --dtype fp32 --shard fsdp \
  --out-dir "$OUTDIR/fsdp_dev"
run evals_dev 120 "${EVALS[@]}" --device "$DEV" --dtype "$DEV_DTYPE" --out-dir "$OUTDIR/evals_dev"
run sw_dev 90 "${SW[@]}" --device "$DEV" --dtype "$SW_DTYPE" --out-dir "$OUTDIR/sw_dev"
wait "$REFS"
mkdir -p "$OUTDIR/bench_fp32"
run bench_fp32 240 "${BENCH[@]}" --device "$DEV" --dtype fp32 --json "$OUTDIR/bench_fp32/bench.json"
if [ "$MODE" = gpu ]; then
  mkdir -p "$OUTDIR/bench_bf16"
  run bench_bf16 90 "${BENCH[@]}" --device cuda --dtype bf16 --metrics grad_x_weight,act_mag --no-seeds-memory \
    --json "$OUTDIR/bench_bf16/bench.json"
fi

[ -n "$OWN_CACHE" ] && rm -rf "$OWN_CACHE"
rm -rf "$OUTDIR/tiny_model"
rm -rf "$OUTDIR/tmp"
echo
"$PY" benchmarks/gpu_check_report.py "$OUTDIR" --mode "$MODE" --wall-seconds "$SECONDS"
