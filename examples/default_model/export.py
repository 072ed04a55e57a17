"""Turn the default model's training run into the bundled model: the latest checkpoint in
bfloat16 (model.safetensors + config.json + vocabulary).

    python examples/default_model/export.py runs/default_model src/rwkvkit/assets/default_model
"""

import sys
from pathlib import Path

import torch

from rwkvkit import load_model
from rwkvkit.train.checkpointing import latest_checkpoint

run, out = Path(sys.argv[1]), Path(sys.argv[2])
model = load_model(latest_checkpoint(run / "checkpoints"), dtype=torch.bfloat16)
model.save(out)
size = (out / "model.safetensors").stat().st_size
print(f"{model.num_parameters():,} parameters, {size / 2**20:.1f} MiB -> {out}")
