"""The Llama baseline: one piece, pieces (bottom-right mask), token by token and the full
forward agree; the KV cache's size; state and model files; bad inputs; `rwkvkit train`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import rel_err
from rwkvkit import ModelConfig, load_model
from rwkvkit.cli import main
from rwkvkit.errors import ConfigError, InputError, StateError
from rwkvkit.models import model_class
from rwkvkit.models.attention import bottom_right_mask
from rwkvkit.models.llama import Llama, swiglu_default
from rwkvkit.state import KVCacheState, ModelState
from rwkvkit.train.recipe import param_groups

V = 97
TOL = 1e-5


def make(n_layer: int = 2, noise: float = 0.05, **extra) -> Llama:
    model = Llama(ModelConfig(arch="llama", n_layer=n_layer, n_embd=64, head_size=32, vocab_size=V, extra=extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


@pytest.mark.parametrize("extra", [{}, {"norm": "rmsnorm"}, {"rope_base": 0}], ids=["layernorm", "rmsnorm", "nope"])
def test_prefill_pieces_decoding_and_full_forward_agree(seed, extra):
    model = make(**extra)
    P, K = 17, 4
    tokens = torch.randint(0, V, (2, P + K))
    full, s_full = model(tokens)
    one, s_one = model(tokens[:, :P], last_only=True)
    state, cuts = None, [0, 1, 6, 7, 13, P]
    for lo, hi in zip(cuts, cuts[1:]):
        pieces, state = model(tokens[:, lo:hi], state, last_only=True)
    steps, s_steps = None, None
    for t in range(P):
        steps, s_steps = model(tokens[:, t : t + 1], s_steps)
    for name, logits in (("one piece", one), ("pieces", pieces), ("token by token", steps)):
        assert rel_err(logits[:, -1], full[:, P - 1]) < TOL, f"{name}, seed {seed}"
    for name, st in (("one piece", s_one), ("pieces", state), ("token by token", s_steps)):
        out = []
        for t in range(P, P + K):
            logits, st = model(tokens[:, t : t + 1], st)
            out.append(logits)
        assert rel_err(torch.cat(out, 1), full[:, P:]) < TOL, f"decoding after {name}, seed {seed}"
        assert rel_err(st.k, s_full.k) < TOL and rel_err(st.v, s_full.v) < TOL


def test_bottom_right_mask():
    # 2 queries (positions 3 and 4 of 5) over keys 0..4: the last row sees everything
    assert bottom_right_mask(2, 0, 5, 5, torch.device("cpu")).tolist() == [[True] * 4 + [False], [True] * 5]
    assert bottom_right_mask(2, 0, 3, 5, torch.device("cpu")) is None  # keys 0..2: all visible
    assert bottom_right_mask(1, 0, 5, 5, torch.device("cpu")) is None


def test_sizes_init_and_groups():
    model = Llama(ModelConfig(arch="llama", n_layer=2, n_embd=768, head_size=64, vocab_size=V))
    assert model.config.ffn_dim == swiglu_default(768) == 2048
    assert swiglu_default(320) == 832 and swiglu_default(256) == 672
    assert model.config.extra == {"rope_base": 10000.0, "norm": "layernorm"}
    assert isinstance(model.blocks[0].ln0, torch.nn.LayerNorm) and model.emb.weight.abs().max() <= 1e-4
    C = 768
    assert sum(p.numel() for p in model.blocks[1].parameters()) == 4 * C * C + 3 * C * 2048 + 4 * C
    by_name = {n: g for g in param_groups(model, 0.1) for n in g["param_names"]}
    decay = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert decay == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {g["lr_scale"] for g in by_name.values()} == {1.0}
    rms = Llama(ModelConfig(arch="llama", n_layer=1, n_embd=64, head_size=32, vocab_size=V, extra={"norm": "rmsnorm"}))
    assert isinstance(rms.ln_out, torch.nn.RMSNorm) and "blocks.0.ln1.bias" not in rms.state_dict()
    for extra, match in (({"norm": "batchnorm"}, "norm"), ({"rope_base": -1}, "rope_base"), ({"gqa": 2}, "unknown")):
        with pytest.raises(ConfigError, match=match):
            Llama(ModelConfig(arch="llama", n_layer=1, n_embd=64, head_size=32, vocab_size=V, extra=extra))


def test_kv_cache_size(seed):
    model = make()
    _, s = model(torch.randint(0, V, (3, 10)))
    assert isinstance(s, KVCacheState) and s.k.shape == (2, 3, 2, 10, 32) and s.cache_length == 10
    _, s2 = model(torch.randint(0, V, (3, 1)), s)
    assert s2.nbytes() - s.nbytes() == 3 * model.cache_bytes_per_token() == 3 * 2 * 2 * 64 * 4
    assert model.cache_bytes_per_token(torch.bfloat16) == 2 * 2 * 64 * 2
    assert model.cache_ratio_vs_llama() == 1.0


def test_state_and_model_files(tmp_path, seed):
    model = make(norm="rmsnorm")
    tokens = torch.randint(0, V, (2, 7))
    _, s = model(tokens)
    s.save(tmp_path / "kv.state")
    back = ModelState.load(tmp_path / "kv.state")
    assert type(back) is KVCacheState and torch.equal(back.k, s.k) and torch.equal(back.v, s.v)
    nxt = torch.randint(0, V, (2, 3))
    assert torch.equal(model(nxt, back)[0], model(nxt, s)[0])
    assert rel_err(model(nxt[:1], s.select(0))[0], model(nxt, s)[0][:1]) < TOL
    again = load_model(model.save(tmp_path / "llama"))
    assert type(again) is Llama and again.config.extra["norm"] == "rmsnorm"
    assert torch.equal(again(tokens)[0], model(tokens)[0])
    assert Llama.config_from_state_dict(model.state_dict()).extra == {"norm": "rmsnorm"}


def test_bad_inputs(seed):
    model = make()
    with pytest.raises(InputError, match="integer ids"):
        model(torch.rand(1, 4))
    with pytest.raises(InputError, match=r"shape \[B, T\]"):
        model(torch.randint(0, V, (1, 2, 3)))
    _, s = model(torch.randint(0, V, (2, 4)))
    with pytest.raises(StateError, match="batch size 2"):
        model(torch.randint(0, V, (3, 1)), s)
    with pytest.raises(StateError, match="KVCacheState"):
        model(torch.randint(0, V, (2, 1)), model_class("rwkv6")(
            ModelConfig(arch="rwkv6", n_layer=2, n_embd=64, head_size=32, vocab_size=V)).init_state(2))
    with pytest.raises(StateError, match="field k"):
        model(torch.randint(0, V, (2, 1)), make(n_layer=3).init_state(2))
    _, longer = model(torch.randint(0, V, (1, 5)))
    with pytest.raises(StateError, match="share a cache length"):
        ModelState.cat([s.select(0), longer])


def test_cli_train_tiny(tmp_path, capsys):
    from rwkvkit.train.data import write_tokens

    docs = [list(("A cat sat on a warm mat by the door. " * 4).encode()) for _ in range(12)]
    write_tokens(tmp_path / "text", docs, vocab_size=128)
    write_tokens(tmp_path / "text.val", docs[:2], vocab_size=128)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\narch = "llama"\npreset = "tiny"\nextra = {{norm = "rmsnorm"}}\n[data]\n'
                    f'train_data = "{tmp_path / "text.tokens"}"\nctx_len = 32\nmicro_batch = 2\n[optim]\n'
                    "total_steps = 3\n[eval]\neval_every = 3\neval_tokens = 200\n[log]\nprogress = false\n"
                    "tensorboard = false\nplot = false\n")
    assert main(["train", str(toml), "--out", str(tmp_path / "out")]) == 0
    assert "finished at step 3/3" in capsys.readouterr().out
    model = load_model(tmp_path / "out")
    assert model.config.arch == "llama" and model.config.extra["norm"] == "rmsnorm"
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["extra"] == {"norm": "rmsnorm"} and saved["eval_context"] == "auto"


def test_paper_file_loads_and_matches_the_papers_forward(tmp_path, seed):
    """A .pth with the GoldFinch paper code's Llama keys is detected as "llama" and gives the
    logits of the paper code's forward (tests/goldfinch_paper.py, float64, RoPE 10000)."""
    from goldfinch_paper import llama_logits
    from official_files import make_paper_llama_state_dict

    sd = make_paper_llama_state_dict(2, 128, 97, seed=seed % 1000)
    path = tmp_path / "llama.pth"
    torch.save(sd, path)
    model = load_model(path, dtype=torch.float64)
    assert model.config.arch == "llama" and model.config.extra == {"rope_base": 10000.0, "norm": "layernorm"}
    tokens = torch.randint(0, 97, (2, 10))
    want = llama_logits(sd, tokens)
    assert rel_err(model(tokens)[0], want) < 1e-10
    logits, state = model(tokens[:, :8], last_only=True)
    assert rel_err(logits[:, 0], want[:, 7]) < 1e-10
    for t in (8, 9):
        logits, state = model(tokens[:, t : t + 1], state)
        assert rel_err(logits[:, 0], want[:, t]) < 1e-10
