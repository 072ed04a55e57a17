"""chunked_cross_entropy, evaluate_loss and the `rwkvkit eval-ppl` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from official_files import make_rwkv7_state_dict
from rwkvkit.checkpoint import build_model
from rwkvkit.cli import main
from rwkvkit.errors import InputError
from rwkvkit.models.rwkv7 import RWKV7
from rwkvkit.tokenizer import WorldTokenizer
from rwkvkit.train import commands  # noqa: F401  (registers prepare / eval-ppl)
from rwkvkit.train.data import open_tokens, write_tokens
from rwkvkit.train.loss import chunked_cross_entropy, evaluate_loss




# ================================================================================================
# chunked_cross_entropy
# ================================================================================================
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_cross_entropy_equals_full_logits(seed, chunk):
    B, T, C, V = 3, 13, 16, 50
    h = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :4] = -100  # ignored positions
    y[2, -1] = -100

    loss, count = chunked_cross_entropy(h, w, y, chunk=chunk)
    assert loss.dtype == torch.float64 and count == B * T - 5
    gh, gw = torch.autograd.grad(loss * 0.37, (h, w))  # a grad_output other than 1

    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.T).reshape(-1, V), y.reshape(-1), reduction="sum")
    rh, rw = torch.autograd.grad(ref * 0.37, (h2, w2))
    assert rel_err(loss, ref) < 1e-10, f"seed {seed}"
    assert rel_err(gh, rh) < 1e-10 and rel_err(gw, rw) < 1e-10, f"seed {seed}"
    mean = F.cross_entropy((h2 @ w2.T).reshape(-1, V), y.reshape(-1))
    assert rel_err(loss / count, mean) < 1e-10

    with torch.no_grad():  # the plain path gives the same value
        nograd, c2 = chunked_cross_entropy(h, w, y, chunk=chunk)
    assert c2 == count and rel_err(nograd, ref) < 1e-10


def test_chunked_cross_entropy_partial_grads_and_l2wrap(seed):
    N, C, V = 20, 8, 30
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64)  # frozen head: only hidden needs a gradient
    y = torch.randint(0, V, (N,))
    y[3] = -100
    loss, count = chunked_cross_entropy(h, w, y, chunk=6, l2wrap=1e-4)
    (gh,) = torch.autograd.grad(loss / count, (h,))
    # reference: F.cross_entropy (mean) + the official L2Wrap gradient 1e-4/count * max logit
    logits = (h @ w.T).detach().requires_grad_()
    ref = F.cross_entropy(logits, y)
    (gl,) = torch.autograd.grad(ref, (logits,))
    top, arg = logits.detach().max(-1)
    valid = y != -100
    gl[valid, arg[valid]] += 1e-4 / count * top[valid]
    assert rel_err(loss / count, ref) < 1e-10
    assert rel_err(gh, gl @ w) < 1e-10, f"seed {seed}"


def test_chunked_cross_entropy_bf16_and_errors():
    h = torch.randn(2, 5, 16).bfloat16().requires_grad_()
    w = torch.randn(40, 16).bfloat16().requires_grad_()
    y = torch.randint(0, 40, (2, 5))
    loss, count = chunked_cross_entropy(h, w, y, chunk=3)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((h.float() @ w.float().T).reshape(-1, 40), y.reshape(-1), reduction="sum")
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2
    with pytest.raises(InputError):
        chunked_cross_entropy(h, w, y[:, :4])
    with pytest.raises(InputError):
        chunked_cross_entropy(h, w[:, :8], y)


# ================================================================================================
# evaluate_loss
# ================================================================================================
def tiny_model(vocab_size, dtype=torch.float64, seed=0):
    sd = make_rwkv7_state_dict(1, 64, 32, vocab_size, (8, 8, 8, 16), seed=seed)
    return build_model(RWKV7.config_from_state_dict(sd), sd, dtype=dtype)


def direct_loss(model, stream, eot=0):
    """One long forward over the whole stream (token 0 first), mean cross-entropy."""
    x = torch.tensor([[eot] + list(stream[:-1])])
    with torch.no_grad():
        logits, _ = model(x)
    return F.cross_entropy(logits[0].double(), torch.tensor(list(stream)), reduction="mean").item()


@pytest.mark.parametrize("ctx_len", [1, 7, 16, 1000])
def test_evaluate_loss_equals_one_long_forward(seed, ctx_len):
    model = tiny_model(97, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    stream = rng.integers(1, 97, size=75)
    stream[[10, 30, 74]] = 0
    res = evaluate_loss(model, stream, ctx_len=ctx_len, chunk=11)
    assert res.tokens == 75
    assert abs(res.loss - direct_loss(model, stream)) / res.loss < 1e-10, f"seed {seed}"
    assert math.isclose(res.perplexity, math.exp(res.loss))
    short = evaluate_loss(model, stream, ctx_len=ctx_len, max_tokens=40)
    assert short.tokens == 40 and abs(short.loss - direct_loss(model, stream[:40])) / short.loss < 1e-10


def test_evaluate_loss_batched_parts_start_at_documents(seed):
    model = tiny_model(97, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, 97, size=n)) + [0] for n in (9, 14, 5, 20, 11, 3)]
    stream = np.array(sum(docs, []))
    offsets = np.cumsum([0] + [len(d) for d in docs])[:-1]
    res = evaluate_loss(model, stream, doc_offsets=offsets, ctx_len=8, batch_size=3)
    assert res.tokens == len(stream)
    # cut at document starts near 1/3 and 2/3: each part is scored as a stream of its own
    cuts = [0, 25, 52, len(stream)]  # 68 tokens: the starts nearest 22 and 45
    assert set(cuts[1:-1]) <= set(offsets.tolist())
    parts = [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    total = sum(direct_loss(model, p) * len(p) for p in parts)
    assert abs(res.loss - total / len(stream)) / res.loss < 1e-10, f"seed {seed}"
    with pytest.raises(InputError):
        evaluate_loss(model, stream[:0])


# ================================================================================================
# the command
# ================================================================================================
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A saved tiny model with a small World vocabulary (bytes + a few words), and text data."""
    root = tmp_path_factory.mktemp("evalppl")
    vocab = root / "tiny_vocab.txt"
    lines = [f"{i + 1} {bytes([i])!r} 1" for i in range(256)]
    for j, word in enumerate([" the", " cat", "ing", " and", "The", "\n\n"]):
        lines.append(f"{257 + j} {word!r} {len(word.encode())}")
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = WorldTokenizer(vocab)
    assert tok.vocab_size == 320
    model = tiny_model(320, dtype=torch.float32, seed=4)
    model.tokenizer = tok
    model.save(root / "model")
    texts = [f"The cat number {i} was sitting and thinking about the mat.\n\nThe end." for i in range(6)]
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    stream = sum((tok.encode(t) + [0] for t in texts), [])
    direct = direct_loss(model, stream)
    return root, vocab, data, stream, direct


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_ppl_on_text_and_token_files(small_world, capsys):
    root, vocab, data, stream, direct = small_world
    model = root / "model"
    code, out, err = run_cli(["eval-ppl", "--model", model, data, "--ctx-len", "16", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == len(stream) and abs(res["loss"] - direct) < 1e-5
    assert math.isclose(res["perplexity"], math.exp(res["loss"]))

    for fmt in ("tokens", "binidx"):
        code, out, err = run_cli(["prepare", data, "-o", root / f"d_{fmt}", "--tokenizer", vocab,
                                  "--val-fraction", "0", "--format", fmt], capsys)
        assert code == 0, err
        path = root / (f"d_{fmt}.tokens" if fmt == "tokens" else f"d_{fmt}.bin")
        assert open_tokens(path)[:].tolist() == stream
        code, out, err = run_cli(["eval-ppl", "-m", model, path, "--ctx-len", "7"], capsys)
        assert code == 0, err
        values = dict(line.split(None, 1) for line in out.splitlines())
        assert set(values) == {"loss", "perplexity", "tokens", "time"}
        assert abs(float(values["loss"].split()[0]) - direct) < 1e-5
        assert values["tokens"] == f"{len(stream):,}" and "tokens/s" in values["time"]

    code, out, err = run_cli(["eval-ppl", "-m", model, root / "d_tokens", "--max-tokens", "10",
                              "--batch-size", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["tokens"] == 10


def test_cli_eval_ppl_errors_are_one_line(small_world, tmp_path, capsys):
    root, vocab, data, stream, direct = small_world
    model = root / "model"
    code, out, err = run_cli(["eval-ppl", "-m", model, tmp_path / "missing.jsonl"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and "missing.jsonl: no such file" in err

    write_tokens(tmp_path / "big", [[1, 2, 3]], vocab_size=65536)
    code, out, err = run_cli(["eval-ppl", "-m", model, tmp_path / "big.tokens"], capsys)
    assert code == 1 and err.count("\n") == 1 and "vocab_size 65536 is larger than the model's 320" in err

    write_tokens(tmp_path / "short", [[1, 2, 319]], vocab_size=320)
    (tmp_path / "short.json").write_text((tmp_path / "short.json").read_text().replace('"n_tokens":4', '"n_tokens":5'))
    code, out, err = run_cli(["eval-ppl", "-m", model, tmp_path / "short"], capsys)
    assert code == 1 and err.count("\n") == 1 and "short.tokens: 8 bytes" in err

    write_tokens(tmp_path / "oor", [[1, 2, 500]], vocab_size=1000, format="binidx")  # binidx: no vocab_size
    code, out, err = run_cli(["eval-ppl", "-m", model, tmp_path / "oor.bin"], capsys)
    assert code == 1 and err.count("\n") == 1 and "token id 500 is outside the vocabulary [0, 320)" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 1}\n')
    code, out, err = run_cli(["eval-ppl", "-m", model, bad], capsys)
    assert code == 1 and err.count("\n") == 1 and f"{bad}:2:" in err

    code, out, err = run_cli(["eval-ppl", "-m", model, data, "--ctx-len", "0"], capsys)
    assert code == 2
