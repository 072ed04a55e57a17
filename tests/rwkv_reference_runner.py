"""Run the reference ``rwkv`` package on a checkpoint (in its own process: it reads its
switches from the environment at import). Usage: runner MODEL.pth CHUNKS_JSON OUT.pt"""

import json
import sys

import torch


def main() -> None:
    model_path, chunks, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    from rwkv.model import RWKV

    name = model_path[: -len(".pth")] if model_path.endswith(".pth") else model_path
    model = RWKV(model=name, strategy="cpu fp32")
    state = None
    results = []
    for tokens in chunks:
        if len(tokens) == 1:
            logits, state = model.forward(tokens, state)
            logits = logits.view(1, -1)
        else:
            logits, state = model.forward(tokens, state, full_output=True)
        results.append(logits.detach().float().clone())
    torch.save(results, out)


if __name__ == "__main__":
    main()
