"""The trainer: one loop for one CPU, one GPU or N GPUs under torchrun.

Each optimizer step runs ``grad_accum`` micro-batches of ``micro_batch`` samples on every
rank; micro-step ``k = step * grad_accum + a`` of rank ``r`` reads the sampler's batch ``k``
(the official sample numbering, so a step covers the same samples however the global batch
is split into ranks and accumulation). The loss is the mean cross-entropy over every token
of the global batch, from the hidden states in chunks (the [B, T, V] logits never exist),
with L2Wrap; gradients are clipped, AdamW steps with the RWKV parameter groups and schedule.

Precision: bf16 autocast on CUDA with float32 master weights; float32 on CPU.

Outputs, all under ``out_dir`` and written by rank 0 only::

    train_config.json        the resolved config
    metrics.jsonl            one line per step {"type": "train", step, tokens, loss, lr,
                             grad_norm, tokens_per_s, time} and per evaluation
                             {"type": "eval", step, tokens, val_loss, val_ppl, time}
    loss_curve.png           train and validation loss (matplotlib, when installed)
    tensorboard/             scalars, when TensorBoard is installed
    checkpoints/             see :mod:`rwkvkit.train.checkpointing`

Stopping: SIGTERM or Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and
returns (a second Ctrl-C aborts at once). ``resume`` continues from a checkpoint exactly:
model, AdamW state, schedule, data position and RNG states, so the losses after a resume
are those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..files import atomic_path, atomic_write_text
from ..models.base import LanguageModel
from . import checkpointing as ckpt
from . import distributed as D
from .config import TrainConfig, key_name
from .loss import chunked_cross_entropy, evaluate_loss
from .recipe import LRSchedule, build_model, build_optimizer

__all__ = ["LossModule", "TrainResult", "enable_gradient_checkpointing", "plot_metrics", "read_metrics", "train"]

METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"
# Keys that may change between a run and its resumption without a warning.
_RESUME_FREE = {"total_steps", "total_tokens", "stop_at_step", "eval_every", "eval_tokens", "save_every",
                "keep_last", "progress", "log_every", "tensorboard", "plot", "out_dir", "device", "val_data"}


class LossModule(nn.Module):
    """``forward(x, y) -> summed cross-entropy (+ L2Wrap gradient)`` of a language model.

    The unit that DDP / FSDP wrap: its ``forward`` runs ``model.hidden`` and the chunked loss
    against ``model.head.weight``, so the logits are never materialised.
    """

    def __init__(self, model: LanguageModel, *, l2wrap: float = 1e-4, chunk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.l2wrap, self.chunk = l2wrap, chunk

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, _ = self.model.hidden(x)
        loss_sum, _ = chunked_cross_entropy(h, self.model.head.weight, y, chunk=self.chunk, l2wrap=self.l2wrap)
        return loss_sum


# -- gradient checkpointing ----------------------------------------------------------------------
def enable_gradient_checkpointing(model: LanguageModel) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    if not hasattr(model, "gradient_checkpointing"):
        raise TypeError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing = True


# -- RNG state -----------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, CUDA) as JSON values and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- stopping on signals -------------------------------------------------------------------------
class _StopRequest:
    """SIGTERM / SIGINT set a flag the loop checks between steps; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# -- metrics, plot -------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


_warned_matplotlib = False


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Draw the train and validation loss of ``metrics_path`` into ``png_path`` (atomically).

    Returns False (after saying so once on stderr) when matplotlib is not installed.
    """
    global _warned_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_matplotlib:
            print("rwkvkit train: matplotlib is not installed, so no loss curve is drawn "
                  "(pip install 'rwkvkit[train]')", file=sys.stderr)
            _warned_matplotlib = True
        return False
    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, lw=0.8, alpha=0.45 if len(train) > 50 else 1.0, label="train")
            if len(train) > 50:  # a running mean shows the trend through the noise
                w = max(5, len(train) // 50)
                smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
                ax.plot(steps[w - 1:], smooth, lw=1.5, color="C0", label=f"train (mean of {w})")
        if val:
            vs, vl = zip(*val)
            ax.plot(vs, vl, "o-", color="C1", lw=1.5, ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return True


class _Logger:
    """Rank 0's outputs: metrics.jsonl, TensorBoard (if installed), the console."""

    def __init__(self, cfg: TrainConfig, out: Path, start_step: int, active: bool) -> None:
        self.active = active
        self.path = out / METRICS
        self.tb = None
        self.file = None
        if not active:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
            except Exception:  # noqa: BLE001 - tensorboard absent or broken: skip it
                self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(rec) + "\n")  # type: ignore[union-attr]
        self.file.flush()  # type: ignore[union-attr]
        if self.tb is not None:
            step = rec["step"]
            for k, v in rec.items():
                if k not in ("type", "step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{rec['type']}/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# -- the run -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run did (on rank 0; other ranks get the same step numbers)."""

    out_dir: Path
    step: int
    total_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run's steps
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped: str = "done"  # "done", "stop_at_step", "SIGTERM" or "SIGINT"


def _open_data(path: str, key: str) -> Any:
    from .data import DataError, open_tokens

    if not Path(path).exists() and not any(
        Path(path + s).exists() for s in (".tokens", ".json", ".bin", ".idx")
    ):
        raise ConfigError(f"config key {key!r}: {path}: no such token file")
    try:
        return open_tokens(path)
    except DataError as exc:
        raise ConfigError(f"config key {key!r}: {exc}") from None


def _val_path(cfg: TrainConfig) -> str | None:
    from .data import is_token_data

    if cfg.val_data == "":
        return None
    if cfg.val_data != "auto":
        return cfg.val_data
    p = Path(cfg.train_data)
    for suffix in (".tokens", ".json", ".bin", ".idx"):
        if p.name.endswith(suffix):
            p = p.with_name(p.name[: -len(suffix)])
            break
    candidate = str(p.with_name(p.name + ".val"))
    return candidate if is_token_data(candidate) else None


def _data_tokenizer(data: Any) -> Any:
    from .data import DataError

    get = getattr(data, "tokenizer", None)
    if not callable(get):
        return None
    try:
        return get()
    except DataError:
        return None


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    """One training run; :func:`train` is the usual way in."""

    def __init__(self, cfg: TrainConfig, env: D.DistEnv, resume: bool | str | Path = False) -> None:
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.main = env.is_main
        seed_everything(cfg.seed)

        self.data = _open_data(cfg.train_data, "data.train_data")
        vp = _val_path(cfg)
        self.val = _open_data(vp, "data.val_data") if vp else None

        resume_from = self._resume_path(resume)
        self.model = self._build_model(resume_from)
        self.model.to(env.device)
        if cfg.grad_checkpoint:
            enable_gradient_checkpointing(self.model)
        self.loss_module = LossModule(self.model, l2wrap=cfg.l2wrap, chunk=cfg.loss_chunk or None)
        units = [m for b in self.model.blocks for m in (b.att, b.ffn)]  # type: ignore[attr-defined]
        self.wrapped = D.wrap(self.loss_module, env, cfg.distributed, shard_units=units)
        self.fsdp = D.is_fsdp(self.wrapped)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr_init, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas, eps=cfg.eps, fused=False if self.fsdp else None)
        self.total_steps = cfg.steps(env.world_size)
        self.schedule = LRSchedule(self.optimizer, lr_init=cfg.lr_init, lr_final=cfg.lr_final,
                                   warmup_steps=cfg.warmup_steps, total_steps=self.total_steps)
        from .data import DataError, TokenSampler

        try:
            self.sampler = TokenSampler(self.data, cfg.ctx_len, cfg.micro_batch, order=cfg.data_order,
                                        rank=env.rank, world_size=env.world_size, seed=cfg.seed)
        except DataError as exc:
            raise ConfigError(f"config key 'data.train_data': {exc}") from None
        self.autocast = _autocast(cfg, env.device)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        if resume_from is not None:
            self._restore(resume_from)
        self.last_saved = self.step if resume_from is not None else -1

    # -- set-up ---------------------------------------------------------------------------------
    def _resume_path(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            if ckpt.list_checkpoints(self.ckpt_root):
                raise ConfigError(f"config key 'train.out_dir': {self.out} already holds checkpoints; "
                                  "resume it (--resume) or choose another out_dir (--out)")
            return None
        if resume is True:
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                raise CheckpointError(f"{self.ckpt_root}: no checkpoint to resume from")
            return path
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        return path

    def _build_model(self, resume_from: Path | None) -> LanguageModel:
        cfg = self.cfg
        data_vocab = self.data.vocab_size
        if cfg.init_from:
            from ..checkpoint import load_model

            if not Path(cfg.init_from).exists():
                raise ConfigError(f"config key 'model.init_from': {cfg.init_from}: no such file")
            model = load_model(cfg.init_from, dtype=torch.float32)
            if model.config.arch != cfg.arch:
                raise ConfigError(f"config key 'model.arch': {cfg.arch!r}, but model.init_from is {model.config.arch}")
            for k in ("n_layer", "n_embd", "vocab_size"):
                want, got = getattr(cfg, k), getattr(model.config, k)
                if want and want != got:
                    raise ConfigError(f"config key {key_name(k)!r}: {want}, but model.init_from has {got} "
                                      "(leave the sizes unset, 0, with init_from)")
        else:
            vocab = cfg.vocab_size or data_vocab
            if not vocab:
                raise ConfigError(f"config key 'model.vocab_size': not set, and {self.data.path} does not "
                                  "record its vocabulary (binidx): give it")
            model = build_model(ModelConfig(**cfg.model_config_dict(vocab)))
        if data_vocab is not None and data_vocab > model.config.vocab_size:
            raise ConfigError(f"config key 'model.vocab_size': {model.config.vocab_size} is smaller than the "
                              f"data's vocabulary ({data_vocab}, {self.data.path})")
        if model.tokenizer is None:
            model.tokenizer = _data_tokenizer(self.data)
        if resume_from is not None:
            saved = json.loads((resume_from / "config.json").read_text(encoding="utf-8"))
            mine = model.config.to_dict()
            diff = [k for k in mine if saved.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"config key {key_name(k)!r}: {mine[k]!r}, but checkpoint {resume_from} "
                                  f"was trained with {saved.get(k)!r}")
        return model.train()

    def _restore(self, path: Path) -> None:
        from ..checkpoint import read_safetensors

        cfg, env = self.cfg, self.env
        ts = ckpt.load_training_state(path)
        st = ts.state
        weights, _ = read_safetensors(path / "model.safetensors")
        weights = {k: v for k, v in weights.items() if not k.startswith("default_state.")}
        osd = st["optimizer"]
        for g in osd["param_groups"]:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        D.load_full_state(self.wrapped, self.optimizer, weights, osd, prefix="model.")
        self.schedule.load_state_dict(st["schedule"])
        self.step = int(st["step"])
        self.tokens = int(st["tokens"])
        self.elapsed = float(st.get("elapsed", 0.0))
        data = st["data"]
        if data["micro_step"] != self.step * cfg.grad_accum:
            raise CheckpointError(f"{path}: data position {data['micro_step']} does not match step {self.step} "
                                  f"with grad_accum {cfg.grad_accum}")
        rngs = st["rng"]
        set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0], env.device)
        if self.main:
            old = st.get("config", {})
            changed = [k for k, v in cfg.to_dict().items() if k not in _RESUME_FREE and k in old and old[k] != v]
            layout = (data.get("world_size"), data.get("micro_batch"), data.get("grad_accum"))
            if layout != (env.world_size, cfg.micro_batch, cfg.grad_accum):
                changed.append("world_size/micro_batch/grad_accum")
            if changed:
                print(f"rwkvkit train: warning: resuming with changed {', '.join(changed)}: the run will "
                      "differ from an uninterrupted one", file=sys.stderr)

    # -- the pieces of a step -------------------------------------------------------------------
    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (summed loss of this rank, grad norm, base lr)."""
        cfg, env = self.cfg, self.env
        A = cfg.grad_accum
        local_tokens = cfg.micro_batch * cfg.ctx_len * A
        lr = self.schedule.apply()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for a in range(A):
            x, y = self.sampler.batch(self.step * A + a)
            x = x.to(env.device, non_blocking=True)
            y = y.to(env.device, non_blocking=True)
            with D.gradient_sync(self.wrapped, a == A - 1):
                with self.autocast():
                    loss = self.wrapped(x, y)
                (loss / local_tokens).backward()
            loss_sum += loss.detach().double()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return loss_sum, norm, lr  # type: ignore[return-value]

    def evaluate(self) -> float | None:
        """Validation loss (rank 0; every rank takes part under FSDP), or None without data."""
        if self.val is None or not (self.main or self.fsdp):
            return None
        cfg = self.cfg
        with D.unsharded(self.wrapped), self.autocast():
            res = evaluate_loss(self.model, self.val.tokens, doc_offsets=self.val.doc_offsets, ctx_len=cfg.ctx_len,
                                batch_size=cfg.micro_batch, max_tokens=cfg.eval_tokens or None,
                                chunk=cfg.loss_chunk or None, progress=False, fresh_state=self._eval_windows())
        return res.loss

    def _eval_windows(self) -> bool:
        """Whether validation scores each window from a fresh state (``eval_context``)."""
        if self.cfg.eval_context == "auto":
            return self.model.cache_bytes_per_token() > 0
        return self.cfg.eval_context == "window"

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call this)."""
        cfg, env = self.cfg, self.env
        msd, osd = D.full_state(self.wrapped, self.optimizer, prefix="model.")
        rngs = D.gather_objects(rng_state(env.device), env)
        path = None
        if self.main:
            model = self._model_for_saving(msd)
            state = {
                "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
                "elapsed": self.elapsed,
                "schedule": self.schedule.state_dict(),
                "data": {"micro_step": self.step * cfg.grad_accum, "world_size": env.world_size,
                         "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "ctx_len": cfg.ctx_len,
                         "order": cfg.data_order, "seed": cfg.seed},
                "optimizer": osd,
                "rng": rngs,
                "config": cfg.to_dict(),
            }
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model, state, keep_last=cfg.keep_last)
        self.last_saved = self.step
        return path

    def _model_for_saving(self, msd: dict[str, torch.Tensor]) -> LanguageModel:
        if not self.fsdp:
            return self.model
        with torch.device("meta"):
            plain = type(self.model)(self.model.config)
        plain.load_state_dict(msd, assign=True)
        plain.tokenizer = self.model.tokenizer
        return plain

    # -- the loop -------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(self.ckpt_root)
        atomic_write_text(self.out / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def _summary(self) -> None:
        cfg, env, m = self.cfg, self.env, self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        dtype = "bf16 autocast" if self.autocast is not contextlib.nullcontext else "fp32"
        val = f"{self.val.path} ({self.val.n_tokens:,} tokens)" if self.val is not None else "none"
        lines = [
            f"model   {m.arch} L{m.n_layer} D{m.n_embd} vocab {m.vocab_size}: {params / 1e6:.2f}M parameters",
            f"device  {env.device} {dtype}, {env.world_size} process(es)"
            + (f" ({cfg.distributed})" if env.is_distributed else ""),
            f"data    {self.data.path} ({self.data.n_tokens:,} tokens); validation {val}",
            f"batch   ctx {cfg.ctx_len} x micro {cfg.micro_batch} x accum {cfg.grad_accum} x {env.world_size} "
            f"rank(s) = {cfg.tokens_per_step(env.world_size):,} tokens/step; {self.total_steps:,} steps",
            f"out     {self.out}" + (f" (resuming at step {self.step})" if self.step else ""),
        ]
        print("\n".join(lines), flush=True)

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        self._prepare_out_dir()
        D.barrier(env)
        result = TrainResult(out_dir=self.out, step=self.step, total_steps=self.total_steps)
        log = _Logger(cfg, self.out, self.step, self.main)
        if self.main:
            self._summary()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=True if not (self.main and cfg.progress) else None, desc="train")
        tokens_per_step = cfg.tokens_per_step(env.world_size)
        last_eval = -1
        try:
            with _StopRequest() as stop:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    loss_sum, norm, lr = self._train_step()
                    self.step += 1
                    self.tokens += tokens_per_step
                    flags = torch.stack([loss_sum, torch.tensor(1.0 if stop.signal else 0.0, dtype=torch.float64,
                                                                device=env.device)])
                    flags = D.all_reduce_sum(flags, env).cpu()
                    loss = float(flags[0]) / tokens_per_step
                    dt = time.perf_counter() - t0
                    self.elapsed += dt
                    rec = {"type": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                           "grad_norm": float(norm), "tokens_per_s": tokens_per_step / dt if dt > 0 else 0.0,
                           "time": round(self.elapsed, 4)}
                    log.write(rec)
                    result.losses.append((self.step, loss))
                    if not math.isfinite(loss) and self.main:
                        print(f"rwkvkit train: warning: loss is {loss} at step {self.step}", file=sys.stderr)
                    if not bar.disable:
                        bar.set_postfix_str(f"loss {loss:.4f} | {rec['tokens_per_s']:,.0f} tok/s | lr {lr:.2e}",
                                            refresh=False)
                        bar.update(1)
                    elif self.main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        print(f"step {self.step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | "
                              f"grad {float(norm):.3f} | {rec['tokens_per_s']:,.0f} tok/s", flush=True)

                    stopping = None
                    if flags[1] > 0:
                        stopping = stop.signal or "SIGTERM"  # another rank got it
                    elif cfg.stop_at_step and self.step >= cfg.stop_at_step and self.step < self.total_steps:
                        stopping = "stop_at_step"
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        self._eval_and_log(log, result)
                        last_eval = self.step
                    if stopping or (cfg.save_every and self.step % cfg.save_every == 0):
                        result.checkpoint = self.save() or result.checkpoint
                    if stopping:
                        result.stopped = stopping
                        break
                if result.stopped == "done" and result.losses:  # (a finished run resumed does nothing)
                    if last_eval != self.step:
                        self._eval_and_log(log, result)
                    if self.last_saved != self.step:
                        result.checkpoint = self.save() or result.checkpoint
                if result.checkpoint is None and self.main:
                    result.checkpoint = ckpt.latest_checkpoint(self.ckpt_root)
        finally:
            bar.close()
            log.close()
        if self.main and cfg.plot:
            plot_metrics(self.out / METRICS, self.out / PLOT)
        D.barrier(env)
        result.step = self.step
        if self.main:
            where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
            how = "finished" if result.stopped == "done" else f"stopped ({result.stopped})"
            print(f"{how} at step {self.step}/{self.total_steps}{where}", flush=True)
        return result

    def _eval_and_log(self, log: _Logger, result: TrainResult) -> None:
        val = self.evaluate()
        if val is None or not self.main:
            return
        log.write({"type": "eval", "step": self.step, "tokens": self.tokens, "val_loss": val,
                   "val_ppl": math.exp(val) if val < 700 else math.inf, "time": round(self.elapsed, 4)})
        result.val_losses.append((self.step, val))
        if self.cfg.plot:
            plot_metrics(self.out / METRICS, self.out / PLOT)


def train(cfg: TrainConfig, *, resume: bool | str | Path = False) -> TrainResult:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes.

    ``resume``: False starts a new run (``out_dir`` must hold no checkpoints); True continues
    from ``out_dir``'s latest checkpoint; a path continues from that checkpoint directory.
    Under torchrun every process calls this; the process group is set up and torn down here.
    """
    env = D.setup(cfg.device)
    try:
        return Trainer(cfg, env, resume).run()
    finally:
        D.cleanup(env)
