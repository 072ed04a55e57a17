"""Table and plot of the four-way comparison from the runs' metrics.jsonl files.

    python examples/goldfinch/compare.py runs/goldfinch_comparison [--plot docs/goldfinch_comparison.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

NAMES = ["llama", "finch", "finch_c2", "goldfinch"]
PAPER = {"llama": 2.7125, "finch": 2.7191, "finch_c2": 2.7082, "goldfinch": 2.6582}  # 12-layer ablation, minipile


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path)
    p.add_argument("--plot", type=Path, help="write the validation curves here (PNG)")
    p.add_argument("--json", type=Path, help="write the table as JSON here")
    args = p.parse_args(argv)
    rows = {}
    for name in NAMES:
        recs = read(args.runs / name / "metrics.jsonl")
        evals = [r for r in recs if r.get("type") == "eval"]
        train = [r for r in recs if r.get("type") == "train"]
        if not evals:
            continue
        tps = [r["tokens_per_s"] for r in train[len(train) // 5 :] if "tokens_per_s" in r]
        rows[name] = {
            "step": evals[-1]["step"], "tokens": evals[-1]["tokens"], "val_loss": evals[-1]["val_loss"],
            "best_val_loss": min(r["val_loss"] for r in evals),
            "tokens_per_s": statistics.median(tps) if tps else None,
            "curve": [(r["step"], r["val_loss"]) for r in evals],
        }
    if not rows:
        print(f"compare: no eval records under {args.runs}", file=sys.stderr)
        return 1
    print(f"| model | steps | tokens | final val loss | tokens/s | paper (minipile, L12) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        print(f"| {name} | {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {tps} | {PAPER[name]} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in rows.items():
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, marker="o", ms=3, label=f"{name} ({r['val_loss']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title("GoldFinch comparison: same recipe, data and tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
