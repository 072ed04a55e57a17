"""The in-place decoding step ``model.step_(tokens, state)``: the same logits and states as
``forward`` one token at a time, for RWKV-5.2, -6 and -7, from zero and from tuned states."""

import pytest
import torch

from conftest import rel_err
from official_files import make_rwkv5_state_dict, make_rwkv6_state_dict, make_rwkv7_state_dict
from rwkvkit import load_model
from rwkvkit.errors import InputError, StateError
from rwkvkit.generation import prefill

MAKERS = {"rwkv5": make_rwkv5_state_dict, "rwkv6": make_rwkv6_state_dict, "rwkv7": make_rwkv7_state_dict}
V = 97


def model_file(tmp_path, arch, seed, time_state=False):
    sd = MAKERS[arch](n_layer=3, n_embd=64, head_size=32, vocab_size=V, seed=seed)
    if time_state:  # a state-tuned file: att.time_state [H, N, N] per layer
        g = torch.Generator().manual_seed(seed)
        for i in range(3):
            sd[f"blocks.{i}.att.time_state"] = torch.randn(2, 32, 32, generator=g) * 0.5
    path = tmp_path / f"{arch}.pth"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6", "rwkv7"])
@pytest.mark.parametrize("start", ["zero", "time_state", "prompt"])
def test_step_equals_forward(tmp_path, seed, arch, start):
    model = load_model(model_file(tmp_path, arch, seed, time_state=start == "time_state"))
    B, T = 3, 12
    tokens = torch.randint(0, V, (B, T))
    state = model.init_state(B)
    if start == "prompt":
        _, state = model(torch.randint(0, V, (B, 20)), state)
    ref_state, live = state, state.clone()
    tensors = {n: t.data_ptr() for n, t in live.tensor_fields().items()}
    for t in range(T):
        expected, ref_state = model(tokens[:, t : t + 1], ref_state)
        logits = model.step_(tokens[:, t], live)
        assert logits.shape == (B, V) and logits.dtype == torch.float32 and not logits.requires_grad
        # float32 rounding of two code paths: median 0, 99th percentile 6.5e-7, worst 4.0e-6 (RWKV-7,
        # seed 2591257292) over 6,480 steps; a wrong step is off by 1e-3 and more
        assert rel_err(logits, expected[:, 0]) < 1e-5, f"token {t}, seed {seed}"
    for name, t in ref_state.tensor_fields().items():
        assert rel_err(getattr(live, name), t) < 1e-5, f"{name}, seed {seed}"
    assert {n: t.data_ptr() for n, t in live.tensor_fields().items()} == tensors, "the state is updated in place"


def test_step_in_bfloat16_follows_forward(tmp_path, seed):
    model = load_model(model_file(tmp_path, "rwkv7", seed), dtype=torch.bfloat16)
    _, state = prefill(model, torch.randint(0, V, (2, 9)))
    live = state.clone()
    for t in torch.randint(0, V, (6, 2)):
        expected, state = model(t[:, None], state)
        # bfloat16 rounding in two orders: median 1.1e-2, worst 2.0e-2 over 360 steps (60 seeds)
        assert rel_err(model.step_(t, live), expected[:, 0]) < 5e-2


def test_step_checks_shapes_not_values(tmp_path, seed):
    model = load_model(model_file(tmp_path, "rwkv7", seed))
    state = model.init_state(2)
    with pytest.raises(StateError, match="att_shift has shape"):
        model.step_(torch.tensor([1, 2, 3]), state)
    with pytest.raises(InputError, match=r"shape \[B\]"):
        model.step_(torch.tensor([[1, 2]]), state)
    with pytest.raises(StateError, match="float32"):
        model.step_(torch.tensor([1, 2]), state._replace(wkv=state.wkv.double()))
    assert model.step_(torch.tensor([1, 2], dtype=torch.int32), state).shape == (2, V)
    for batch_size in (0, -1, 1.5, "2", None):
        with pytest.raises(InputError, match=f"init_state: batch_size must be a positive integer, got {batch_size!r}"):
            model.init_state(batch_size)
