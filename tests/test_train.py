"""Training: the recipe (groups, schedule, L2Wrap), the loop, checkpoints, resume, export,
data parallelism (2 processes, gloo) and the `rwkvkit train` command."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkvkit import load_model
from rwkvkit.cli import main
from rwkvkit.config import ModelConfig
from rwkvkit.errors import ConfigError
from rwkvkit.models.registry import model_class
from rwkvkit.train import checkpointing as ckpt
from rwkvkit.train.config import PRESETS, TrainConfig, load_config
from rwkvkit.train.data import write_tokens
from rwkvkit.train.loop import enable_gradient_checkpointing, read_metrics, train
from rwkvkit.train.loss import chunked_cross_entropy
from rwkvkit.train.recipe import LRSchedule, build_model, build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
TEXT = ("Once upon a time, a small fox found a red ball in the tall grass. "
        "She rolled it to her friend the owl, who laughed and rolled it back. ")




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A character-level token file of repeated text (vocab 128) and its validation split."""
    d = tmp_path_factory.mktemp("data")
    docs = [list((TEXT * 3).encode()) for _ in range(60)]
    write_tokens(d / "text", docs, vocab_size=128)
    write_tokens(d / "text.val", docs[:6], vocab_size=128)
    return d / "text.tokens"


def make_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(preset="tiny", train_data=str(data), total_steps=10, out_dir=str(out), progress=False,
                  plot=False, tensorboard=False, eval_every=0, save_every=0, val_data="", log_every=10_000)
    values.update(kw)
    return load_config(None, [], **values)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]


def env(**extra) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **extra)
    return e


def tiny_model(arch: str, n_layer: int = 2, vocab: int = 100) -> torch.nn.Module:
    lora = {"rwkv7": {"w": 8, "a": 8, "v": 8, "g": 8}, "rwkv6": {"maa": 8, "decay": 8}, "rwkv5": {}}[arch]
    return build_model(ModelConfig(arch=arch, n_layer=n_layer, n_embd=64, vocab_size=vocab, head_size=32, lora=lora))


# -- parameter groups ----------------------------------------------------------------------------
def groups_by_name(model, wd=0.1) -> dict[str, dict]:
    out = {}
    for g in param_groups(model, wd):
        for n in g["param_names"]:
            out[n] = g
    return out


def test_param_groups_rwkv7():
    model = tiny_model("rwkv7")
    by_name = groups_by_name(model)
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    big = {"emb.weight", "head.weight"}
    for i in range(2):
        big |= {f"blocks.{i}.att.{m}.weight" for m in ("receptance", "key", "value", "output")}
        big |= {f"blocks.{i}.ffn.{m}.weight" for m in ("key", "value")}
    decay = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert decay == big
    double = {n for n, g in by_name.items() if g["lr_scale"] == 2.0}
    assert double == {"blocks.0.att.w0", "blocks.1.att.w0"}
    for n, g in by_name.items():
        if n not in big and n not in double:
            assert g["weight_decay"] == 0.0 and g["lr_scale"] == 1.0, n
    # the low-rank matrices, LayerNorm / GroupNorm weights and the vectors get no decay
    for n in ("blocks.0.att.w1", "blocks.1.att.v2", "blocks.0.att.g1", "blocks.0.ln1.weight",
              "blocks.0.att.ln_x.weight", "blocks.0.att.x_r", "blocks.0.att.r_k", "ln_out.weight"):
        assert by_name[n]["weight_decay"] == 0.0 and by_name[n]["lr_scale"] == 1.0


def test_param_groups_rwkv6():
    model = tiny_model("rwkv6")
    by_name = groups_by_name(model)
    decay = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    expect = {"emb.weight", "head.weight"}
    for i in range(2):
        expect |= {f"blocks.{i}.att.{m}.weight" for m in ("receptance", "key", "value", "gate", "output")}
        expect |= {f"blocks.{i}.ffn.{m}.weight" for m in ("key", "receptance", "value")}
    assert decay == expect
    assert {n for n, g in by_name.items() if g["lr_scale"] == 2.0} == {"blocks.0.att.time_decay", "blocks.1.att.time_decay"}
    for n in ("blocks.0.att.time_decay_w1", "blocks.0.att.time_decay_w2", "blocks.0.att.time_maa_w1",
              "blocks.0.att.time_maa_w2", "blocks.0.att.time_maa_x", "blocks.0.att.time_faaaa",
              "blocks.0.ffn.time_maa_k"):
        assert by_name[n]["lr_scale"] == 1.0 and by_name[n]["weight_decay"] == 0.0, n


def test_param_groups_rwkv5():
    model = tiny_model("rwkv5")
    by_name = groups_by_name(model)
    assert {n for n, g in by_name.items() if g["lr_scale"] == 2.0} == {"blocks.0.att.time_decay", "blocks.1.att.time_decay"}
    for n in ("blocks.0.att.time_mix_k", "blocks.0.att.time_faaaa", "blocks.1.ffn.time_mix_r", "blocks.0.ln0.weight"):
        assert by_name[n]["lr_scale"] == 1.0 and by_name[n]["weight_decay"] == 0.0, n
    assert by_name["blocks.1.att.gate.weight"]["weight_decay"] == 0.1


def test_optimizer_defaults_and_group_lrs():
    model = tiny_model("rwkv7")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-18
        assert g["weight_decay"] == (0.01 if g["group"] == "decay" else 0.0)
    sched = LRSchedule(opt, lr_init=1e-3, lr_final=1e-4, warmup_steps=0, total_steps=100)
    base = sched.apply()
    for g in opt.param_groups:
        assert g["lr"] == base * g["lr_scale"]


# -- schedule ------------------------------------------------------------------------------------
def test_lr_schedule_values():
    s = LRSchedule(None, lr_init=6e-4, lr_final=6e-5, warmup_steps=10, total_steps=110)
    f = 0.1

    def cosine(progress):
        return 6e-4 * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))

    assert s.lr_at(0) == pytest.approx(6e-4 * 0.01, rel=1e-12)
    assert s.lr_at(5) == pytest.approx(6e-4 * (0.01 + 0.99 * 0.5), rel=1e-12)
    assert s.lr_at(10) == pytest.approx(6e-4, rel=1e-12)
    assert s.lr_at(60) == pytest.approx(cosine(0.5), rel=1e-12)
    assert s.lr_at(35) == pytest.approx(cosine(0.25), rel=1e-12)
    assert s.lr_at(110) == pytest.approx(6e-5, rel=1e-12)
    assert s.lr_at(500) == pytest.approx(6e-5, rel=1e-12)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # resumable: the state is just the step
    s2 = LRSchedule(None, lr_init=6e-4, lr_final=6e-5, warmup_steps=10, total_steps=110)
    for _ in range(37):
        s.step()
    s2.load_state_dict(s.state_dict())
    assert s.state_dict() == {"step": 37} and s2.apply() == s.apply() == s.lr_at(37)


# -- L2Wrap --------------------------------------------------------------------------------------
def test_l2wrap_gradient_is_the_official_term(seed):
    B, T, C, V = 2, 7, 16, 50
    h = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, C, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, V, (B, T))
    loss_sum, count = chunked_cross_entropy(h, w, y, chunk=5, l2wrap=1e-4)
    (loss_sum / count).backward()

    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = h2 @ w2.T
    ce = F.cross_entropy(logits.view(-1, V), y.view(-1))
    assert loss_sum.item() / count == pytest.approx(ce.item(), rel=1e-12)  # L2Wrap leaves the value alone
    # the official term: d/dlogits += 1e-4 / (B*T) * max_logit at each token's argmax
    extra = torch.zeros_like(logits)
    top, arg = logits.detach().max(-1, keepdim=True)
    extra.scatter_(-1, arg, top * 1e-4 / (B * T))
    logits.backward(torch.autograd.grad(ce, logits, retain_graph=True)[0] + extra)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    # and it is not nothing
    h3 = h.detach().clone().requires_grad_()
    s3, _ = chunked_cross_entropy(h3, w.detach(), y, chunk=5, l2wrap=0.0)
    (s3 / count).backward()
    assert not torch.allclose(h3.grad, h.grad)


# -- init ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6", "rwkv7"])
def test_single_layer_init_is_finite(arch):
    model = tiny_model(arch, n_layer=1)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    logits, _ = model(torch.randint(0, 100, (1, 5)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6", "rwkv7"])
def test_big_matrix_gains(arch):
    """Orthogonal gains of the official generate_init_weight (an orthogonal matrix with gain g
    has all singular values g): tall matrices get sqrt(rows/cols) * scale."""
    model = tiny_model(arch, vocab=1024)
    sv = lambda w: torch.linalg.svdvals(w.detach().double())  # noqa: E731
    tall = math.sqrt(model.config.ffn_dim / 64)
    torch.testing.assert_close(sv(model.blocks[1].ffn.key.weight), torch.full((64,), tall, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(sv(model.blocks[0].att.key.weight), torch.full((64,), 0.1, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert model.emb.weight.abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6", "rwkv7"])
def test_head_gain_is_official(arch):
    model = tiny_model(arch, vocab=1024)
    torch.testing.assert_close(torch.linalg.svdvals(model.head.weight.detach().double()),
                               torch.full((64,), 0.5 * math.sqrt(1024 / 64), dtype=torch.float64), rtol=1e-5, atol=0)


def test_presets_have_the_released_sizes():
    for preset, layers, width in (("0.1b", 12, 768), ("0.4b", 24, 1024)):
        cfg = load_config(None, [], preset=preset, train_data="x", total_steps=1, vocab_size=65536)
        assert (cfg.n_layer, cfg.n_embd, cfg.head_size) == (layers, width, 64)
        assert cfg.lora == {"w": 64, "a": 64, "v": 32, "g": 128}
        with torch.device("meta"):
            model = model_class("rwkv7")(ModelConfig(**cfg.model_config_dict(65536)))
        n = sum(p.numel() for p in model.parameters())
        V, C, L, D = 65536, width, layers, 64 + 64 + 32 + 128
        official = 2 * V * C + 4 * C + L * (19 * C + 12 * C * C + 2 * C * D)
        assert n == official - (C + 2 * C * 32)  # less layer 0's unused v0/v1/v2
    assert round((official - C - 64 * C) / 1e6, 2) == 450.77  # the README's 0.4B count
    for arch in ("rwkv5", "rwkv6"):
        cfg = load_config(None, [], preset="0.1b", arch=arch, train_data="x", total_steps=1)
        assert (cfg.n_layer, cfg.n_embd) == (12, 768)


# -- the loop ------------------------------------------------------------------------------------
def test_tiny_model_learns(data, tmp_path):
    tokens = np.fromfile(data, dtype=np.uint16)
    p = np.array(list(Counter(tokens.tolist()).values()), dtype=np.float64)
    p /= p.sum()
    unigram = float(-(p * np.log(p)).sum())
    cfg = make_cfg(data, tmp_path / "run", total_steps=150, eval_every=50, val_data="auto", eval_tokens=1024,
                   plot=True)
    result = train(cfg)
    assert result.stopped == "done" and result.step == 150
    ls = losses(tmp_path / "run")
    assert len(ls) == 150
    assert ls[0] > 0.9 * math.log(128)  # starts near uniform
    assert np.mean(ls[-10:]) < 0.25 * unigram, (np.mean(ls[-10:]), unigram)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = recs[0]
    assert set(first) >= {"type", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "time"}
    assert first["tokens"] == 64 * 4
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [50, 100, 150]
    assert evals[-1]["val_loss"] < 0.25 * unigram
    png = tmp_path / "run" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["total_steps"] == 150


def test_exact_resume_is_bitwise(data, tmp_path):
    kw = dict(total_steps=12, grad_accum=2, micro_batch=2, eval_every=4, val_data="auto", eval_tokens=512)
    full = train(make_cfg(data, tmp_path / "a", **kw))
    part = train(make_cfg(data, tmp_path / "b", stop_at_step=5, **kw))
    assert part.stopped == "stop_at_step" and part.step == 5
    assert ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000005"
    rest = train(make_cfg(data, tmp_path / "b", **kw), resume=True)
    assert rest.step == 12
    assert [l for _, l in part.losses + rest.losses] == [l for _, l in full.losses]  # bitwise
    ra = read_metrics(tmp_path / "a" / "metrics.jsonl")
    rb = read_metrics(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb)  # losses, lrs, grad norms, validation losses
    ma = load_model(tmp_path / "a" / "checkpoints" / "step-00000012")
    mb = load_model(tmp_path / "b" / "checkpoints" / "step-00000012")
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n
    sa = ckpt.load_training_state(tmp_path / "a" / "checkpoints" / "step-00000012").state
    sb = ckpt.load_training_state(tmp_path / "b" / "checkpoints" / "step-00000012").state
    for name, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][name][k]), (name, k)


def test_resume_and_fresh_start_guards(data, tmp_path):
    train(make_cfg(data, tmp_path / "r", total_steps=3))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(make_cfg(data, tmp_path / "r", total_steps=3))
    with pytest.raises(ConfigError, match="model.n_layer"):
        train(make_cfg(data, tmp_path / "r", total_steps=6, n_layer=3), resume=True)
    with pytest.raises(Exception, match="no checkpoint"):
        train(make_cfg(data, tmp_path / "empty", total_steps=3), resume=True)
    done = train(make_cfg(data, tmp_path / "r", total_steps=3), resume=True)  # nothing left to do
    assert done.step == 3 and done.losses == []


def test_init_from_starts_with_those_weights(data, tmp_path):
    a = train(make_cfg(data, tmp_path / "a", total_steps=5))
    start = ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints")
    b = train(make_cfg(data, tmp_path / "b", total_steps=1, init_from=str(start), n_layer=0, n_embd=0))
    model = load_model(start)
    from rwkvkit.train.data import TokenSampler, open_tokens

    x, y = TokenSampler(open_tokens(data), 64, 4).batch(0)
    with torch.no_grad():
        s, n = chunked_cross_entropy(model.hidden(x)[0], model.head.weight, y)
    assert b.losses[0][1] == pytest.approx(float(s) / n, rel=1e-6)
    assert b.losses[0][1] < a.losses[0][1]  # starts where run "a" left off, not from scratch
    with pytest.raises(ConfigError, match="model.n_layer"):
        train(make_cfg(data, tmp_path / "c", total_steps=1, init_from=str(start), n_layer=3))


def test_gradient_checkpointing_gives_the_same_losses(data, tmp_path):
    a = train(make_cfg(data, tmp_path / "a", total_steps=4))
    b = train(make_cfg(data, tmp_path / "b", total_steps=4, grad_checkpoint=True))
    assert [l for _, l in a.losses] == [l for _, l in b.losses]
    model = tiny_model("rwkv6")
    x = torch.randint(0, 100, (2, 9))
    ref = model(x)[0]
    enable_gradient_checkpointing(model)
    out = model(x)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert model.blocks[0].att.key.weight.grad is not None


# -- checkpoints ---------------------------------------------------------------------------------
def test_keep_last_and_latest_pointer(data, tmp_path):
    train(make_cfg(data, tmp_path / "k", total_steps=9, save_every=2, keep_last=2))
    root = tmp_path / "k" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000008", "step-00000009"]
    assert (root / "latest").read_text().strip() == "step-00000009"
    assert ckpt.latest_checkpoint(root) == root / "step-00000009"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    model = load_model(ckpt.latest_checkpoint(root))
    assert model.config.n_layer == 2 and model.config.vocab_size == 128
    state = ckpt.load_training_state(root / "step-00000009")
    assert state.step == 9 and state.state["schedule"] == {"step": 9}
    # a pointer to a vanished directory falls back to the newest complete one
    (root / "latest").write_text("step-00000010\n")
    assert ckpt.latest_checkpoint(root) == root / "step-00000009"


def test_training_state_holds_no_pickle(data, tmp_path):
    train(make_cfg(data, tmp_path / "p", total_steps=2))
    d = ckpt.latest_checkpoint(tmp_path / "p" / "checkpoints")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "training_state.json",
                                                     "training_state.safetensors"]
    doc = json.loads((d / "training_state.json").read_text())
    assert doc["format"] == "rwkvkit-train-state"
    assert set(doc["state"]["rng"][0]) == {"python", "numpy", "torch"}


def test_kill_9_leaves_a_loadable_checkpoint(data, tmp_path, seed):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rwkvkit", "train", "--preset", "tiny", "--data", str(data), "--steps", "100000",
           "--out", str(out), "--no-progress", "--set", "save_every=1", "--set", "keep_last=2",
           "--set", "eval_every=0", "--set", "plot=false", "--set", 'val_data=""']
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = out / "checkpoints"
    try:
        deadline = time.time() + 60
        while not (root / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None
    assert (root / (root / "latest").read_text().strip()).is_dir()  # never a pointer to a partial directory
    for d in ckpt.list_checkpoints(root):  # every named checkpoint is complete
        load_model(d)
        ckpt.load_training_state(d)
    step = ckpt.load_training_state(latest).step
    # and the run continues from it
    cfg = make_cfg(data, out, total_steps=100000, stop_at_step=step + 1)
    result = train(cfg, resume=True)
    assert result.step == step + 1


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "rwkvkit", "train", "--preset", "tiny", "--data", str(data), "--steps", "100000",
           "--out", str(out), "--no-progress", "--set", "save_every=0", "--set", "eval_every=0",
           "--set", "log_every=1", "--set", 'val_data=""', "--set", "plot=false"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped (SIGTERM)" in stdout
    last = read_metrics(metrics)[-1]["step"]
    assert ckpt.load_training_state(ckpt.latest_checkpoint(out / "checkpoints")).step == last


# -- export --------------------------------------------------------------------------------------
def test_export_official_roundtrip(tmp_path, seed):
    model = tiny_model("rwkv7", vocab=120)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randint(0, 120, (2, 11))
    ref = model(x)[0]

    p32 = ckpt.export_official(model, tmp_path / "m32.pth", dtype=torch.float32)
    sd = torch.load(p32, weights_only=True)
    keys = list(sd)
    assert keys.index("blocks.0.att.v0") == keys.index("blocks.0.att.a2") + 1
    assert keys[keys.index("blocks.0.att.v0"):][:3] == ["blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"]
    assert sd["blocks.0.att.v1"].shape == sd["blocks.1.att.v1"].shape
    assert sd["blocks.0.att.v2"].shape == sd["blocks.1.att.v2"].shape
    assert sd["blocks.0.att.v0"].shape == (1, 1, 64)
    assert set(sd) == set(model.state_dict()) | {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    loaded = load_model(p32)
    assert loaded.config.lora == model.config.lora
    torch.testing.assert_close(loaded(x)[0], ref, rtol=0, atol=0)

    p16 = ckpt.export_official(model, tmp_path / "m16.pth")  # bf16 like the releases
    sd16 = torch.load(p16, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd16.values())
    rounded = tiny_model("rwkv7", vocab=120)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(load_model(p16)(x)[0], rounded(x)[0], rtol=0, atol=0)

    v6 = tiny_model("rwkv6")
    sd6 = ckpt.official_state_dict(v6, None)
    assert list(sd6) == list(v6.state_dict())


def test_cli_export_pth_from_a_run(data, tmp_path, capsys):
    train(make_cfg(data, tmp_path / "run", total_steps=2))
    out = tmp_path / "model.pth"
    assert main(["export-pth", str(tmp_path / "run"), str(out), "--dtype", "fp32"]) == 0
    a = load_model(out)
    b = load_model(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    x = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


# -- data parallel -------------------------------------------------------------------------------
def _torchrun(data: Path, out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rwkvkit", "train", "--preset", "tiny", "--data", str(data), "--steps", str(steps),
           "--out", str(out), "--no-progress", "--set", "micro_batch=1", "--set", "save_every=0",
           "--set", "eval_every=0", "--set", "plot=false", "--set", 'val_data=""', *extra]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_gloo_equals_grad_accum(data, tmp_path):
    """2 ranks x 1 micro-batch == 1 process accumulating the same 2 micro-batches."""
    _torchrun(data, tmp_path / "ddp", 5)
    single = train(make_cfg(data, tmp_path / "one", total_steps=5, micro_batch=1, grad_accum=2))
    ddp = losses(tmp_path / "ddp")
    one = [l for _, l in single.losses]
    assert len(ddp) == len(one) == 5
    for a, b in zip(ddp, one):
        assert abs(a - b) / abs(b) < 1e-6, (ddp, one)
    ra, rb = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    for a, b in zip(ra, rb):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"]


@pytest.mark.slow
def test_two_process_fsdp_equals_grad_accum_and_resumes(data, tmp_path):
    _torchrun(data, tmp_path / "fsdp", 4, "--set", 'distributed="fsdp"', "--stop-at", "2")
    _torchrun(data, tmp_path / "fsdp", 4, "--set", 'distributed="fsdp"', "--resume")
    single = train(make_cfg(data, tmp_path / "one", total_steps=4, micro_batch=1, grad_accum=2))
    got = losses(tmp_path / "fsdp")
    assert len(got) == 4
    for a, (_, b) in zip(got, single.losses):
        assert abs(a - b) / abs(b) < 1e-6
    model = load_model(ckpt.latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    assert model.config.n_layer == 2


# -- config and the command ----------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_sections_presets_and_overrides(data, tmp_path):
    toml = write(tmp_path / "c.toml", f"""
[model]
preset = "tiny"
n_layer = 3
[data]
train_data = "{data}"
ctx_len = 32
[optim]
total_tokens = 10_000
""")
    cfg = load_config(toml)
    assert (cfg.n_layer, cfg.n_embd, cfg.ctx_len) == (3, 64, 32)  # file over preset
    assert cfg.lr_init == PRESETS["tiny"]["*"]["lr_init"]  # preset over defaults
    assert cfg.steps() == math.ceil(10_000 / (32 * 4))
    cfg = load_config(toml, ["data.ctx_len=16", "betas=[0.9, 0.95]", "lora={w = 8}", "out_dir=runs/x y"],
                      total_steps=7, total_tokens=0)
    assert (cfg.ctx_len, cfg.betas, cfg.lora["w"], cfg.out_dir, cfg.steps()) == (16, [0.9, 0.95], 8, "runs/x y", 7)
    for example in sorted((REPO / "examples").glob("train_*.toml")):
        assert isinstance(load_config(example), TrainConfig)


@pytest.mark.parametrize("body, key", [
    ('[data]\nctx_lenn = 5', "data.ctx_lenn"),
    ('[data]\nctx_len = "long"', "data.ctx_len"),
    ("[optim]\nctx_len = 5", "optim.ctx_len"),
    ("[optim]\nbetas = [0.9]", "optim.betas"),
    ('[model]\npreset = "huge"', "model.preset"),
    ("[model]\nlora = {q = 4}", "model.lora"),
    ("[train]\nprecision = 'fp8'", "train.precision"),
    ("[checkpoint]\nkeep_last = 0", "checkpoint.keep_last"),
    ("[log]\nplot = 1", "log.plot"),
])
def test_config_errors_name_the_key(tmp_path, body, key):
    toml = write(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(toml, [], n_layer=2, n_embd=64, head_size=32, train_data="x", total_steps=3)


def cli_error(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkvkit: error: "), err
    return lines[0]


def test_cli_train_errors_are_one_line(data, tmp_path, capsys):
    good = f'[model]\npreset = "tiny"\n[data]\ntrain_data = "{data}"\n[optim]\ntotal_steps = 2\n'
    line = cli_error(["train", write(tmp_path / "a.toml", good.replace("\n[optim]", "\nmicro_batchh = 2\n[optim]"))],
                     capsys)
    assert "data.micro_batchh" in line and "micro_batch" in line
    line = cli_error(["train", write(tmp_path / "b.toml", good.replace("[optim]", "[optim]\nlr_init = 'fast'"))], capsys)
    assert "optim.lr_init" in line
    line = cli_error(["train", write(tmp_path / "c.toml", good.replace(str(data), str(tmp_path / "nope.tokens")))],
                     capsys)
    assert "data.train_data" in line and "nope.tokens" in line
    line = cli_error(["train", write(tmp_path / "d.toml", good), "--set", "warmup=3"], capsys)
    assert "'warmup'" in line and "warmup_steps" in line
    line = cli_error(["train", write(tmp_path / "e.toml", "[data\nctx_len = 3")], capsys)
    assert "e.toml" in line and "TOML" in line
    line = cli_error(["train", tmp_path / "missing.toml"], capsys)
    assert "missing.toml" in line


def test_cli_train_runs(data, tmp_path, capsys):
    toml = write(tmp_path / "run.toml", f"""
[model]
preset = "tiny"
[data]
train_data = "{data}"
micro_batch = 2
[optim]
total_steps = 100
[eval]
eval_every = 3
eval_tokens = 256
[log]
progress = false
log_every = 2
tensorboard = false
""")
    assert main(["train", str(toml), "--steps", "6", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "finished at step 6/6" in out
    assert (tmp_path / "o" / "loss_curve.png").is_file()
    recs = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [r["step"] for r in recs if r["type"] == "eval"] == [3, 6]
    assert main(["train", str(toml), "--steps", "8", "--out", str(tmp_path / "o"), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "o" / "metrics.jsonl") if r["type"] == "train"] == list(range(1, 9))


def test_load_model_takes_a_run_folder(data, tmp_path):
    """load_model of a run folder, its checkpoints folder or the latest pointer: the newest checkpoint."""
    train(make_cfg(data, tmp_path / "run", total_steps=3))
    newest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    x = torch.randint(0, 100, (1, 5))
    want = load_model(newest)(x)[0]
    for p in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "latest"):
        assert torch.equal(load_model(p)(x)[0], want), p
