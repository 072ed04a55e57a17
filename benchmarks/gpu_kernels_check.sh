#!/usr/bin/env bash
# The WKV kernels against fla 0.6.0 on a GPU, a step per device call (each fits in 10 minutes
# once fla's autotuning is cached), from the repository root:
#
#   STEP=tests bash benchmarks/gpu_kernels_check.sh   # tests/test_triton_wkv{7,6,6_recurrent}.py
#   STEP=wkv7  bash benchmarks/gpu_kernels_check.sh   # bench_wkv.py --op wkv7 (ours, fla, fla-layer)
#   STEP=wkv6  bash benchmarks/gpu_kernels_check.sh   # bench_wkv.py --op wkv6 (ours, fla)
#   STEP=train bash benchmarks/gpu_kernels_check.sh   # bench_train_step.py (ours, fla, chunked)
#   STEP=sweep SWEEP_ONLY=scan_block_v bash benchmarks/gpu_kernels_check.sh   # bench_wkv.py --sweep rows
#
# fla autotunes every kernel at every new shape and, at B=8, T=4096, H=32, that alone can take
# longer than one call. Triton keeps each tuned kernel's choice as <TRITON_CACHE_DIR>/<hash>/
# <kernel>.autotune.json (the hash covers Triton, the GPU target, the source and the key, not the
# machine), so this script points TRITON_CACHE_DIR at runs/triton_cache (git-ignored: carry it
# to the device) and packs the JSON files into $OUT_DIR/fla_autotune.tgz after each step; unpack
# that archive into runs/triton_cache before the next call (tar xzf ... -C runs/triton_cache). A step cut off while tuning keeps
# what it tuned. Results (JSON) go to $OUT_DIR (default runs/gpu_kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/runs/triton_cache}"
out=${OUT_DIR:-runs/gpu_kernels}
mkdir -p "$out" "$TRITON_CACHE_DIR"
budget=${BUDGET_S:-540}  # seconds for the step's main command
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('#', torch.cuda.get_device_name(), 'torch', torch.__version__)"
case "${STEP:-}" in
  tests) timeout "$budget" python3 -m pytest -q -n "${WORKERS:-16}" -p no:cacheprovider -p no:benchmark --tb=line \
           tests/test_triton_wkv7.py tests/test_triton_wkv6.py tests/test_triton_wkv6_recurrent.py 2>&1 | tail -25 ;;
  wkv7)  timeout "$budget" python3 benchmarks/bench_wkv.py --op wkv7 --out "$out/bench_wkv7.json" 2>&1 | tail -30 ;;
  wkv6)  timeout "$budget" python3 benchmarks/bench_wkv.py --op wkv6 --out "$out/bench_wkv6.json" 2>&1 | tail -30 ;;
  train) timeout "$budget" python3 benchmarks/bench_train_step.py --out "$out/train_step.json" 2>&1 | tail -20 ;;
  sweep) timeout "$budget" python3 benchmarks/bench_wkv.py --op "${OP:-wkv7}" --sweep --sweep-only "${SWEEP_ONLY:-}" \
           --out "$out/sweep_${OP:-wkv7}.json" 2>&1 | grep -v '^   {' | tail -20 ;;
  *) echo "STEP must be tests, wkv7, wkv6, train or sweep" >&2; exit 2 ;;
esac
# (paths relative to the cache: unpack with tar xzf fla_autotune.tgz -C runs/triton_cache)
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf - -T -) > "$out/fla_autotune.tgz"
echo "# $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune files packed into $out/fla_autotune.tgz"
