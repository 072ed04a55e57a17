"""Whole-model training step on CUDA: tokens/s of an RWKV-7 model (default the 0.1B preset,
L12 D768, ctx 4096) with rwkvkit's Triton WKV-7 kernels against the same model with fla's
``chunk_rwkv7`` (as fla's RWKV-7 layer calls it) and with the PyTorch chunked form, in one
run: same weights, same batch, bf16 autocast, AdamW step included. ``--arch rwkv6``: the same
for RWKV-6 (Finch) with the WKV-6 kernels against fla's ``chunk_rwkv6``.

    python benchmarks/bench_train_step.py --out runs/train_step.json
    python benchmarks/bench_train_step.py --arch rwkv6 --impls ours,fla
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rwkvkit import ops  # noqa: E402
from rwkvkit.config import ModelConfig  # noqa: E402
from rwkvkit.models import rwkv6, rwkv7  # noqa: E402
from rwkvkit.train.loop import LossModule  # noqa: E402
from rwkvkit.train.recipe import build_model, build_optimizer  # noqa: E402


def fla_wkv7():
    """ops.wkv7's signature on top of fla's chunk_rwkv7 (chunk 64, safe_gate, lower bound)."""
    import inspect

    from fla.ops.rwkv7 import chunk_rwkv7

    decay_arg = "log_w" if "log_w" in inspect.signature(chunk_rwkv7).parameters else "w"  # (0.6.0: w)

    def wkv7(r, log_w, k, v, a, b, state):
        # fla's kernels want one dtype for every input and for the output gradient (its layer
        # passes bf16 throughout), so everything goes in as bf16 and the output stays bf16.
        r, log_w, k, v, a, b = (t.to(torch.bfloat16) for t in (r, log_w, k, v, a, b))
        o, s = chunk_rwkv7(
            r=r, k=k, v=v, a=a, b=b, scale=1.0, initial_state=state.transpose(-1, -2), output_final_state=True,
            chunk_size=64, safe_gate=True, lower_bound=-math.exp(-0.5), **{decay_arg: log_w},
        )[:2]
        return o, s.transpose(-1, -2).to(state.dtype)

    return wkv7


def fla_wkv6():
    """ops.wkv6's signature on top of fla's chunk_rwkv6 (its defaults: chunk 64)."""
    from fla.ops.rwkv6 import chunk_rwkv6

    def wkv6(r, log_w, k, v, u, state):
        # one dtype for every input, as for fla_wkv7; fla's state is [B, H, K, V]
        r, log_w, k, v, u = (t.to(torch.bfloat16) for t in (r, log_w, k, v, u))
        o, s = chunk_rwkv6(r=r, k=k, v=v, w=log_w, u=u, scale=1.0, initial_state=state.transpose(-1, -2),
                           output_final_state=True)[:2]
        return o, s.transpose(-1, -2).to(state.dtype)

    return wkv6


# per architecture: the model module whose ``ops`` attribute the layers call, the op's name,
# the PyTorch chunked form, fla's stand-in
ARCHS = {
    "rwkv7": (rwkv7, "wkv7", ops.wkv7_chunked, fla_wkv7),
    "rwkv6": (rwkv6, "wkv6", ops.wkv6_chunked, fla_wkv6),
}


def time_steps(model, tokens, steps: int, warmup: int) -> float:
    loss_module = LossModule(model)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_module(x, y) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return y.numel() / dt, float(loss.detach())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="rwkv7")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", default="ours,fla,chunked")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    module, op, chunked, fla = ARCHS[args.arch]
    cfg = ModelConfig(arch=args.arch, n_layer=args.layers, n_embd=args.dim, vocab_size=args.vocab, head_size=64)
    base = build_model(cfg).cuda()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = torch.randint(0, args.vocab, (args.batch, args.ctx + 1), device="cuda")
    original = getattr(module.ops, op)
    impls = {"ours": original, "chunked": chunked}
    try:
        impls["fla"] = fla()
    except Exception as e:  # noqa: BLE001
        print(f"# fla not importable: {e}")
    report = {"device": torch.cuda.get_device_name(), "model": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
              "ctx": args.ctx, "batch": args.batch, "results": {}}
    for name in args.impls.split(","):
        if name not in impls:
            continue
        base.load_state_dict(state)
        setattr(module.ops, op, impls[name])
        try:
            tps, loss = time_steps(base, tokens, args.steps, args.warmup)
            report["results"][name] = {"tokens_per_s": tps, "last_loss": loss,
                                       "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
        except Exception as e:  # noqa: BLE001
            report["results"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            setattr(module.ops, op, original)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"{name:8s} {json.dumps(report['results'][name])}", flush=True)
    ours = report["results"].get("ours", {}).get("tokens_per_s")
    for name, r in report["results"].items():
        if ours and "tokens_per_s" in r:
            print(f"# ours / {name}: {ours / r['tokens_per_s']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
