"""The bundled default model: small enough to ship, loads with its tokenizer, writes English."""

import math

import torch

from rwkvkit import generate, load_default_model
from rwkvkit.checkpoint import DEFAULT_MODEL_DIR
from rwkvkit.cli import main

TEXT = (
    "Once upon a time, there was a little boy named Tom. He liked to play in the garden with "
    "his dog. One day, the dog found a big red ball under a tree. Tom was very happy and they "
    "played together until the sun went down."
)


def test_ships_small_with_its_tokenizer():
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    model = load_default_model()
    cfg = model.config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == ("rwkv7", 8, 256, 8192)
    tok = model.tokenizer
    assert tok is not None and tok.vocab_size == 8192
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_predicts_english_far_better_than_chance():
    model = load_default_model()
    ids = model.tokenizer.encode(TEXT)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[0] + ids[:-1]]))
    loss = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids)).item()
    assert loss < 0.5 * math.log(8192), loss  # uniform guessing: 9.0 nats per token


def test_generates_words():
    model = load_default_model()
    text = generate(model, "Once upon a time", max_new_tokens=40, temperature=0)
    words = text.split()
    assert len(words) >= 15, text
    assert sum(w.strip('.,!?"\'').isalpha() for w in words) >= 0.8 * len(words), text


def test_cli_uses_it_without_model(capsys):
    assert main(["generate", "--max-tokens", "12", "--temperature", "0", "Once upon a time"]) == 0
    out = capsys.readouterr().out
    assert len(out.split()) >= 5, out
