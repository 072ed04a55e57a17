"""The ``rwkvkit prepare``, ``eval-ppl``, ``train`` and ``export-pth`` subcommands.

    rwkvkit prepare INPUT... --output PATH [--tokenizer world|VOCAB] [--val-fraction 0.01 |
        --val-tokens N] [--format tokens|binidx] [--seed 0] [--skip-bad]
        [--text-split file|blank-lines|lines] [--ctx-len N]
    rwkvkit eval-ppl --model PATH DATA... [--ctx-len 1024] [--batch-size 1] [--max-tokens N]
        [--device D] [--dtype fp32|bf16|fp16] [--text-split ...] [--json]
    rwkvkit train [CONFIG.toml] [--resume | --resume-from CKPT] [--set KEY=VALUE ...] [--out DIR]
        [--steps N] [--stop-at STEP] [--data PATH] [--preset NAME] [--arch ARCH]
        [--device D] [--precision auto|fp32|bf16] [--no-progress]
    rwkvkit export-pth CHECKPOINT OUTPUT.pth [--dtype bf16|fp16|fp32]

(multi-GPU: ``torchrun --nproc-per-node N -m rwkvkit train CONFIG.toml``)

Importing this module registers them with :mod:`rwkvkit.cli`. It imports nothing heavy: the
data and model code is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import Command, _add_model_options, _load, _positive_int, register


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _text_split_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-split", choices=("file", "blank-lines", "lines"), default="file",
                   help="how .txt/.md files become documents: the whole file (default), runs of "
                        "lines between blank lines, or every non-blank line")


# -- prepare -------------------------------------------------------------------------------------
def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt/.md files (one document each), JSON Lines with a \"text\" field "
                        "(.jsonl/.json/.ndjson), optionally .gz, or folders of them (recursive)")
    p.add_argument("--output", "-o", required=True, metavar="PATH",
                   help="output name: PATH.tokens + PATH.json (or PATH.bin + PATH.idx), and "
                        "PATH.val.* for the validation split")
    p.add_argument("--tokenizer", default="world", metavar="world|VOCAB",
                   help="the bundled World tokenizer (default) or a World vocabulary file")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=_fraction, default=0.01, metavar="F",
                       help="fraction of the documents held out for validation (default: %(default)s; 0: none)")
    split.add_argument("--val-tokens", type=_positive_int, default=None, metavar="N",
                       help="hold out whole documents until at least N tokens instead")
    p.add_argument("--format", choices=("tokens", "binidx"), default="tokens",
                   help="rwkvkit token files (default) or Megatron/RWKV-LM .bin + .idx")
    p.add_argument("--seed", type=int, default=0, help="picks the validation documents (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable records (listed at the end) instead of stopping at the first")
    _text_split_option(p)
    p.add_argument("--ctx-len", type=_positive_int, default=None, metavar="N",
                   help="also print the magic prime of the training file for this context length")


def _run_prepare(args: argparse.Namespace) -> int:
    from .data import DataError, magic_prime, prepare

    result = prepare(
        args.inputs,
        args.output,
        args.tokenizer,
        val_fraction=0.0 if args.val_tokens else args.val_fraction,
        val_tokens=args.val_tokens,
        seed=args.seed,
        format=args.format,
        text_split=args.text_split,
        skip_bad=args.skip_bad,
        progress=None,
    )
    for bad in result.skipped:
        print(f"skipped {bad}", file=sys.stderr)
    rows = [
        ("files", f"{result.files:,}"),
        ("documents", f"{result.documents:,}"
         + (f" ({result.empty_documents:,} empty skipped)" if result.empty_documents else "")),
        ("tokens", f"{result.tokens:,}"),
        ("train", f"{result.train_documents:,} documents, {result.train_tokens:,} tokens -> {result.train_path}"),
    ]
    if result.val_path is not None:
        rows.append(("validation", f"{result.val_documents:,} documents, {result.val_tokens:,} tokens "
                                   f"-> {result.val_path}"))
    else:
        rows.append(("validation", "none"))
    if result.skipped:
        rows.append(("bad records", f"{len(result.skipped):,} skipped (listed above, on stderr)"))
    if args.ctx_len:
        try:
            rows.append(("magic prime", f"{magic_prime(result.train_tokens, args.ctx_len)} (ctx_len {args.ctx_len})"))
        except DataError as exc:
            rows.append(("magic prime", f"none: {exc}"))
    rate = result.tokens / result.seconds if result.seconds > 0 else 0.0
    rows.append(("time", f"{result.seconds:.1f} s ({rate:,.0f} tokens/s)"))
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in rows))
    return 0


# -- eval-ppl ------------------------------------------------------------------------------------
def _add_eval_ppl(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="a token file (NAME.tokens/.json, or NAME.bin/.idx), or text inputs as for "
                        "`rwkvkit prepare` (tokenized with the model's tokenizer)")
    p.add_argument("--ctx-len", type=_positive_int, default=1024, metavar="N",
                   help="tokens per forward window (default: %(default)s)")
    p.add_argument("--context", choices=("auto", "stream", "window"), default="auto",
                   help="stream: the state carries over from window to window; window: each window "
                        "is scored from a fresh state; auto (default): window for models whose state "
                        "is a growing cache (GoldFinch, Llama), else stream")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="B",
                   help="score B parts of the stream side by side, cut at document starts "
                        "(default 1: the one exact stream)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="score only the first N tokens")
    _text_split_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_eval_ppl(args: argparse.Namespace) -> int:
    from .data import DataError, is_token_data, open_tokens, tokenize_documents
    from .loss import evaluate_loss

    token_input = len(args.data) == 1 and is_token_data(args.data[0])
    if not token_input:
        for item in args.data:
            if is_token_data(item):
                raise DataError(f"{item}: a token file must be the only DATA argument")
    model = _load(args)
    if token_input:
        data = open_tokens(args.data[0])
        if data.vocab_size is not None and data.vocab_size > model.config.vocab_size:
            raise DataError(f"{data.path}: vocab_size {data.vocab_size} is larger than the model's "
                            f"{model.config.vocab_size}")
        tokens, offsets = data.tokens, data.doc_offsets
    else:
        if model.tokenizer is None:
            raise DataError(f"{args.model}: the model has no tokenizer; give a token file made by "
                            "`rwkvkit prepare` instead of text")
        tokens, offsets = tokenize_documents(args.data, model.tokenizer, text_split=args.text_split)
    windows = args.context == "window" or (args.context == "auto" and model.cache_bytes_per_token() > 0)
    result = evaluate_loss(model, tokens, doc_offsets=offsets, ctx_len=args.ctx_len,
                           batch_size=args.batch_size, max_tokens=args.max_tokens, progress=None,
                           fresh_state=windows)
    if args.json:
        out = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
               "seconds": result.seconds, "tokens_per_second": result.tokens_per_second}
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    rows = [
        ("loss", f"{result.loss:.6f} nats/token"),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("tokens", f"{result.tokens:,}"),
        ("time", f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)"),
    ]
    sys.stdout.write("".join(f"{k:<10}  {v}\n" for k, v in rows))
    return 0


register(Command("prepare", "tokenize text / JSON Lines into training token files", _add_prepare, _run_prepare))
register(Command("eval-ppl", "loss and perplexity of a model over a token file or text", _add_eval_ppl, _run_eval_ppl))


# -- train ---------------------------------------------------------------------------------------
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml",
                   help="training config (see examples/train_tiny.toml); keys may also all come from --set")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue exactly from the latest checkpoint in the output folder")
    resume.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                        help="continue exactly from this checkpoint directory (OUT/checkpoints/step-N)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. --set lr_init=3e-4 --set data.ctx_len=1024 (repeatable; "
                        "values are read as TOML, else as strings)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (train.out_dir)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="run length in optimizer steps (optim.total_steps, replacing total_tokens)")
    p.add_argument("--stop-at", type=_positive_int, default=None, metavar="STEP",
                   help="save and stop at this step, keeping the schedule of the whole run (train.stop_at_step)")
    p.add_argument("--data", default=None, metavar="PATH", help="training token file (data.train_data)")
    p.add_argument("--preset", default=None, help="model preset: tiny, 0.1b, 0.4b (model.preset)")
    p.add_argument("--arch", default=None,
                   help="rwkv7 (default), rwkv6, rwkv5, finch-c2, goldfinch or llama (model.arch)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 (train.device)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="auto: bf16 autocast on GPU, fp32 on CPU (train.precision)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a log line every log_every steps")


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .loop import train

    explicit = {"out_dir": args.out, "stop_at_step": args.stop_at, "train_data": args.data,
                "preset": args.preset, "arch": args.arch, "device": args.device, "precision": args.precision,
                "progress": False if args.no_progress else None}
    if args.steps is not None:
        explicit.update(total_steps=args.steps, total_tokens=0)
    cfg = load_config(args.config, args.overrides, **explicit)
    result = train(cfg, resume=args.resume_from or args.resume)
    return 130 if result.stopped == "SIGINT" else 0


# -- export-pth ----------------------------------------------------------------------------------
_EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint directory, a training run's out_dir (its latest checkpoint), or any "
                        "model load_model reads")
    p.add_argument("output", metavar="OUTPUT.pth", help="the official-layout .pth to write")
    p.add_argument("--dtype", choices=sorted(_EXPORT_DTYPES), default="bf16",
                   help="tensor dtype in the file (default: bf16, as the released files)")


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..checkpoint import load_model
    from .checkpointing import export_official, latest_checkpoint

    source = Path(args.checkpoint)
    if source.is_dir() and not (source / "config.json").is_file():
        found = latest_checkpoint(source / "checkpoints") or latest_checkpoint(source)
        if found is not None:
            source = found
    model = load_model(source, dtype=None)
    path = export_official(model, args.output, dtype=getattr(torch, _EXPORT_DTYPES[args.dtype]))
    print(f"{source} -> {path} ({args.dtype})")
    return 0


register(Command("train", "train an RWKV model from a TOML config (CPU, GPU, or torchrun)", _add_train, _run_train))
register(Command("export-pth", "write a checkpoint as an official RWKV .pth file", _add_export, _run_export))
