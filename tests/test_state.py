"""RecurrentState: batch operations, files, and what the model accepts."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from official_files import make_rwkv7_state_dict
from rwkvkit import RecurrentState
from rwkvkit.state import ModelState
from rwkvkit.checkpoint import build_model
from rwkvkit.errors import StateError
from rwkvkit.models.rwkv7 import RWKV7


@pytest.fixture(scope="module")
def model():
    sd = make_rwkv7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=50, lora=(8, 8, 8, 8))
    return build_model(RWKV7.config_from_state_dict(sd), sd)


def test_select_cat_expand(model):
    _, s = model(torch.randint(0, 50, (3, 5)))
    assert torch.equal(s.select(-1).wkv, s.select(2).wkv)
    assert torch.equal(s.select([-1, 0]).wkv, s.select([2, 0]).wkv)
    joined = RecurrentState.cat([s.select(0), s.select([1, 2])])
    assert torch.equal(joined.wkv, s.wkv)
    assert s.select(1).expand(4).batch_size == 4
    with pytest.raises(StateError, match="out of range"):
        s.select(3)
    with pytest.raises(StateError, match="integer row numbers"):
        s.select(torch.tensor([True, False, True]))
    with pytest.raises(StateError, match="positive integer"):
        s.select(0).expand(0)
    with pytest.raises(StateError, match="RecurrentState"):
        RecurrentState.cat([s, 5])


def test_save_load_and_bad_files(model, tmp_path):
    _, s = model(torch.randint(0, 50, (2, 4)))
    s.save(tmp_path / "s.state")
    back = RecurrentState.load(tmp_path / "s.state")
    assert back.arch == "rwkv7" and all(torch.equal(getattr(back, n), t) for n, t in s.tensor_fields().items())
    (tmp_path / "bad.state").write_bytes(b"not a state")
    with pytest.raises(StateError, match="bad.state"):
        RecurrentState.load(tmp_path / "bad.state")
    with pytest.raises(StateError, match="no such state file"):
        RecurrentState.load(tmp_path / "missing.state")


def test_model_normalises_the_state_it_is_given(model):
    """A bf16 WKV state (e.g. from a file) is used as float32, and the caller's state is not
    changed; anything but a RecurrentState is refused."""
    tokens = torch.randint(0, 50, (1, 6))
    _, s = model(tokens[:, :3])
    low = RecurrentState(arch=s.arch, att_shift=s.att_shift, wkv=s.wkv.bfloat16(), ffn_shift=s.ffn_shift)
    _, out = model(tokens[:, 3:], low)
    assert out.wkv.dtype == torch.float32 and low.wkv.dtype == torch.bfloat16
    with pytest.raises(StateError, match="RecurrentState"):
        model(tokens, [1, 2])


@dataclass
class CountedState(ModelState):
    """A state with non-tensor fields (kept in the file's metadata)."""

    x: torch.Tensor
    length: int = 0
    note: str = ""


def test_non_tensor_fields_survive_files_and_batch_operations(tmp_path):
    s = CountedState(arch="test", x=torch.arange(6.0).view(1, 2, 3), length=7, note="hi")
    s.save(tmp_path / "c.state")
    back = ModelState.load(tmp_path / "c.state")
    assert type(back) is CountedState and (back.length, back.note) == (7, "hi") and torch.equal(back.x, s.x)
    assert s.select(1).length == 7 and CountedState.cat([s.select(1), s.select(0)]).note == "hi"
    with pytest.raises(StateError, match="length"):
        CountedState.cat([s, CountedState(arch="test", x=s.x, length=8)])
    with pytest.raises(StateError, match="length"):
        CountedState(arch="test", x=s.x, length=8).check_compatible(s)


def test_state_files_written_before_non_tensor_fields_still_load(tmp_path):
    tensors = {"att_shift": torch.zeros(2, 1, 4), "wkv": torch.ones(2, 1, 1, 2, 2), "ffn_shift": torch.zeros(2, 1, 4)}
    save_file(tensors, str(tmp_path / "old.state"),
              metadata={"arch": "rwkv7", "state_class": "RecurrentState", "format": "rwkvkit-state"})
    back = RecurrentState.load(tmp_path / "old.state")
    assert type(back) is RecurrentState and back.arch == "rwkv7" and torch.equal(back.wkv, tensors["wkv"])
    save_file(tensors, str(tmp_path / "odd.state"),
              metadata={"arch": "rwkv7", "state_class": "NoSuchState", "format": "rwkvkit-state"})
    with pytest.raises(StateError, match="unknown state class"):
        RecurrentState.load(tmp_path / "odd.state")
