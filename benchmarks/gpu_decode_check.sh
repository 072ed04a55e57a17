#!/usr/bin/env bash
# CUDA-graph decoding on a GPU in one command, from the repository root:
#
#   bash benchmarks/gpu_decode_check.sh             # tests, then the L12 D768 table (~4 min)
#   LARGE=1 bash benchmarks/gpu_decode_check.sh     # and an L24 D2048 table (~3 min more)
#
# 1. tests/test_cuda_graphs.py: replayed steps equal eager model.step_ (logits and state,
#    bitwise; RWKV-5/6/7, batch 1 and 3, bf16), generation gives the same tokens with and
#    without graphs (batch 1, a batch that shrinks from 5 rows to 1), stale graphs recaptured.
#    The fused RWKV-7 time-mix step (the default on CUDA) against the PyTorch ops and inside
#    a model's step_. The WKV-6 decoding kernel (the default; RWKVKIT_WKV6_RECURRENT=0 turns it off) against the
#    reference and in RWKV-5.2 / RWKV-6 decoding.
# 2. benchmarks/bench_inference.py --device cuda: decode at batch 1 through the CUDA graph (also
#    without the fused step, bf16: RWKVKIT_FUSED_STEP=0) and eagerly against the rwkv package (cuda fp16, RWKV_CUDA_ON=1:
#    its kernel builds at import),
#    decode at batch 1..256 against the bandwidth bound, prefill against the matmul ceiling.
#
# Needs pytest and the rwkv package importable (e.g. from wheels:
# python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl;
# export PYTHONPATH=/tmp/site). JSON results go to $OUT_DIR (default runs/gpu_decode).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT_DIR:-runs/gpu_decode}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('#', torch.cuda.get_device_name(), 'torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
python3 -m pytest -q -p no:cacheprovider tests/test_triton_wkv7.py -k "timemix or fused"  # the fused time-mix step
python3 -m pytest -q -p no:cacheprovider tests/test_triton_wkv6_recurrent.py  # the WKV-6 decoding kernel
python3 benchmarks/bench_inference.py --device cuda --out "$out/bench_inference_L12_D768.json"
if [ "${LARGE:-0}" = 1 ]; then
  python3 benchmarks/bench_inference.py --device cuda --layers 24 --width 2048 --out "$out/bench_inference_L24_D2048.json"
fi
