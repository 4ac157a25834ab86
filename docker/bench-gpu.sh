#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, reproduced on one CUDA node (16 cores). No Ray needed: the labeling
# work unit runs in-process. Usage: bash docker/bench-gpu.sh [OUT_DIR]   (each step has its own time limit,
# in priority order, so a slow step cannot take the others' figures with it).
# Knobs (env): SHARDS (28) PER_SHARD (143) VIEWS (8) TRAIN_SECONDS (20) WORKERS (14) BATCH (128) PY (python3)
# FWD_BATCHES (40: batches per bare-forward figure), STEPS (all: a subset of the step names below, e.g.
# STEPS="shards generate_small train_small"; later steps read DATA, so a second call on the same machine can
# run the rest), CUDA_TESTS (the test files of the cuda_tests step), TRAIN_EXTRA (more `stl-train bench` options,
# e.g. "--compile-mode reduce-overhead" for the student step as CUDA graphs). The whole script takes about 12 minutes.
# Shards are the unit of work of the student loader's workers: the training step reads the largest multiple of
# WORKERS shards (all 28 = 2 per worker by default), so every worker is busy until the epoch ends together.
set -uo pipefail
# Why torch.compile compiled again, if it does, and what its CUDA graph trees recorded, re-recorded or skipped
# (and why), in each step's output.
export TORCH_LOGS=${TORCH_LOGS-recompiles,cudagraphs}
out=${1:-bench_out}; mkdir -p "$out"
PY=${PY:-python3}; SHARDS=${SHARDS:-28}; PER_SHARD=${PER_SHARD:-143}; VIEWS=${VIEWS:-8}
TRAIN_SECONDS=${TRAIN_SECONDS:-20}; WORKERS=${WORKERS:-14}; BATCH=${BATCH:-128}; DATA=${DATA:-/tmp/stl-bench}
TINY=${TINY:-fan_tiny_8_p4_hybrid_token}; SMALL=${SMALL:-fan_small_12_p4_hybrid_token}; LARGE=${LARGE:-fan_large_16_p4_hybrid_token}
FWD_BATCHES=${FWD_BATCHES:-40}; STEPS=${STEPS:-shards generate_small train_small cuda_tests generate_tiny depthwise generate_large jpeg}
CUDA_TESTS=${CUDA_TESTS:-tests/test_render_batch.py tests/test_photometric_torch.py tests/test_photometric_graph.py tests/test_hot_loop_sync.py tests/test_optim.py tests/test_to_device.py tests/test_source_footprint.py::test_cuda_regions_within_the_render_bound_of_whole_images tests/test_work_unit_cuda.py tests/test_cuda_graph.py tests/test_stage_clock.py tests/test_step_timing.py tests/test_flat_images.py tests/test_checkpoint_writer.py tests/test_bench_report.py tests/test_fan_models.py}
EXTRA=${EXTRA:-}   # e.g. "--input-size 64 --device cpu" for a CPU dry run (JPEG_EXTRA="--device cpu --limit 16"
                   # keeps the jpeg step, a FAN-S forward at 224 px, inside its limit on a 2-core CPU; DEPTHWISE_EXTRA
                   # likewise, e.g. "--device cpu --model fan_test_p4_hybrid_token --input-size 32 --batches 1")
last=$(printf '%06d' $((SHARDS - 1)))
all="$DATA/bench-{000000..$last}.tar"
train_shards=$SHARDS  # fewer shards than workers (or WORKERS=0): all of them
if [ "$WORKERS" -gt 0 ] && [ "$SHARDS" -ge "$WORKERS" ]; then train_shards=$(( SHARDS / WORKERS * WORKERS )); fi
[ "$train_shards" -eq "$SHARDS" ] || echo "training bench: $train_shards of $SHARDS shards (a multiple of WORKERS=$WORKERS)"
train_all="$DATA/bench-{000000..$(printf '%06d' $((train_shards - 1)))}.tar"
failed=()
step() {  # step NAME LIMIT_S CMD...: run, log to OUT/NAME.txt, never abort the script (failures are listed at the end)
  local name=$1 limit=$2 rc; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac  # not asked for in STEPS
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" > "$out/$name.txt" 2>&1; rc=$?; echo "exit $rc" >> "$out/$name.txt"
  case $rc in
    0) ;;
    124) failed+=("$name (exit 124: past its ${limit}s limit)") ;;
    137) failed+=("$name (exit 137: killed, past its limit + 5 s or out of memory)") ;;
    *) failed+=("$name (exit $rc)") ;;
  esac
  tail -n 25 "$out/$name.txt"
}
labels=("$PY" -m pipelines.cli_labels); train=("$PY" -m pipelines.cli_train)  # arrays: `timeout` runs programs, not functions
nvidia-smi -L 2>/dev/null; $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
if [ -f "$DATA/bench-$last.tar" ]; then echo "=== shards: already in $DATA (a second call on the same machine)"
else step shards 35 "${labels[@]}" bench shards "$DATA" --shards "$SHARDS" --per-shard "$PER_SHARD"; fi
gen=(bench generate --shards "$all" --views "$VIEWS" --batch-size 256 --amp bf16 --forward-batches "$FWD_BATCHES")
# Two passes per labeling bench (the default): the second is measured, the first pays the one-off costs.
step generate_small 210 "${labels[@]}" "${gen[@]}" --model "$SMALL" --keep-store "$DATA/labels.zarr" --profile-batches 3 $EXTRA
step train_small 320 "${train[@]}" bench --shards "$train_all" --labels "$DATA/labels.zarr" --labeler bench --model "$SMALL" --batch-size "$BATCH" --amp bf16 ${COMPILE---compile} --workers "$WORKERS" --seconds "$TRAIN_SECONDS" --warmup 10 --steps 20 --repeats 1 --profile-steps 5 ${TRAIN_EXTRA:-}
step cuda_tests 200 $PY -m pytest -q -s -p no:cacheprovider $CUDA_TESTS
step generate_tiny 130 "${labels[@]}" "${gen[@]}" --model "$TINY" $EXTRA
step depthwise 120 "${labels[@]}" bench depthwise --model "$SMALL" --batch-size 256 --batches 20 --amp bf16 ${DEPTHWISE_EXTRA:-}
step generate_large 150 "${labels[@]}" "${gen[@]}" --model "$LARGE" $EXTRA
step jpeg 30 "${labels[@]}" bench jpeg --shards "$all" --model "$SMALL" --limit 256 ${JPEG_EXTRA:-}
# The figures the docs record, one table (from the step outputs above).
echo "=== summary"
for g in generate_tiny generate_small generate_large; do
  f="$out/$g.txt"; [ -f "$f" ] || continue
  printf '%-15s %s | %s | %s | %s | %s\n' "$g" "$(grep -m1 '^pipeline ' "$f" | awk '{print $2, "views/s"}')" \
    "decode alone $(grep -m1 '^decode workers alone' "$f" | awk '{print $4}')" \
    "compiled $(grep -m1 '^bare forward compiled' "$f" | awk '{print $4}')" \
    "graphed $(grep -m1 '^graphed forward' "$f" | awk '{print $5}')" "$(grep -m1 '^pipeline / ' "$f")"
  grep -E -m7 '^(pipeline, steady|render alone|render \+ forward|render ∥ forward|pipeline / device ceiling|device loop:)' "$f" | sed 's/^/                /'
  grep -A7 -m1 '^pipeline, pass 1 of' "$f" | sed 's/^/                /'  # the first (cold) pass: its one-off costs
  grep -E -m2 '^(device loop host work|allocator calls during)' "$f" | sed 's/^/                /'
  grep -E -m3 '^(torch.compile during|  render |  copy )' "$f" | sed 's/^/                /'
  grep -A8 -m1 '^device loop thread, where' "$f" | sed 's/^/                /'
  grep -A 24 -m1 '^profile of' "$f" | grep -E 'Name|^ *[a-zA-Z_].*[0-9]+\.[0-9]+(us|ms|s) ' | head -16  # top kernels
done
[ -f "$out/depthwise.txt" ] && grep -A4 -m1 '^FAN depthwise' "$out/depthwise.txt"
f="$out/train_small.txt"
if [ -f "$f" ]; then  # the table, or (a run cut by its limit) the figures it printed as it measured them
  if grep -q '^  ratio ' "$f"; then grep -v '^measured:' "$f" | grep -iE "end to end|step only|ratio|loader|timm|bytes|compile|photometric ops|host ms|phase, variant|^  \([abc]\)" | head -56
  else grep '^measured:' "$f"; fi
  grep -A 24 -m1 'measured: profile of' "$f" | grep -E 'Name|^ *[a-zA-Z_].*[0-9]+\.[0-9]+(us|ms|s) ' | head -16  # the top kernels
  grep -A10 -m1 'the loop thread in' "$f"
fi
for g in generate_tiny generate_small generate_large; do  # steps cut by their limit: what they measured
  f="$out/$g.txt"; [ -f "$f" ] && ! grep -q '^pipeline ' "$f" && grep '^measured:' "$f" | sed "s/^/$g /"
done
# The script's status says whether every step passed, whatever the summary's last grep returned.
if [ ${#failed[@]} -gt 0 ]; then printf 'step failed: %s\n' "${failed[@]}"; exit 1; fi
echo "all steps passed"
