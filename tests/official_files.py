"""Random checkpoints in the official BlinkDL layouts (key names, shapes, bf16 storage),
plus a runner that gets logits from the reference ``rwkv`` package in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import torch

RUNNER = Path(__file__).with_name("rwkv_reference_runner.py")


def make_rwkv7_state_dict(
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    vocab_size: int = 256,
    lora: tuple[int, int, int, int] = (32, 32, 32, 64),
    ffn_dim: int | None = None,
    *,
    seed: int = 0,
    layer0_v: bool = True,
    dtype: torch.dtype = torch.float32,
) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the official RWKV-7 keys and shapes, in realistic ranges."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = ffn_dim or 4 * C
    Dw, Da, Dv, Dg = lora

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def unif(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    sd["emb.weight"] = randn(V, C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        for n in "rwkvag":
            sd[p + f"att.x_{n}"] = unif(1, 1, C)
        sd[p + "att.w0"] = randn(1, 1, C, scale=1.5, shift=-1.0)
        sd[p + "att.w1"], sd[p + "att.w2"] = randn(C, Dw, scale=0.1), randn(Dw, C, scale=0.1)
        sd[p + "att.a0"] = randn(1, 1, C, scale=0.5)
        sd[p + "att.a1"], sd[p + "att.a2"] = randn(C, Da, scale=0.1), randn(Da, C, scale=0.1)
        if i > 0 or layer0_v:
            sd[p + "att.v0"] = randn(1, 1, C, scale=0.5, shift=0.5)
            sd[p + "att.v1"], sd[p + "att.v2"] = randn(C, Dv, scale=0.1), randn(Dv, C, scale=0.1)
        sd[p + "att.g1"], sd[p + "att.g2"] = randn(C, Dg, scale=0.1), randn(Dg, C, scale=0.1)
        sd[p + "att.k_k"] = randn(1, 1, C, scale=0.1, shift=0.7)
        sd[p + "att.k_a"] = randn(1, 1, C, scale=0.1, shift=1.0)
        sd[p + "att.r_k"] = randn(H, N, scale=0.1)
        for n in ("receptance", "key", "value", "output"):
            sd[p + f"att.{n}.weight"] = randn(C, C, scale=C**-0.5)
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ffn.x_k"] = unif(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F, C, scale=C**-0.5)
        sd[p + "ffn.value.weight"] = randn(C, F, scale=F**-0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C**-0.5)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def _common(g, sd, n_layer, C, V, F, layer_fn):
    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd["emb.weight"] = randn(V, C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        layer_fn(p, randn)
        for n in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{n}.weight"] = randn(C, C, scale=C**-0.5)
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ffn.key.weight"] = randn(F, C, scale=C**-0.5)
        sd[p + "ffn.receptance.weight"] = randn(C, C, scale=C**-0.5)
        sd[p + "ffn.value.weight"] = randn(C, F, scale=F**-0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C**-0.5)


def make_rwkv6_state_dict(
    n_layer: int = 2, n_embd: int = 128, head_size: int = 64, vocab_size: int = 256,
    lora: tuple[int, int] = (32, 64), ffn_dim: int | None = None, *, seed: int = 0,
    time_state: bool = False, dtype: torch.dtype = torch.float32,
) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the official RWKV-6 keys and shapes (lora = (maa, decay))."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = ffn_dim or int((C * 3.5) // 32 * 32)
    Dm, Dd = lora
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def layer(p, randn):
        for n in "xwkvrg":
            sd[p + f"att.time_maa_{n}"] = torch.rand(1, 1, C, generator=g)
        sd[p + "att.time_maa_w1"] = randn(C, 5 * Dm, scale=0.1)
        sd[p + "att.time_maa_w2"] = randn(5, Dm, C, scale=0.1)
        sd[p + "att.time_decay"] = randn(1, 1, C, scale=1.5, shift=-1.5)
        sd[p + "att.time_decay_w1"] = randn(C, Dd, scale=0.1)
        sd[p + "att.time_decay_w2"] = randn(Dd, C, scale=0.1)
        sd[p + "att.time_faaaa"] = randn(H, N, scale=0.5)
        if time_state:
            sd[p + "att.time_state"] = randn(H, N, N, scale=0.5)
        sd[p + "ffn.time_maa_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.time_maa_r"] = torch.rand(1, 1, C, generator=g)

    _common(g, sd, n_layer, C, V, F, layer)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def make_rwkv5_state_dict(
    n_layer: int = 2, n_embd: int = 128, head_size: int = 64, vocab_size: int = 256,
    ffn_dim: int | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the official RWKV-5.2 keys and shapes."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = ffn_dim or int((C * 3.5) // 32 * 32)
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def layer(p, randn):
        for n in "kvrg":
            sd[p + f"att.time_mix_{n}"] = torch.rand(1, 1, C, generator=g)
        sd[p + "att.time_decay"] = randn(H, N, scale=1.5, shift=-1.5)
        sd[p + "att.time_faaaa"] = randn(H, N, scale=0.5)
        sd[p + "ffn.time_mix_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.time_mix_r"] = torch.rand(1, 1, C, generator=g)

    _common(g, sd, n_layer, C, V, F, layer)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def reference_logits(
    version: str, model_path: Path, chunks: list[list[int]], wkv_states: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Logits of the ``rwkv`` package (cpu fp32) for token chunks fed one after another
    with the state carried: one [T_i, V] tensor per chunk (full_output). ``wkv_states``:
    an initial per-layer WKV state in the package's layout (zeros otherwise)."""
    out = model_path.with_suffix(".ref.pt")
    extra = []
    if wkv_states is not None:
        states_path = model_path.with_suffix(".state.pt")
        torch.save(wkv_states, states_path)
        extra = [str(states_path)]
    env = {**os.environ, "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    if version == "7":
        env["RWKV_V7_ON"] = "1"
    else:
        env.pop("RWKV_V7_ON", None)
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(model_path), json.dumps(chunks), str(out), *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference runner failed:\n{proc.stdout}\n{proc.stderr}")
    return torch.load(out, weights_only=True)


# -- the GoldFinch paper's files (recursal/GoldFinch-paper) -------------------------------------
def make_goldfinch_state_dict(
    n_layer: int = 3, n_embd: int = 128, head_size: int = 64, vocab_size: int = 256, gold_layers: int = 1,
    compression: int = 16, lora: tuple[int, int, int] = (32, 64, 64), ffn_dim: int | None = None, *,
    seed: int = 0, dtype: torch.dtype = torch.float32,
) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the keys and shapes of the GoldFinch paper code's saved models
    (lora = (maa, decay, kv)): Finch-C2 blocks (with their unused ``time_faaaa``) below
    ``gold_layers`` GOLD blocks and the key compression ``w_kv_cache_a/b``; ``gold_layers=0``
    gives a Finch-C2 file."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = ffn_dim or int((C * 3.5) // 32 * 32)
    Dm, Dd, R = lora
    Ck = C // compression
    first_gold = n_layer - gold_layers

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def mix(*shape):
        return torch.rand(*shape, generator=g)

    def norm(name):
        sd[name + ".weight"], sd[name + ".bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)

    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    sd["emb.weight"] = randn(V, C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            norm(p + "ln0")
        norm(p + "ln1")
        norm(p + "ln2")
        if i < first_gold:
            for n in ("x", "r", "k", "v", "w", "v2"):
                sd[p + f"att.time_maa_{n}"] = mix(1, 1, C)
            sd[p + "att.time_maa_w1"], sd[p + "att.time_maa_w2"] = randn(C, 5 * Dm, scale=0.1), randn(5, Dm, C, scale=0.1)
            sd[p + "att.time_decay"] = randn(1, 1, C, scale=1.5, shift=-1.5)
            sd[p + "att.time_decay_w1"], sd[p + "att.time_decay_w2"] = randn(C, Dd, scale=0.1), randn(Dd, C, scale=0.1)
            sd[p + "att.time_value2_w1"], sd[p + "att.time_value2_w2"] = randn(C, Dd, scale=0.1), randn(Dd, C, scale=0.1)
            sd[p + "att.time_faaaa"] = randn(H, N, scale=0.5)
            for n in ("receptance", "key", "value", "output"):
                sd[p + f"att.{n}.weight"] = randn(C, C, scale=C**-0.5)
            norm(p + "att.ln_x")
        else:
            for n in ("x", "q", "v_cache", "k", "v"):
                sd[p + f"att.time_maa_{n}"] = mix(1, 1, C)
            sd[p + "att.time_maa_q_w1"], sd[p + "att.time_maa_q_w2"] = randn(C, Dm, scale=0.1), randn(Dm, C, scale=0.1)
            sd[p + "att.time_maa_kv_w1"] = randn(C, 2 * Dm, scale=0.1)
            sd[p + "att.time_maa_kv_w2"] = randn(2, Dm, C, scale=0.1)
            for n in ("key", "value"):
                sd[p + f"att.time_{n}_w1"], sd[p + f"att.time_{n}_w2"] = randn(C, R, scale=0.1), randn(R, C, scale=0.1)
            sd[p + "att.query.weight"] = randn(C, C, scale=C**-0.5)
            sd[p + "att.output.weight"] = randn(C, C, scale=C**-0.5)
            for n in ("q", "k", "v", "x"):
                norm(p + f"att.ln_{n}")
        sd[p + "ffn.time_maa_k"], sd[p + "ffn.time_maa_r"] = mix(1, 1, C), mix(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F, C, scale=C**-0.5)
        sd[p + "ffn.receptance.weight"] = randn(C, C, scale=C**-0.5)
        sd[p + "ffn.value.weight"] = randn(C, F, scale=F**-0.5)
    norm("ln_out")
    sd["head.weight"] = randn(V, C, scale=C**-0.5)
    if gold_layers:
        sd["w_kv_cache_a.weight"] = randn(Ck, C, scale=C**-0.5)
        sd["w_kv_cache_b.weight"] = randn(C, C + Ck, scale=(C + Ck) ** -0.5)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def make_paper_llama_state_dict(
    n_layer: int = 2, n_embd: int = 128, vocab_size: int = 256, *, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with the keys and shapes of the GoldFinch paper code's Llama baseline
    (LayerNorms, SwiGLU of width C*8/3 rounded down to 32)."""
    g = torch.Generator().manual_seed(seed)
    C, V = n_embd, vocab_size
    F = C * 4 * 2 // 3 // 32 * 32

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    sd["emb.weight"] = randn(V, C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        for n in (["ln0"] if i == 0 else []) + ["ln1", "ln2"]:
            sd[p + f"{n}.weight"], sd[p + f"{n}.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        for n in ("wq", "wk", "wv", "wo"):
            sd[p + f"att.{n}.weight"] = randn(C, C, scale=C**-0.5)
        sd[p + "ffn.w1.weight"], sd[p + "ffn.w3.weight"] = randn(F, C, scale=C**-0.5), randn(F, C, scale=C**-0.5)
        sd[p + "ffn.w2.weight"] = randn(C, F, scale=F**-0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C**-0.5)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())
