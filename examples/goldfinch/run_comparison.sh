#!/usr/bin/env bash
# Train the four comparison models (llama, finch, finch_c2, goldfinch) side by side on one GPU,
# each resuming from its latest checkpoint if one exists, then print the comparison table.
#   bash examples/goldfinch/run_comparison.sh [extra `rwkvkit train` arguments, e.g. --stop-at 500]
#   NAMES="finch goldfinch" bash examples/goldfinch/run_comparison.sh     # a subset
set -u
cd "$(dirname "$0")/../.."
RWKVKIT="${RWKVKIT:-python3 -m rwkvkit}"
mkdir -p runs/goldfinch_comparison
pids=()
for name in ${NAMES:-llama finch finch_c2 goldfinch}; do
    out="runs/goldfinch_comparison/$name"
    resume=()
    [ -e "$out/checkpoints/latest" ] && resume=(--resume)
    $RWKVKIT train "examples/goldfinch/$name.toml" --no-progress --set checkpoint.save_every=100 "${resume[@]}" "$@" \
        > "runs/goldfinch_comparison/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python3 examples/goldfinch/compare.py runs/goldfinch_comparison
exit $status
