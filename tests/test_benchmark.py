"""Inference measurements (rwkvkit.benchmark) and the ``rwkvkit bench`` command on a tiny file."""

from __future__ import annotations

import re

import pytest
import torch

from official_files import make_rwkv7_state_dict
from rwkvkit import load_model
from rwkvkit.benchmark import BenchResult, measure, weight_bytes_per_token
from rwkvkit.cli import main


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.pth"
    torch.save(make_rwkv7_state_dict(2, 64, 32, 300, (8, 8, 8, 16), seed=5, dtype=torch.bfloat16), path)
    return path


def test_bytes_per_token_count_each_weight_once(tiny_file):
    fp32 = load_model(tiny_file)
    params = sum(p.numel() for p in fp32.parameters())
    row = fp32.config.n_embd
    assert weight_bytes_per_token(fp32) == 4 * (params - fp32.emb.weight.numel() + row)
    assert weight_bytes_per_token(load_model(tiny_file, dtype=torch.bfloat16)) == weight_bytes_per_token(fp32) // 2
    int8 = load_model(tiny_file, quantize="int8")
    assert weight_bytes_per_token(int8) < weight_bytes_per_token(fp32) // 2
    # int8: the Int8Linear weights and scales, the low-rank matrices as the step's int8
    # copies (one byte each), everything else in float32, the embedding one row
    from rwkvkit.quantize import Int8Linear

    expected = 0
    for name, module in int8.named_modules():
        if isinstance(module, Int8Linear):
            expected += module.in_features * module.out_features + 4 * module.out_features
            continue
        for pname, t in module.named_parameters(recurse=False):
            low_rank = name.endswith(".att") and pname in {m + i for m in "vwag" for i in "12"}
            expected += t.numel() * (1 if low_rank else 4) if name != "emb" else 4 * row
    assert weight_bytes_per_token(int8) == expected


def test_measure_and_bound(tiny_file):
    result = measure(load_model(tiny_file), prefill_len=20, batch_sizes=(1, 3), steps=4, repeats=1, bandwidth=1e9)
    assert result.prefill_tokens_per_s > 0 and set(result.decode_tokens_per_s) == {1, 3}
    assert result.bound(1) == pytest.approx(1e9 / (result.weight_bytes + 2 * result.state_bytes))
    assert BenchResult("x", 1, 1.0).bound() != BenchResult("x", 1, 1.0).bound()  # no bandwidth: nan


def test_bench_command(tiny_file, capsys):
    argv = ["bench", str(tiny_file), "--quantize", "int8", "--prefill", "16", "--batch", "1,2",
            "--steps", "3", "--repeats", "1", "--threads", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "rwkv7 L2 D64 V300" in out and "weights  int8" in out
    assert re.search(r"^prefill T=16 +[\d,.]+ tokens/s$", out, re.M)
    assert re.search(r"^decode batch 1 +[\d,.]+ tokens/s", out, re.M) and re.search(r"^decode batch 2 ", out, re.M)


@pytest.mark.parametrize("argv, code, message", [
    (["bench", "/nonexistent/model.pth"], 1, "rwkvkit: error: /nonexistent/model.pth: no such file"),
    (["bench", "MODEL", "--device", "cuda:7"], 1, "rwkvkit: error: --device cuda:7"),
    (["bench", "MODEL", "--batch", "1,x"], 2, "comma-separated batch sizes"),
    (["bench", "MODEL", "--quantize", "int4"], 2, "invalid choice: 'int4'"),
])
def test_bench_errors_are_one_line(tiny_file, capsys, argv, code, message):
    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("a machine with CUDA")
    assert main([str(tiny_file) if a == "MODEL" else a for a in argv]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if code == 1:
        assert err.count("\n") == 1
