"""Run the reference ``rwkv`` package on a checkpoint (in its own process: it reads its
switches from the environment at import).

Usage: runner MODEL.pth CHUNKS_JSON OUT.pt [WKV_STATES.pt]

Feeds the token chunks one after another with the state carried and saves one logits
tensor [T_i, V] per chunk. WKV_STATES.pt, if given, is a list of per-layer [H, N, N]
tensors used as the initial WKV state in the package's own layout.
"""

import json
import sys

import torch


def main() -> None:
    model_path, chunks, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    from rwkv.model import RWKV

    name = model_path[: -len(".pth")] if model_path.endswith(".pth") else model_path
    model = RWKV(model=name, strategy="cpu fp32")
    state = None
    if len(sys.argv) > 4:
        wkv = torch.load(sys.argv[4], weights_only=True)
        C = model.args.n_embd
        state = []
        for s in wkv:
            state += [torch.zeros(C), s.float().contiguous(), torch.zeros(C)]
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
