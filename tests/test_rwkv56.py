"""RWKV-5.2 "Eagle" and RWKV-6 "Finch": parallel == recurrent, logits equal to the
reference ``rwkv`` package on official-layout files, state-tuned files."""

import importlib.util

import pytest
import torch

from conftest import rel_err
from official_files import make_rwkv5_state_dict, make_rwkv6_state_dict, make_rwkv7_state_dict, reference_logits
from rwkvkit import ModelConfig, load_model
from rwkvkit.checkpoint import build_model, inspect_checkpoint
from rwkvkit.models import model_class

MAKERS = {"rwkv5": make_rwkv5_state_dict, "rwkv6": make_rwkv6_state_dict}


def random_model(arch, seed, dtype=torch.float32, **sizes):
    sd = MAKERS[arch](seed=seed, **sizes)
    config = model_class(arch).config_from_state_dict(sd)
    return build_model(config, sd, dtype=dtype)


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_parallel_equals_recurrent(seed, arch, dtype, tol):
    model = random_model(arch, seed, dtype, n_layer=2, n_embd=64, head_size=32, vocab_size=97)
    tokens = torch.randint(0, 97, (2, 40))
    full, s_full = model(tokens)
    state, steps = None, []
    for t in range(40):
        logits, state = model(tokens[:, t : t + 1], state)
        steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < tol, f"seed {seed}"
    state, pieces = None, []
    for lo, hi in [(0, 3), (3, 20), (20, 21), (21, 40)]:
        logits, state = model(tokens[:, lo:hi], state)
        pieces.append(logits)
    assert rel_err(torch.cat(pieces, 1), full) < tol, f"seed {seed}"
    for name, t in s_full.tensor_fields().items():
        assert rel_err(getattr(state, name), t) < tol, f"{name}, seed {seed}"


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6"])
def test_fresh_models_use_official_init(arch):
    model = model_class(arch)(ModelConfig(arch=arch, n_layer=2, n_embd=128, vocab_size=300))
    assert model.config.ffn_dim == 448  # 3.5 C rounded down to a multiple of 32
    assert torch.all(model.blocks[0].att.output.weight == 0)
    logits, _ = model(torch.randint(0, 300, (1, 6)))
    assert torch.isfinite(logits).all()
    if arch == "rwkv6":
        assert model.config.lora == {"maa": 32, "decay": 64}


def test_sizes_inferred_from_shapes(tmp_path):
    sd = make_rwkv6_state_dict(n_layer=3, n_embd=96, head_size=32, vocab_size=100, lora=(16, 24), ffn_dim=320)
    torch.save(sd, tmp_path / "v6.pth")
    cfg = load_model(tmp_path / "v6.pth").config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.lora) == (
        "rwkv6", 3, 96, 3, 32, 320, {"maa": 16, "decay": 24},
    )
    sd = make_rwkv5_state_dict(n_layer=2, n_embd=64, head_size=16, vocab_size=100)
    torch.save(sd, tmp_path / "v5.pth")
    cfg = load_model(tmp_path / "v5.pth").config
    assert (cfg.arch, cfg.n_head, cfg.head_size, cfg.ffn_dim) == ("rwkv5", 4, 16, 224)


# -- against the reference package ---------------------------------------------------------
needs_rwkv = pytest.mark.skipif(importlib.util.find_spec("rwkv") is None, reason="reference package rwkv not installed")

CASES = [
    ("rwkv5", dict(n_layer=2, n_embd=128, head_size=64, vocab_size=300)),
    ("rwkv5", dict(n_layer=3, n_embd=96, head_size=32, vocab_size=65536)),
    ("rwkv6", dict(n_layer=2, n_embd=128, head_size=64, vocab_size=300, lora=(32, 64))),
    ("rwkv6", dict(n_layer=3, n_embd=96, head_size=32, vocab_size=260, lora=(16, 24), ffn_dim=320)),
]


@needs_rwkv
@pytest.mark.parametrize("arch,sizes", CASES, ids=["v5-L2-C128", "v5-L3-C96-V65536", "v6-L2-C128", "v6-L3-C96"])
def test_logits_match_reference_package(tmp_path, seed, arch, sizes):
    # float32 storage: for v5/v6 the reference package applies ln0 to the embedding in the
    # file's dtype before converting to fp32, so a bf16 file would add bf16 rounding (~2e-3)
    # on its side that is not part of the model.
    sd = MAKERS[arch](seed=seed, dtype=torch.float32, **sizes)
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(0, sizes["vocab_size"], (n,), generator=g).tolist() for n in (30, 4, 1, 1, 9)]
    ref = reference_logits(arch[-1], path, chunks)
    model = load_model(path)
    assert model.config.arch == arch
    state = None
    for tokens, expected in zip(chunks, ref):
        logits, state = model(torch.tensor([tokens]), state)
        assert rel_err(logits[0], expected) < 1e-5, f"chunk of {len(tokens)}, seed {seed}"


@needs_rwkv
def test_state_tuned_rwkv6_matches_reference(tmp_path, seed):
    """A v6 file with att.time_state: its state is the model's default initial state."""
    sd = make_rwkv6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=120, lora=(8, 16), seed=seed,
                               time_state=True)
    path = tmp_path / "tuned.pth"
    torch.save(sd, path)
    model = load_model(path)
    assert model.default_state is not None
    assert inspect_checkpoint(path)["tuned_state"] is True
    s0 = model.init_state(3)
    assert torch.equal(s0.wkv[1, 2], sd["blocks.1.att.time_state"])
    chunks = [[5, 6, 7, 8, 9, 10], [11]]
    ref = reference_logits("6", path, chunks)
    state = None
    for tokens, expected in zip(chunks, ref):
        logits, state = model(torch.tensor([tokens]), state)
        assert rel_err(logits[0], expected) < 1e-5
    # the tuned state differs from a zero start
    zero = model(torch.tensor([chunks[0]]), model.init_state(1).__class__(
        arch="rwkv6", att_shift=s0.att_shift[:, :1], wkv=torch.zeros_like(s0.wkv[:, :1]), ffn_shift=s0.ffn_shift[:, :1]))[0]
    assert rel_err(zero[0], ref[0]) > 1e-3


@needs_rwkv
def test_state_tuned_rwkv7(tmp_path, seed):
    """v7 time_state is taken as [H, value, key], the orientation of the official v7 state:
    the model must equal the reference package started from that state."""
    sd = make_rwkv7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=120, lora=(8, 8, 8, 8), seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(2):
        sd[f"blocks.{i}.att.time_state"] = torch.randn(2, 32, 32, generator=g) * 0.5
    path = tmp_path / "tuned7.pth"
    torch.save(sd, path)
    model = load_model(path)
    assert model.default_state is not None
    chunks = [[5, 6, 7, 8], [9]]
    ref = reference_logits("7", path, chunks, wkv_states=[sd[f"blocks.{i}.att.time_state"] for i in range(2)])
    state = None
    for tokens, expected in zip(chunks, ref):
        logits, state = model(torch.tensor([tokens]), state)
        assert rel_err(logits[0], expected) < 1e-5


def test_tuned_state_survives_save_and_load(tmp_path, seed):
    sd = make_rwkv6_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=50, lora=(8, 8), seed=seed,
                               time_state=True)
    torch.save(sd, tmp_path / "t.pth")
    model = load_model(tmp_path / "t.pth")
    again = load_model(model.save(tmp_path / "saved"))
    tokens = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(tokens)[0], again(tokens)[0])
    assert inspect_checkpoint(tmp_path / "saved")["tuned_state"] is True


def test_incomplete_time_state_is_an_error(tmp_path):
    from rwkvkit.errors import StateDictError

    sd = make_rwkv6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=50, lora=(8, 8), time_state=True)
    del sd["blocks.1.att.time_state"]
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(StateDictError, match="blocks.1.att.time_state"):
        load_model(tmp_path / "t.pth")


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6"])
def test_info_generate_and_chat(tmp_path, capsys, arch):
    """`rwkvkit info`, generation and chat work unchanged with v5.2 and v6 files."""
    import json

    from rwkvkit import ChatSession, generate
    from rwkvkit.cli import main

    sizes = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=65536)
    if arch == "rwkv6":
        sizes["lora"] = (8, 16)
    path = tmp_path / f"{arch}.pth"
    torch.save(MAKERS[arch](seed=1, dtype=torch.bfloat16, **sizes), path)

    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == arch and info["n_head"] == 2 and info["head_size"] == 32
    assert info["state_bytes_fp32"] == 4 * 2 * (64 + 64 + 2 * 32 * 32)
    assert main(["info", str(path)]) == 0
    assert arch in capsys.readouterr().out

    model = load_model(path)
    text = generate(model, "Hello", max_new_tokens=8, temperature=0, stop_tokens=())
    ids = model.tokenizer.encode("Hello")
    logits, state = model(torch.tensor([ids]))
    first = int(logits[0, -1].argmax())
    assert text.startswith(model.tokenizer.decode([first])) or first == 0
    chat = ChatSession(model, max_new_tokens=5)
    reply = chat.send("Hi there")
    assert reply.stop_reason == "length" and len(reply.tokens) == 5 and reply.state.arch == arch
