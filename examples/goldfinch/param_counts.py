"""Parameter counts of the four comparison configs (llama, finch, finch_c2, goldfinch).

    python examples/goldfinch/param_counts.py            # a table
    python examples/goldfinch/param_counts.py --json     # the same as JSON

Non-embedding parameters (everything but ``emb`` and ``head``) must agree within 5%
(tests/test_goldfinch_examples.py); the configs match them through the channel-mix / FFN
width. The models are built on the "meta" device: nothing is allocated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rwkvkit.config import ModelConfig
from rwkvkit.models import model_class
from rwkvkit.train.config import load_config

HERE = Path(__file__).resolve().parent
CONFIGS = ("llama", "finch", "finch_c2", "goldfinch")


def param_counts(directory: Path = HERE) -> dict[str, dict]:
    """{config name: {arch, n_layer, n_embd, ffn_dim, total, embedding, non_embedding}}."""
    out = {}
    for name in CONFIGS:
        cfg = load_config(directory / f"{name}.toml")
        if not cfg.vocab_size:
            raise SystemExit(f"{name}.toml: give model.vocab_size (the data file is not read here)")
        with torch.device("meta"):
            model = model_class(cfg.arch)(ModelConfig(**cfg.model_config_dict(cfg.vocab_size)))
        total = model.num_parameters()
        embedding = model.emb.weight.numel() + model.head.weight.numel()
        out[name] = {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "ffn_dim": model.config.ffn_dim,
                     "total": total, "embedding": embedding, "non_embedding": total - embedding}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    counts = param_counts()
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    low = min(c["non_embedding"] for c in counts.values())
    print(f"{'config':<10} {'arch':<10} {'L':>3} {'C':>4} {'ffn':>5} {'total':>12} {'emb+head':>11} "
          f"{'non-embedding':>14} {'vs smallest':>12}")
    for name, c in counts.items():
        print(f"{name:<10} {c['arch']:<10} {c['n_layer']:>3} {c['n_embd']:>4} {c['ffn_dim']:>5} {c['total']:>12,} "
              f"{c['embedding']:>11,} {c['non_embedding']:>14,} {c['non_embedding'] / low:>11.3f}x")


if __name__ == "__main__":
    main()
