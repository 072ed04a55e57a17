#!/usr/bin/env bash
# The same 0.1B config on 1 GPU (grad_accum 2) and on 2 GPUs (DDP, then FSDP), at the same
# global batch (2 x 8 x 512 tokens): the loss curves must agree within bf16 noise.
# Usage (on a 2-GPU machine, repo root, data/tinystories.tokens prepared):
#   bash benchmarks/multi_gpu_check.sh OUTDIR
set -u
out=${1:-runs/multi_gpu}
mkdir -p "$out"
common=(examples/train_0.1b.toml --data data/tinystories.tokens --steps "${STEPS:-40}" --no-progress
        --set log.tensorboard=false --set eval.eval_every=0 --set checkpoint.save_every=0
        --set log.log_every=5 --set log.plot=false --set data.micro_batch=8)
run() {  # name, launcher..., extra args
  local name=$1; shift
  echo "== $name"
  timeout "${RUN_TIMEOUT:-170}" "$@" --out "/tmp/mg_$name" 2>&1 | tail -n 3
  cp "/tmp/mg_$name/metrics.jsonl" "$out/$name.jsonl" 2>/dev/null || echo "no metrics for $name"
}
run gpu1_accum2 python3 -m rwkvkit train "${common[@]}" --set data.grad_accum=2
run gpu2_ddp python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m rwkvkit train "${common[@]}" --set data.grad_accum=1
run gpu2_fsdp python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m rwkvkit train "${common[@]}" --set data.grad_accum=1 --set train.distributed=fsdp
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {}
for f in sorted(out.glob("*.jsonl")):
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    runs[f.stem] = {r["step"]: r for r in recs if r.get("type") == "train"}
names = list(runs)
print("step " + " ".join(f"{n:>14}" for n in names))
for step in sorted(set.intersection(*(set(r) for r in runs.values())) if runs else []):
    if step % 5 == 0 or step == 1:
        print(f"{step:4d} " + " ".join(f"{runs[n][step]['loss']:14.4f}" for n in names))
for n in names:
    tps = [r["tokens_per_s"] for s, r in runs[n].items() if s > 10]
    print(f"{n}: median tokens/s after step 10: {sorted(tps)[len(tps)//2]:,.0f}" if tps else f"{n}: no rate")
PY
