"""Data-parallel training under torchrun: process groups, DDP / FSDP wrapping, full state.

The model knows nothing of this: the trainer wraps a loss module (whose ``forward`` runs
the model and the loss) from outside.

- :func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
  starts the process group: NCCL on CUDA, gloo on CPU. Without torchrun it is one process.
- :func:`wrap`: DDP (default), or FSDP (``fully_shard``, FULL_SHARD: parameters, gradients
  and optimizer state sharded; each block's time-mix and channel-mix is one unit, the
  embedding, LayerNorms and head the root unit).
- :func:`full_state` / :func:`load_full_state`: the whole model and optimizer state keyed
  by parameter name on every rank that asks (what checkpoints hold), for either wrapping.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import RwkvkitError


class DistributedError(RwkvkitError):
    """A bad distributed set-up (an unknown device, a strategy this torch lacks, ...)."""


@dataclass
class DistEnv:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether setup() started the process group (cleanup() ends it)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Detect torchrun, pick the device (``auto``: this rank's GPU, else CPU) and start the
    process group when there are several processes."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise DistributedError(f"config key 'train.device': {device!r} is not a torch device") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise DistributedError(f"config key 'train.device': {device!r} but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, local_rank=local, world_size=world, device=dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, **kwargs)
        env.owns_group = True
    return env


def cleanup(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        env.owns_group = False


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``t`` summed over the ranks (in place; returned for convenience)."""
    if env.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if not env.is_distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size if env.is_main else None  # type: ignore[assignment]
    dist.gather_object(obj, out, dst=0)
    return out


# -- wrapping ------------------------------------------------------------------------------------
def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            raise DistributedError("FSDP needs torch.distributed fully_shard (torch >= 2.4)") from None
    return fully_shard


def wrap(module: nn.Module, env: DistEnv, strategy: str = "ddp",
         shard_units: list[nn.Module] | None = None) -> nn.Module:
    """``module`` ready for data-parallel training on ``env``.

    One process: ``module`` itself. ``"ddp"``: DistributedDataParallel. ``"fsdp"``:
    ``fully_shard`` on each of ``shard_units`` (e.g. every block's att and ffn), then on
    ``module``; the optimizer must be built after this (its parameters are the shards).
    """
    if not env.is_distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    if strategy == "fsdp":
        fully_shard = _fully_shard()
        # The time-mix returns its new WKV state, a view; nothing modifies it in place (the
        # hidden() loop only stacks the states), so FSDP's warning about views does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for unit in shard_units or []:
            fully_shard(unit)
        fully_shard(module)
        return module
    raise DistributedError(f"config key 'train.distributed': unknown strategy {strategy!r}")


def is_fsdp(module: nn.Module) -> bool:
    return hasattr(module, "unshard") and hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync")


def inner(module: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (FSDP modules are their own)."""
    return module.module if hasattr(module, "module") and not is_fsdp(module) else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Within: gradients are (``sync``) or are not yet (accumulating) reduced across ranks."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Within: the root unit's parameters of an FSDP module are whole (so code that calls
    the model's methods directly, e.g. evaluation, can run); nothing for other modules."""
    if is_fsdp(module):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


# -- whole state ---------------------------------------------------------------------------------
def _strip(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in d.items()}


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> tuple[dict, dict]:
    """``(model_state, optimizer_state)``, both keyed by parameter name, on CPU.

    ``optimizer_state`` is ``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.
    Names have ``prefix`` (the wrapped model's name in ``module``) removed. For FSDP every
    rank must call this (it gathers the shards) and only rank 0 gets the tensors.
    """
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(module, optimizer, options=opts)
        osd = {"state": _strip(prefix, osd.get("state", {})),
               "param_groups": [{**g, "params": [p[len(prefix):] if p.startswith(prefix) else p for p in g["params"]]}
                                for g in osd.get("param_groups", [])]}
        return _strip(prefix, msd), osd
    model = inner(module)
    msd = {k: v.detach().cpu() for k, v in _strip(prefix, model.state_dict()).items()}
    raw = optimizer.state_dict()
    names: dict[int, str] = {}
    for group_raw, group in zip(raw["param_groups"], optimizer.param_groups):
        for idx, name in zip(group_raw["params"], group["param_names"]):
            names[idx] = name
    state = {names[i]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in raw["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in raw["param_groups"]]
    return msd, {"state": state, "param_groups": groups}


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict | None,
                    optimizer_state: dict | None, prefix: str = "") -> None:
    """Load what :func:`full_state` returned into a wrapped module and its optimizer (every
    rank passes the whole state)."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        if model_state is not None:
            set_model_state_dict(module, {prefix + k: v for k, v in model_state.items()}, options=opts)
        if optimizer_state is not None:
            osd = {"state": {prefix + k: v for k, v in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [prefix + p for p in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
            set_optimizer_state_dict(module, optimizer, osd, options=opts)
        return
    if model_state is not None:
        inner(module).load_state_dict({prefix + k: v for k, v in model_state.items()})
    if optimizer_state is not None:
        index: dict[str, int] = {}
        for group in optimizer.param_groups:
            for name in group["param_names"]:
                index[name] = len(index)
        saved_groups = optimizer_state["param_groups"]
        if [g["params"] for g in saved_groups] != [g["param_names"] for g in optimizer.param_groups]:
            raise RwkvkitError("the checkpoint's optimizer groups do not match this model's parameters")
        raw = {"state": {index[n]: s for n, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved_groups]}
        optimizer.load_state_dict(raw)
