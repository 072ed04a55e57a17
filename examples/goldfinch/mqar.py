"""Multi-query associative recall (MQAR, Zoology style) for Llama, Finch, Finch-C2 and GoldFinch.

Each sequence starts with P key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, from the lower
half of the vocabulary; values from the upper half), then every key is asked once more at a
random place further on, followed by its value; the other places hold token 0. The model is
scored only where it reads a query key and must predict the value that followed that key in
the context. Accuracy is measured on held-out sequences.

    python examples/goldfinch/mqar.py                        # the real run (CUDA if present)
    python examples/goldfinch/mqar.py --parallel             # one process per run, spread over the GPUs
    python examples/goldfinch/mqar.py --tiny                 # a toy size: seconds on a CPU
    python examples/goldfinch/mqar.py --archs goldfinch,llama --lrs 1e-3 --out runs/mqar.json
    python examples/goldfinch/mqar.py --report runs/mqar/results.json   # table and plot of a finished run

Defaults (the GoldFinch paper's MQAR setting, after Zoology): vocabulary 8192, 2 layers
(GoldFinch: one Finch-C2 block and one GOLD block), d_model 128, sequences of 256 tokens with
16 pairs and of 512 tokens with 64 pairs; AdamW, cosine schedule, each learning rate of
``--lrs`` tried and the best kept. The results go to a JSON file, a table and a bar plot
(PNG beside the JSON).

A training step reads nothing back from the GPU but the range of its token ids (the model's
own input check): the data live on the device from the start (no copy per step), the loss is
taken at the query positions by a gather (boolean indexing would make the host wait for the
number of positions), and the loss is read for the progress bar only every ``LOG_EVERY``
steps. ``--parallel`` runs every (arch, task, lr) in its own process, the processes spread
over the GPUs; their results are merged into one JSON file, table and plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rwkvkit.config import ModelConfig
from rwkvkit.models import model_class
from rwkvkit.train.recipe import LRSchedule, build_optimizer

ARCHS = {"llama": "llama", "finch": "rwkv6", "finch-c2": "finch-c2", "goldfinch": "goldfinch"}
LOG_EVERY = 50  # steps between reads of the loss (each read waits for the GPU)


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
    lrs: tuple[float, ...] = (1e-3, 2e-3, 3e-3)
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
    # distinct keys in [1, half): the positions of the `pairs` smallest of half - 1 uniform numbers
    keys = torch.rand(n, half - 1, generator=generator).topk(pairs, dim=1, largest=False).indices + 1
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


@dataclass
class Queries:
    """MQAR sequences as training reads them: inputs ``x`` [n, T], and per sequence the
    positions ``pos`` [n, P] where a value must be predicted and those values ``val`` [n, P]."""

    x: torch.Tensor
    pos: torch.Tensor
    val: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> "Queries":
        scored = y != -100
        pos = scored.nonzero()[:, 1].view(len(y), -1)  # every sequence asks the same number of queries
        return cls(x.to(device), pos.to(device), y.gather(1, pos).to(device))

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, idx: torch.Tensor | slice) -> "Queries":
        return Queries(self.x[idx], self.pos[idx], self.val[idx])


def query_hidden(model: torch.nn.Module, q: Queries) -> torch.Tensor:
    """The final hidden states [n, P, C] at the query positions (the head runs on nothing else)."""
    h, _ = model.hidden(q.x)
    return h.gather(1, q.pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def build(arch: str, s: Settings) -> torch.nn.Module:
    lora = {"maa": 8, "decay": 8, **({"kv": 8} if arch == "goldfinch" else {})} if s.d_model < 64 else {}
    if arch == "llama":
        lora = {}
    config = ModelConfig(arch=arch, n_layer=s.n_layer, n_embd=s.d_model, vocab_size=s.vocab, head_size=s.head_size,
                         lora=lora)
    return model_class(arch)(config)


def run_one(name: str, seq_len: int, pairs: int, lr: float, s: Settings, device: torch.device,
            data: dict[str, Queries], progress: bool) -> dict:
    """Train ``name`` on one task at one learning rate; returns its result record."""
    torch.manual_seed(s.seed)
    model = build(ARCHS[name], s).to(device)
    opt = build_optimizer(model, lr=lr, weight_decay=s.weight_decay, eps=1e-8)
    train = data["train"]
    steps_per_epoch = math.ceil(len(train) / s.batch)
    total = s.epochs * steps_per_epoch
    schedule = LRSchedule(opt, lr_init=lr, lr_final=lr / 10, warmup_steps=min(s.warmup_steps, total - 1),
                          total_steps=total)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    order = torch.Generator().manual_seed(s.seed + 1)
    bar = tqdm(total=total, desc=f"{name} {seq_len}/{pairs} lr {lr:g}", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    loss = torch.full((), float("nan"))
    model.train()
    step = 0
    for _ in range(s.epochs):
        perm = torch.randperm(len(train), generator=order).to(device)
        for i in range(0, len(train), s.batch):
            batch = train.rows(perm[i : i + s.batch])
            schedule.apply()
            with autocast():
                logits = query_hidden(model, batch) @ model.head.weight.T
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.val.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if progress and (step % LOG_EVERY == 0 or step == total):
                bar.set_postfix_str(f"loss {float(loss.detach()):.3f}", refresh=False)
                bar.update(step - bar.n)
    loss_value = float(loss.detach())  # waits for the last step
    train_seconds = time.perf_counter() - t0
    bar.close()
    accuracy = evaluate(model, data["test"], s.batch, autocast)
    return {"arch": name, "seq_len": seq_len, "kv_pairs": pairs, "lr": lr, "accuracy": accuracy,
            "final_train_loss": loss_value, "steps": total, "seconds": round(time.perf_counter() - t0, 2),
            "ms_per_step": round(1000 * train_seconds / total, 2),
            "parameters": sum(p.numel() for p in model.parameters()), "device": device_name(device)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: Queries, batch: int, autocast) -> float:
    """Fraction of held-out queries whose most likely next token is the right value."""
    model.eval()
    right = torch.zeros((), dtype=torch.long, device=test.x.device)
    for i in range(0, len(test), batch):
        q = test.rows(slice(i, i + batch))
        with autocast():
            h = query_hidden(model, q)
        logits = h.float() @ model.head.weight.float().T
        right += (logits.argmax(-1) == q.val).sum()
    return int(right) / test.val.numel()


def best_runs(results: list[dict]) -> dict[tuple[str, tuple[int, int]], dict]:
    """The run with the best accuracy of each (arch, (seq_len, pairs)), over the learning rates."""
    best: dict[tuple[str, tuple[int, int]], dict] = {}
    for r in results:
        key = (r["arch"], (r["seq_len"], r["kv_pairs"]))
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return best


def _tasks_and_archs(results: list[dict]) -> tuple[list[tuple[int, int]], list[str]]:
    return sorted({(r["seq_len"], r["kv_pairs"]) for r in results}), list(dict.fromkeys(r["arch"] for r in results))


def table(results: list[dict]) -> str:
    """The best accuracy of each arch on each task (over the learning rates tried)."""
    if not results:
        return "(no run finished)"
    tasks, archs = _tasks_and_archs(results)
    best = best_runs(results)
    head = "| arch | " + " | ".join(f"seq {t} / {p} pairs" for t, p in tasks) + " |"
    lines = [head, "|---" * (len(tasks) + 1) + "|"]
    for a in archs:
        cells = []
        for task in tasks:
            r = best.get((a, task))
            cells.append(f"{r['accuracy']:.3f} (lr {r['lr']:g})" if r else "-")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path | None:
    """A bar chart of the best accuracy per arch and task, saved as ``path`` (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    tasks, archs = _tasks_and_archs(results)
    best = best_runs(results)
    width = 0.8 / len(archs)
    fig, ax = plt.subplots(figsize=(2.0 + 2.2 * len(tasks), 4.2))
    for j, a in enumerate(archs):
        xs = [i + (j - (len(archs) - 1) / 2) * width for i in range(len(tasks))]
        accs = [best[(a, t)]["accuracy"] if (a, t) in best else float("nan") for t in tasks]
        bars = ax.bar(xs, accs, width, label=a)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in accs], fontsize=7, padding=1)
    ax.set_xticks(range(len(tasks)), [f"seq {t}, {p} pairs" for t, p in tasks])
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("held-out query accuracy (best lr)")
    ax.set_title("MQAR")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=len(archs), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finish(report: dict, out: Path, plot_path: Path | None) -> dict:
    """Write the report, print its table and save its plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["results"]))
    print(f"\nresults: {out}")
    if plot_path is not None and report["results"] and plot(report["results"], plot_path):
        print(f"plot: {plot_path}")
    return report


def run_parallel(s: Settings, names: list[str], args: argparse.Namespace, out: Path,
                 report: dict) -> list[dict]:
    """Every (arch, task, lr) run in its own process: spread over the GPUs (each sees one
    through CUDA_VISIBLE_DEVICES), ``per_gpu`` at a time on each; longest tasks first. The
    runs' JSON files and logs go to ``<out>_parts/``, and ``out`` is rewritten (``report``
    with the results so far) as each run finishes. After ``time_limit`` seconds the runs
    still going are stopped. Returns the results of the runs that finished."""
    if args.device == "cpu":
        devices = ["cpu"]
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
        if args.gpus:
            ids = [ids[int(i)] for i in args.gpus.split(",")]
        if not ids:
            raise SystemExit("--parallel: no CUDA GPU visible (use --device cpu to run the processes on the CPU)")
        devices = ids
    tasks = sorted(s.tasks, key=lambda t: -t[0])  # longest first, dealt round-robin: each GPU gets a share
    jobs = [(name, task, lr) for task in tasks for name in names for lr in s.lrs]
    per_device = args.per_gpu or math.ceil(len(jobs) / len(devices))
    queues: dict[str, list] = {d: jobs[i :: len(devices)] for i, d in enumerate(devices)}
    at_once = min(len(jobs), per_device * len(devices))
    threads = max(1, (os.cpu_count() or 1) // at_once)
    parts = out.parent / f"{out.stem}_parts"
    parts.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    import rwkvkit

    src = str(Path(rwkvkit.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    print(f"{len(jobs)} runs on {len(devices)} device(s) ({', '.join(devices)}), up to {per_device} at a time "
          f"on each, {threads} CPU thread(s) per run; logs in {parts}", flush=True)
    running: list[tuple[subprocess.Popen, str, Path, str]] = []
    done: list[Path] = []
    t0 = time.perf_counter()

    def collected() -> list[dict]:
        found = {(r["arch"], r["seq_len"], r["kv_pairs"], r["lr"]): r
                 for part in done for r in json.loads(part.read_text())["results"]}
        return [found[(n, t, p, lr)] for (t, p) in s.tasks for n in names for lr in s.lrs if (n, t, p, lr) in found]

    while running or any(queues.values()):
        if args.time_limit and time.perf_counter() - t0 > args.time_limit:
            left = [r[3] for r in running] + [f"{n}_{t}_{p}_lr{lr:g}" for q in queues.values() for n, (t, p), lr in q]
            print(f"time limit of {args.time_limit:g} s reached: stopping {', '.join(left)}", flush=True)
            for proc, *_ in running:
                proc.terminate()
            for proc, *_ in running:
                proc.wait()
            break
        for d in devices:
            while queues[d] and sum(r[1] == d for r in running) < per_device:
                name, (seq_len, pairs), lr = queues[d].pop(0)
                tag = f"{name}_{seq_len}_{pairs}_lr{lr:g}"
                part = parts / f"{tag}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--archs", name, "--tasks", f"{seq_len}:{pairs}",
                       "--lrs", repr(lr), "--epochs", str(s.epochs), "--train-examples", str(s.train_examples),
                       "--test-examples", str(s.test_examples), "--seed", str(s.seed), "--out", str(part),
                       "--no-progress", "--no-plot", "--device", "cpu" if d == "cpu" else "cuda"]
                if args.tiny:
                    cmd.append("--tiny")
                child_env = env if d == "cpu" else {**env, "CUDA_VISIBLE_DEVICES": d}
                log = open(parts / f"{tag}.log", "w")
                running.append((subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT), d, part, tag))
                log.close()
        time.sleep(0.5)
        for r in [r for r in running if r[0].poll() is not None]:
            proc, d, part, tag = r
            running.remove(r)
            elapsed = time.perf_counter() - t0
            if proc.returncode == 0 and part.is_file():
                rec = json.loads(part.read_text())["results"][0]
                print(f"[{elapsed:6.0f} s, device {d}] {tag}: accuracy {rec['accuracy']:.3f}, "
                      f"{rec['ms_per_step']:.1f} ms/step", flush=True)
                done.append(part)
                out.write_text(json.dumps({**report, "results": collected()}, indent=2) + "\n")
            else:
                print(f"[{elapsed:6.0f} s, device {d}] {tag} FAILED (exit {proc.returncode}); see "
                      f"{parts / (tag + '.log')}", flush=True)
    return collected()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a toy size for a CPU smoke test")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default 1e-3,2e-3,3e-3)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--test-examples", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma-separated SEQ:PAIRS (default 256:16,512:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--parallel", action="store_true",
                   help="run every (arch, task, lr) in its own process, spread over the GPUs")
    p.add_argument("--gpus", default=None, help="with --parallel: GPU indices to use (default: every visible one)")
    p.add_argument("--per-gpu", type=int, default=None,
                   help="with --parallel: processes at a time per GPU (default: all runs at once)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="with --parallel: stop the runs still going after this long and report the rest")
    p.add_argument("--out", default="runs/mqar/results.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default=None, help="bar plot PNG (default: the JSON's path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report", default=None, metavar="JSON", help="only print the table and plot of a results file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.report:
        out = Path(args.report)
        report = json.loads(out.read_text())
        print(table(report["results"]))
        plot_path = None if args.no_plot else Path(args.plot) if args.plot else out.with_suffix(".png")
        if plot_path is not None and plot(report["results"], plot_path):
            print(f"plot: {plot_path}")
        return report

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
    if args.per_gpu is not None and args.per_gpu < 1:
        p.error("--per-gpu must be at least 1")
    out = Path(args.out)
    plot_path = None if args.no_plot else Path(args.plot) if args.plot else out.with_suffix(".png")

    settings = {**asdict(s), "torch": torch.__version__}
    if args.parallel:
        results = run_parallel(s, names, args, out, {"settings": {**settings, "device": "parallel"}})
        devices = sorted({r["device"] for r in results})
        settings["device"] = "parallel, one process per run: " + ", ".join(devices)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        settings["device"] = str(device)
        results = []
        for seq_len, pairs in s.tasks:
            g = torch.Generator().manual_seed(s.seed * 1000 + seq_len)
            data = {"train": Queries.of(*mqar_batch(s.train_examples, seq_len, pairs, s.vocab, g), device),
                    "test": Queries.of(*mqar_batch(s.test_examples, seq_len, pairs, s.vocab, g), device)}
            for name in names:
                for lr in s.lrs:
                    results.append(run_one(name, seq_len, pairs, lr, s, device, data, not args.no_progress))
    return finish({"settings": settings, "results": results}, out, plot_path)


if __name__ == "__main__":
    main()
