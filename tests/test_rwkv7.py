"""RWKV-7 model: parallel == recurrent, the state contract, and logits equal to the
reference ``rwkv`` package on official-layout checkpoints."""

import importlib.util

import pytest
import torch

from conftest import rel_err
from official_files import make_rwkv7_state_dict, reference_logits
from rwkvkit import ModelConfig, load_model
from rwkvkit.checkpoint import build_model
from rwkvkit.errors import InputError, StateError
from rwkvkit.models.rwkv7 import RWKV7


def random_model(seed, dtype=torch.float32, **sizes):
    sd = make_rwkv7_state_dict(seed=seed, **sizes)
    config = RWKV7.config_from_state_dict(sd)
    return build_model(config, sd, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_parallel_equals_recurrent(seed, dtype, tol):
    model = random_model(seed, dtype, n_layer=3, n_embd=64, head_size=32, vocab_size=97)
    tokens = torch.randint(0, 97, (2, 45))
    full, s_full = model(tokens)
    assert full.shape == (2, 45, 97)
    assert full.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    state, steps = None, []
    for t in range(45):
        logits, state = model(tokens[:, t : t + 1], state)
        steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < tol, f"seed {seed}"

    state, pieces = None, []
    for lo, hi in [(0, 7), (7, 8), (8, 29), (29, 45)]:
        logits, state = model(tokens[:, lo:hi], state)
        pieces.append(logits)
    assert rel_err(torch.cat(pieces, 1), full) < tol, f"seed {seed}"
    for name, t in s_full.tensor_fields().items():
        assert rel_err(getattr(state, name), t) < tol, f"{name}, seed {seed}"


def test_float64_model_state_is_float64(seed):
    model = random_model(seed, torch.float64, n_layer=1, n_embd=64, head_size=32, vocab_size=50)
    assert model.init_state(2).wkv.dtype == torch.float64


def test_forward_does_not_modify_state(seed):
    model = random_model(seed, n_layer=2, n_embd=64, head_size=32, vocab_size=50)
    _, state = model(torch.randint(0, 50, (1, 10)))
    before = state.clone()
    model(torch.randint(0, 50, (1, 5)), state)
    model(torch.randint(0, 50, (1, 1)), state)
    for name, t in before.tensor_fields().items():
        assert torch.equal(getattr(state, name), t), name


def test_last_only_and_hidden(seed):
    model = random_model(seed, n_layer=2, n_embd=64, head_size=32, vocab_size=50)
    tokens = torch.randint(0, 50, (3, 12))
    full, _ = model(tokens)
    last, _ = model(tokens, last_only=True)
    assert last.shape == (3, 1, 50)
    assert torch.allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    h, _ = model.hidden(tokens)
    assert h.shape == (3, 12, 64)
    assert torch.allclose(model.head(h).float(), full, rtol=1e-5, atol=1e-5)


def test_batch_rows_are_independent(seed):
    model = random_model(seed, n_layer=2, n_embd=64, head_size=32, vocab_size=50)
    tokens = torch.randint(0, 50, (3, 20))
    full, state = model(tokens)
    for row in range(3):
        alone, s = model(tokens[row : row + 1])
        assert rel_err(alone, full[row : row + 1]) < 1e-5
        assert rel_err(s.wkv, state.select(row).wkv) < 1e-5


def test_gradients_flow_to_weights_and_initial_state(seed):
    model = random_model(seed, n_layer=2, n_embd=64, head_size=32, vocab_size=50)
    state = model.init_state(1)
    state.wkv.normal_().requires_grad_()
    logits, _ = model(torch.randint(0, 50, (1, 20)), state)
    logits.logsumexp(-1).sum().backward()
    assert state.wkv.grad is not None and state.wkv.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"


def test_bad_inputs(seed):
    model = random_model(seed, n_layer=1, n_embd=64, head_size=32, vocab_size=50)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(InputError, match="shape"):
        model(torch.tensor([1, 2]))
    with pytest.raises(InputError, match="integer"):
        model(torch.ones(1, 2))
    _, state = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(StateError, match="batch size 2"):
        model(torch.tensor([[1, 2]]), state)
    state.wkv = state.wkv[:, :1]  # one field of another batch size
    with pytest.raises(StateError, match="fields disagree on the batch size: .*'wkv': 1"):
        model(torch.tensor([[1, 2], [3, 4]]), state)
    other = random_model(seed, n_layer=2, n_embd=64, head_size=32, vocab_size=50)
    with pytest.raises(StateError, match="att_shift"):
        other(torch.tensor([[1]]), model.init_state(1))


def test_fresh_model_uses_official_init():
    config = ModelConfig(arch="rwkv7", n_layer=2, n_embd=128, vocab_size=300)
    model = RWKV7(config)
    assert config.lora == {"w": 32, "a": 32, "v": 32, "g": 64}
    assert ModelConfig(arch="rwkv7", n_layer=1, n_embd=768, vocab_size=10).n_head == 12
    assert RWKV7(ModelConfig(arch="rwkv7", n_layer=1, n_embd=768, vocab_size=10)).config.lora == {
        "w": 64, "a": 64, "v": 32, "g": 128,
    }
    att = model.blocks[1].att
    assert torch.all(att.output.weight == 0) and torch.all(att.k_a == 1.02)
    logits, _ = model(torch.randint(0, 300, (1, 8)))
    assert torch.isfinite(logits).all()


# -- against the reference package ---------------------------------------------------------
needs_rwkv = pytest.mark.skipif(importlib.util.find_spec("rwkv") is None, reason="reference package rwkv not installed")

SIZES = [
    dict(n_layer=2, n_embd=128, head_size=64, vocab_size=300, lora=(32, 32, 32, 64)),
    dict(n_layer=3, n_embd=96, head_size=32, vocab_size=260, lora=(16, 24, 8, 40)),
    dict(n_layer=1, n_embd=64, head_size=16, vocab_size=65536, lora=(8, 8, 8, 8), layer0_v=False),
]


@needs_rwkv
@pytest.mark.parametrize("sizes", SIZES, ids=["L2-C128-N64", "L3-C96-N32", "L1-C64-N16-V65536"])
def test_logits_match_reference_package(tmp_path, seed, sizes):
    """Official-layout file (bf16 storage, like the released ones) -> same logits as the
    reference package at cpu fp32: a whole sequence, then continuing from the state."""
    sd = make_rwkv7_state_dict(seed=seed, dtype=torch.bfloat16, **sizes)
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    V = sizes["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(0, V, (n,), generator=g).tolist() for n in (33, 5, 1, 1, 17)]
    ref = reference_logits("7", path, chunks)

    model = load_model(path)
    state = None
    for tokens, expected in zip(chunks, ref):
        logits, state = model(torch.tensor([tokens]), state)
        assert rel_err(logits[0], expected) < 1e-5, f"chunk of {len(tokens)}, seed {seed}"


def test_init_matches_the_spec_formulas():
    """Per-layer init values, recomputed element by element from spec section 3.4."""
    C, L, N = 64, 3, 32
    model = RWKV7(ModelConfig(arch="rwkv7", n_layer=L, n_embd=C, head_size=N, vocab_size=50))
    for i, block in enumerate(model.blocks):
        att = block.att
        r0, r1 = i / (L - 1), 1 - i / L
        for n in range(C):
            ddd, linear = n / C, n / (C - 1) - 0.5
            z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
            zigzag = z * abs(z)
            www = -6 + 6 * (n / (C - 1)) ** (1 + r0**0.3)
            want = {
                "x_r": 1 - ddd ** (0.2 * r1), "x_w": 1 - ddd ** (0.9 * r1), "x_k": 1 - ddd ** (0.7 * r1),
                "x_v": 1 - ddd ** (0.7 * r1), "x_a": 1 - ddd ** (0.9 * r1), "x_g": 1 - ddd ** (0.2 * r1),
                "w0": www + 0.5 + 2.5 * zigzag, "a0": -0.19 + 0.3 * zigzag + 0.4 * linear,
                "k_k": 0.71 - 0.1 * linear, "k_a": 1.02,
            }
            if i > 0:
                want["v0"] = 0.73 - 0.4 * linear
            for name, value in want.items():
                got = getattr(att, name)[0, 0, n].item()
                assert got == pytest.approx(value, rel=1e-5, abs=1e-6), (i, name, n)
            assert block.ffn.x_k[0, 0, n].item() == pytest.approx(1 - ddd ** (r1**4), rel=1e-5, abs=1e-6)
            assert att.ln_x.weight[n].item() == pytest.approx(((1 + i) / L) ** 0.7, rel=1e-6)
        assert torch.all(att.r_k == -0.04)
        for lo, hi in ((att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)) + (((att.v1, att.v2),) if i else ()):
            assert torch.all(lo == 0)
            assert torch.allclose(torch.linalg.svdvals(hi.double()), torch.full((hi.shape[0],), 0.1, dtype=torch.float64))
