"""Multi-query associative recall (MQAR, Zoology style) for Llama, Finch, Finch-C2 and GoldFinch.

Each sequence starts with P key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from the lower
half of the vocabulary; values from the upper half), then every key is asked once more at a
random place further on, followed by its value; the other places hold token 0. The model is
scored only where it reads a query key and must predict the value that followed that key in
the context. Accuracy is measured on held-out sequences.

    python examples/goldfinch/mqar.py                        # the real run (CUDA if present)
    python examples/goldfinch/mqar.py --tiny                 # a toy size: seconds on a CPU
    python examples/goldfinch/mqar.py --archs goldfinch,llama --lrs 1e-3 --out runs/mqar.json

Defaults (the GoldFinch paper's MQAR setting, after Zoology): vocabulary 8192, 2 layers
(GoldFinch: one Finch-C2 block and one GOLD block), d_model 128, sequences of 256 tokens with
16 pairs and of 512 tokens with 64 pairs; AdamW, cosine schedule, each learning rate of
``--lrs`` tried and the best kept. The results go to a JSON file and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rwkvkit.config import ModelConfig
from rwkvkit.models import model_class
from rwkvkit.train.loss import chunked_cross_entropy
from rwkvkit.train.recipe import LRSchedule, build_optimizer

ARCHS = {"llama": "llama", "finch": "rwkv6", "finch-c2": "finch-c2", "goldfinch": "goldfinch"}


@dataclass
class Settings:
    vocab: int = 8192
    n_layer: int = 2
    d_model: int = 128
    head_size: int = 64
    tasks: tuple[tuple[int, int], ...] = ((256, 16), (512, 64))  # (sequence length, key-value pairs)
    train_examples: int = 20_000
    test_examples: int = 1_000
    epochs: int = 8
    batch: int = 64
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0


TINY = dict(vocab=64, d_model=32, head_size=16, tasks=((32, 4),), train_examples=32, test_examples=16, epochs=1,
            batch=16, lrs=(3e-3,), warmup_steps=1)


def mqar_batch(n: int, seq_len: int, pairs: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR sequences: inputs [n, seq_len] and targets [n, seq_len] (-100 where not scored)."""
    half = vocab // 2
    if pairs > half - 1 or 4 * pairs > seq_len:
        raise ValueError(f"{pairs} pairs need a vocabulary of at least {2 * pairs + 2} and {4 * pairs} positions")
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :pairs] + 1  # distinct, in [1, half)
    values = torch.randint(half, vocab, (n, pairs), generator=generator)
    x = torch.zeros(n, seq_len, dtype=torch.long)
    y = torch.full((n, seq_len), -100, dtype=torch.long)
    x[:, 0 : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2] = keys, values
    # Queries: `pairs` distinct slots (two positions each) in the rest of the sequence.
    slots = (seq_len - 2 * pairs) // 2
    where = 2 * pairs + 2 * torch.rand(n, slots, generator=generator).argsort(dim=1)[:, :pairs]
    order = torch.rand(n, pairs, generator=generator).argsort(dim=1)  # which key each slot asks
    asked_keys, asked_values = keys.gather(1, order), values.gather(1, order)
    x.scatter_(1, where, asked_keys)
    x.scatter_(1, where + 1, asked_values)
    y.scatter_(1, where, asked_values)
    return x, y


def build(arch: str, s: Settings) -> torch.nn.Module:
    lora = {"maa": 8, "decay": 8, **({"kv": 8} if arch == "goldfinch" else {})} if s.d_model < 64 else {}
    if arch == "llama":
        lora = {}
    config = ModelConfig(arch=arch, n_layer=s.n_layer, n_embd=s.d_model, vocab_size=s.vocab, head_size=s.head_size,
                         lora=lora)
    return model_class(arch)(config)


def run_one(name: str, seq_len: int, pairs: int, lr: float, s: Settings, device: torch.device,
            data: dict[str, tuple[torch.Tensor, torch.Tensor]], progress: bool) -> dict:
    """Train ``name`` on one task at one learning rate; returns its result record."""
    torch.manual_seed(s.seed)
    model = build(ARCHS[name], s).to(device)
    opt = build_optimizer(model, lr=lr, weight_decay=s.weight_decay, eps=1e-8)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(x_train) / s.batch)
    total = s.epochs * steps_per_epoch
    schedule = LRSchedule(opt, lr_init=lr, lr_final=lr / 10, warmup_steps=min(s.warmup_steps, total - 1),
                          total_steps=total)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    order = torch.Generator().manual_seed(s.seed + 1)
    bar = tqdm(total=total, desc=f"{name} {seq_len}/{pairs} lr {lr:g}", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    loss_value = float("nan")
    model.train()
    for _ in range(s.epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train), s.batch):
            idx = perm[i : i + s.batch]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            schedule.apply()
            with autocast():
                h, _ = model.hidden(x)
                scored = y != -100
                loss_sum, count = chunked_cross_entropy(h[scored], model.head.weight, y[scored])
            (loss_sum / count).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            loss_value = float(loss_sum.detach()) / count
            bar.set_postfix_str(f"loss {loss_value:.3f}", refresh=False)
            bar.update(1)
    bar.close()
    accuracy = evaluate(model, *data["test"], s.batch, device, autocast)
    return {"arch": name, "seq_len": seq_len, "kv_pairs": pairs, "lr": lr, "accuracy": accuracy,
            "final_train_loss": loss_value, "steps": total, "seconds": round(time.perf_counter() - t0, 2),
            "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch: int, device: torch.device,
             autocast) -> float:
    """Fraction of held-out queries whose most likely next token is the right value."""
    model.eval()
    right = total = 0
    for i in range(0, len(x_all), batch):
        x, y = x_all[i : i + batch].to(device), y_all[i : i + batch].to(device)
        with autocast():
            h, _ = model.hidden(x)
        scored = y != -100
        logits = h[scored].float() @ model.head.weight.float().T
        right += int((logits.argmax(-1) == y[scored]).sum())
        total += int(scored.sum())
    return right / total


def table(results: list[dict]) -> str:
    """The best accuracy of each arch on each task (over the learning rates tried)."""
    tasks = sorted({(r["seq_len"], r["kv_pairs"]) for r in results})
    archs = list(dict.fromkeys(r["arch"] for r in results))
    head = "| arch | " + " | ".join(f"seq {t} / {p} pairs" for t, p in tasks) + " |"
    lines = [head, "|---" * (len(tasks) + 1) + "|"]
    for a in archs:
        cells = []
        for t, p in tasks:
            runs = [r for r in results if r["arch"] == a and (r["seq_len"], r["kv_pairs"]) == (t, p)]
            best = max(runs, key=lambda r: r["accuracy"]) if runs else None
            cells.append(f"{best['accuracy']:.3f} (lr {best['lr']:g})" if best else "-")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a toy size for a CPU smoke test")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default 1e-3,3e-3)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--test-examples", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma-separated SEQ:PAIRS (default 256:16,512:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="runs/mqar/results.json", help="JSON results (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    s = Settings(**TINY) if args.tiny else Settings()
    s.seed = args.seed
    for field in ("epochs", "train_examples", "test_examples"):
        if getattr(args, field) is not None:
            setattr(s, field, getattr(args, field))
    if args.lrs:
        s.lrs = tuple(float(v) for v in args.lrs.split(","))
    if args.tasks:
        try:
            s.tasks = tuple(tuple(int(x) for x in t.split(":")) for t in args.tasks.split(","))
        except ValueError:
            p.error(f"--tasks: expected SEQ:PAIRS,..., got {args.tasks!r}")
    names = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        p.error(f"unknown arch(s) {', '.join(unknown)} (choose from {', '.join(ARCHS)})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    results = []
    for seq_len, pairs in s.tasks:
        g = torch.Generator().manual_seed(s.seed * 1000 + seq_len)
        data = {"train": mqar_batch(s.train_examples, seq_len, pairs, s.vocab, g),
                "test": mqar_batch(s.test_examples, seq_len, pairs, s.vocab, g)}
        for name in names:
            for lr in s.lrs:
                results.append(run_one(name, seq_len, pairs, lr, s, device, data, not args.no_progress))
    report = {"settings": {**asdict(s), "device": str(device), "torch": torch.__version__}, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {out}")
    return report


if __name__ == "__main__":
    main()
