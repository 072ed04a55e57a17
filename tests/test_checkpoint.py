"""Loading and saving: official .pth files, saved directories, and every bad-file case."""

import json
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from official_files import make_rwkv7_state_dict
from rwkvkit import load_model
from rwkvkit.checkpoint import detect_arch, inspect_checkpoint
from rwkvkit.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    StateDictError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)

UNUSED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
SIZES = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=100, lora=(8, 16, 24, 32))


@pytest.fixture
def official(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES, dtype=torch.bfloat16)
    path = tmp_path / "RWKV-x070-test.pth"
    torch.save(sd, path)
    return path, sd


def save_pth(tmp_path, sd, name="m.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_sizes_inferred_from_shapes(official):
    path, _ = official
    model = load_model(path)
    cfg = model.config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head, cfg.vocab_size, cfg.ffn_dim) == (
        "rwkv7", 2, 64, 32, 2, 100, 256,
    )
    assert cfg.lora == {"w": 8, "a": 16, "v": 24, "g": 32}
    assert model.tokenizer is None  # not a 65536-vocabulary World file
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_layer0_value_lora_is_optional(tmp_path):
    """Official files may carry the unused blocks.0.att.v0/v1/v2; both kinds load."""
    for with_v in (True, False):
        sd = make_rwkv7_state_dict(**SIZES, layer0_v=with_v)
        model = load_model(save_pth(tmp_path, sd))
        assert "blocks.0.att.v0" not in model.state_dict()
        assert model.config.lora["v"] == 24


def test_dtype_none_keeps_file_dtype(official):
    model = load_model(official[0], dtype=None)
    assert model.emb.weight.dtype == torch.bfloat16


def test_state_dict_is_official_layout(official):
    path, sd = official
    model = load_model(path, dtype=None)
    mine = model.state_dict()
    expected = set(sd) - UNUSED
    assert set(mine) == expected
    for k in expected:
        assert mine[k].shape == sd[k].shape and torch.equal(mine[k], sd[k]), k


def test_missing_keys_listed(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    del sd["blocks.1.att.k_k"], sd["blocks.0.ffn.x_k"]
    with pytest.raises(StateDictError, match=r"missing key\(s\): blocks.0.ffn.x_k, blocks.1.att.k_k"):
        load_model(save_pth(tmp_path, sd))


def test_missing_size_key_named(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    del sd["blocks.0.att.w1"]
    with pytest.raises(StateDictError, match=r"\.pth: missing key 'blocks.0.att.w1', needed to infer"):
        load_model(save_pth(tmp_path, sd))


def test_every_kind_of_key_fault_in_one_message(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    del sd["blocks.1.ffn.value.weight"]
    sd["blocks.1.att.extra"] = torch.zeros(3)
    sd["blocks.1.att.value.weight"] = torch.zeros(64, 63)
    with pytest.raises(StateDictError, match=r"missing key\(s\): blocks.1.ffn.value.weight; unexpected key\(s\): "
                                             r"blocks.1.att.extra; wrong shape\(s\): blocks.1.att.value.weight"):
        load_model(save_pth(tmp_path, sd))


def test_unexpected_keys_listed(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    sd["blocks.1.att.extra"] = torch.zeros(3)
    with pytest.raises(StateDictError, match=r"unexpected key\(s\): blocks.1.att.extra"):
        load_model(save_pth(tmp_path, sd))


def test_wrong_shape_named(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    sd["blocks.1.att.value.weight"] = torch.zeros(64, 63)
    with pytest.raises(StateDictError, match=r"blocks.1.att.value.weight expected \[64, 64\] found \[64, 63\]"):
        load_model(save_pth(tmp_path, sd))


def test_prefixed_keys_are_accepted(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES)
    sd = OrderedDict(("_forward_module." + k, v) for k, v in sd.items())
    assert load_model(save_pth(tmp_path, sd)).config.n_layer == 2


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd.__setitem__("blocks.0.ffn.s_emb.weight", torch.zeros(100, 32)), "DeepEmbed"),
        (lambda sd: sd.clear() or sd.update({"foo": torch.zeros(1)}), "not an RWKV checkpoint"),
    ],
)
def test_unsupported_variants(tmp_path, mutate, match):
    sd = make_rwkv7_state_dict(**SIZES)
    mutate(sd)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        load_model(save_pth(tmp_path, sd))


def test_detect_older_architectures():
    C = 64
    base = {"emb.weight": torch.zeros(10, C), "blocks.0.ln1.weight": torch.zeros(C)}
    v4 = {**base, "blocks.0.att.time_first": torch.zeros(C), "blocks.0.att.time_decay": torch.zeros(C)}
    with pytest.raises(UnsupportedArchitectureError, match="RWKV-4"):
        detect_arch(v4)
    v51 = {**base, "blocks.0.att.ln_x.weight": torch.zeros(C), "blocks.0.att.gate.weight": torch.zeros(C, C),
           "blocks.0.att.time_decay": torch.zeros(1, 1)}
    with pytest.raises(UnsupportedArchitectureError, match="5.0/5.1"):
        detect_arch(v51)
    v52 = {**v51, "blocks.0.att.time_decay": torch.zeros(1, C)}
    assert detect_arch(v52) == "rwkv5"
    v6 = {**base, "blocks.0.att.time_maa_x": torch.zeros(1, 1, C)}
    assert detect_arch(v6) == "rwkv6"
    with pytest.raises(UnsupportedArchitectureError, match="unknown RWKV variant"):
        detect_arch({**base, "blocks.0.att.something": torch.zeros(1)})


def test_missing_empty_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_model(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_corrupt_and_truncated(tmp_path, official):
    data = official[0].read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "trunc.pth")
    (tmp_path / "head.pth").write_bytes(data[:1000])  # torch's long message: its first sentence
    with pytest.raises(CheckpointError, match=r"corrupt or truncated checkpoint \([^.()]*\)$"):
        load_model(tmp_path / "head.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_model(tmp_path / "garbage.pth")


class _Payload:
    """A pickle that would create a file when unpickled by a trusting loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused.*\(it references \w+\.mkdir\); nothing from it"):
        load_model(path)
    assert not marker.exists()
    # Also a legacy (non-zip) pickle file.
    with open(tmp_path / "evil_legacy.pth", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


def test_not_a_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found list"):
        load_model(tmp_path / "list.pth")
    torch.save({"emb.weight": torch.zeros(2), "n": 3}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="key 'n' holds int"):
        load_model(tmp_path / "int.pth")


def test_save_and_load_directory(tmp_path, official, seed):
    model = load_model(official[0])
    out = model.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "rwkv7" and config["lora"] == {"w": 8, "a": 16, "v": 24, "g": 32}
    again = load_model(out)
    tokens = torch.randint(0, 100, (2, 9))
    assert torch.equal(model(tokens)[0], again(tokens)[0])
    # The safetensors file alone, with config.json beside it.
    assert torch.equal(model(tokens)[0], load_model(out / "model.safetensors")(tokens)[0])


def test_cpu_float32_matrices_are_column_major(tmp_path, official, seed):
    """load_model stores float32 nn.Linear weights transposed on the CPU (decoding reads them
    faster); the values, the saved files and the outputs are those of the plain layout."""
    model = load_model(official[0])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    plain = load_model(official[0])
    for m in plain.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.contiguous()
    tokens = torch.randint(0, 100, (2, 9))
    # The two layouts take different float32 matrix kernels, which round differently: the step's
    # logits differ by 3e-7 typically and 1.3e-6 at worst seen (over 160 seeds; CI failed at 1.2e-6);
    # a wrong layout gives errors of order 1.
    assert rel_err(model(tokens)[0], plain(tokens)[0]) < 1e-5
    state = model.init_state(2)
    plain_state = plain.init_state(2)
    with torch.no_grad():
        assert rel_err(model.step_(tokens[:, 0], state), plain.step_(tokens[:, 0], plain_state)) < 1e-5
    assert all(t.is_contiguous() for t in load_file(model.save(tmp_path / "s") / "model.safetensors").values())
    bf16 = load_model(official[0], dtype=torch.bfloat16)
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, torch.nn.Linear))


def test_save_with_tokenizer_and_default_state(tmp_path, seed):
    sd = make_rwkv7_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=65536, lora=(8, 8, 8, 8))
    model = load_model(save_pth(tmp_path, sd))
    assert model.tokenizer is not None and model.tokenizer.kind == "world"
    _, state = model(torch.randint(0, 65536, (1, 10)))
    model.default_state = state
    out = model.save(tmp_path / "saved")
    again = load_model(out)
    assert again.tokenizer is not None and again.tokenizer.encode("Hello") == model.tokenizer.encode("Hello")
    assert torch.equal(again.init_state(2).wkv[:, 1], state.wkv[:, 0])
    tokens = torch.randint(0, 65536, (1, 4))
    assert rel_err(again(tokens)[0], model(tokens, state)[0]) == 0


def test_bad_config_json(tmp_path, official):
    out = load_model(official[0]).save(tmp_path / "saved")
    (out / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"arch": "rwkv7", "n_layer": 2, "n_embd": 64}))
    with pytest.raises(ConfigError, match="missing field"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"arch": "rwkv99", "n_layer": 2, "n_embd": 64, "vocab_size": 100}))
    with pytest.raises(UnsupportedArchitectureError, match="rwkv99"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"arch": "rwkv7", "n_layer": 3, "n_embd": 64, "vocab_size": 100,
                                                 "head_size": 32, "lora": {"w": 8, "a": 16, "v": 24, "g": 32}}))
    with pytest.raises(StateDictError, match="missing key"):
        load_model(out)
    good = json.loads(json.dumps(load_model(official[0]).config.to_dict()))
    bad_fields = [
        ({"head_sizee": 64}, "unknown field.*'head_sizee'"),  # a misspelt field is not dropped
        ({"ffn_dim": -5}, r"config.json: ffn_dim must be a non-negative integer \(0: the default\), got -5"),
        ({"ffn_dim": "512"}, "ffn_dim must be a non-negative integer .*, got '512'"),
        ({"lora": [1, 2]}, r"lora must be a dict of low-rank sizes by name, got \[1, 2\]"),
        ({"lora": {"w": True}}, "lora size 'w' must be a positive integer, got True"),
        ({"arch": ["rwkv7"]}, "arch must be a string"),
        ({"format_version": 99}, "format_version 99; this rwkvkit reads 1 to 1"),
        ({"tokenizer": "world"}, "tokenizer must be an object"),
    ]
    for change, message in bad_fields:
        (out / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=message):
            load_model(out)


def test_bad_device_and_dtype(official):
    for device, message in [("foo", "device 'foo': not a torch device"), ("meta", "device meta holds no values")]:
        with pytest.raises(InputError, match=message):
            load_model(official[0], device=device)
    for dtype in ("bf16", torch.int64):
        with pytest.raises(InputError, match=f"dtype must be a floating-point torch.dtype .*got {dtype!r}"):
            load_model(official[0], dtype=dtype)


def test_misshapen_size_keys_are_named(tmp_path, official):
    """The tensors a config is inferred from must have two dimensions; the error names the file,
    the key and its shape (not an unpacking error from inside the model class)."""
    sd = dict(official[1])
    sd["blocks.0.att.r_k"] = sd["blocks.0.att.r_k"].flatten()
    torch.save(sd, tmp_path / "bad.pth")
    n = sd["blocks.0.att.r_k"].numel()
    with pytest.raises(StateDictError, match=rf"bad\.pth: key 'blocks\.0\.att\.r_k' has shape \[{n}\], expected 2 dimensions"):
        load_model(tmp_path / "bad.pth")


def test_truncated_safetensors(tmp_path, official):
    out = load_model(official[0]).save(tmp_path / "saved")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out)


def test_save_leaves_no_temporary_files(tmp_path, official):
    model = load_model(official[0])
    out = model.save(tmp_path / "saved")
    model.save(out)  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_inspect(official):
    path, sd = official
    info = inspect_checkpoint(path)
    used = sum(v.numel() for k, v in sd.items() if k not in UNUSED)
    assert info["parameters"] == used
    assert info["arch"] == "rwkv7" and info["n_head"] == 2 and info["dtype"] == "bfloat16"
    # per layer: att_shift C + ffn_shift C + wkv H*N*N floats
    assert info["state_bytes_fp32"] == 4 * 2 * (64 + 64 + 2 * 32 * 32)
    assert info["tuned_state"] is False


def test_more_bad_files(tmp_path):
    """A text file, integer weights, inconsistent time_state shapes: specific errors."""
    (tmp_path / "a.pth").write_text("hello world\n")
    with pytest.raises(CheckpointError, match="a.pth"):
        load_model(tmp_path / "a.pth")
    sd = make_rwkv7_state_dict(**SIZES)
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 64, dtype=torch.int64)
    with pytest.raises(StateDictError, match=r"floating-point weights: blocks.1.att.key.weight"):
        load_model(save_pth(tmp_path, sd))
    sd = make_rwkv7_state_dict(**SIZES)
    sd["blocks.0.att.time_state"] = torch.zeros(2, 32, 32)
    sd["blocks.1.att.time_state"] = torch.zeros(2, 32, 16)
    with pytest.raises(StateDictError, match="blocks.1.att.time_state"):
        load_model(save_pth(tmp_path, sd))


def test_dtype_none_with_mixed_file_dtypes_runs(tmp_path):
    sd = make_rwkv7_state_dict(**SIZES, dtype=torch.bfloat16)
    sd["ln_out.weight"] = sd["ln_out.weight"].float()
    model = load_model(save_pth(tmp_path, sd), dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))[0]).all()
