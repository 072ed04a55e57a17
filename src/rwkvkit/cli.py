"""The ``rwkvkit`` command.

    rwkvkit generate --model PATH [sampling options] PROMPT   (PROMPT "-" reads stdin)
    rwkvkit chat --model PATH [--system TEXT] [sampling options]
    rwkvkit info PATH [--json]
    rwkvkit bench [MODEL] [--device D] [--dtype T] [--quantize int8] [--prefill T] [--batch 1,8]

``--no-cuda-graphs`` (generate, chat, bench): on a GPU, prefill and decode eagerly instead of
through CUDA graphs.

Errors that are the user's (every :class:`RwkvkitError`, and OSError for files) print one
line ``rwkvkit: error: <message>`` on stderr and exit 1; Ctrl-C exits 130.

Adding a subcommand: write ``_add_NAME(parser)`` (its arguments) and ``_run_NAME(args) -> int``
and add one :class:`Command` to ``COMMANDS`` (or call :func:`register` from another module
before :func:`main` builds the parser).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence, TextIO

from .errors import RwkvkitError


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, argument setup and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = []


def register(command: Command) -> Command:
    """Add (or replace) a subcommand."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != command.name] + [command]
    return command


class CliError(RwkvkitError):
    """A bad command-line request (e.g. a device that is not available)."""


# -- shared options ------------------------------------------------------------------------------
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _unescape(text: str) -> str:
    """Backslash escapes in --stop / --system values: \\n, \\t, \\r, \\\\."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, metavar="PATH",
                   help="official .pth, a saved model directory, or a .safetensors with its config.json "
                        "(default: the small bundled model)")
    _add_weight_options(p)


def _add_weight_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="weight dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: the big matrices in int8 (about 4x fewer bytes per token than fp32)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, prefill and decode eagerly instead of replaying CUDA graphs")


def _add_sampling_options(p: argparse.ArgumentParser, defaults: Any) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help="default: %(default)s")
    g.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off (default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty,
                   help="default: %(default)s")
    g.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty,
                   help="default: %(default)s")
    g.add_argument("--penalty-decay", type=float, default=defaults.penalty_decay,
                   help="default: %(default)s")
    g.add_argument("--max-tokens", type=int, default=defaults.max_new_tokens,
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed (repeatable output)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the text contains STR (repeatable; \\n and \\t are understood)")
    g.add_argument("--ban", action="append", type=int, default=[], metavar="ID",
                   help="never generate this token id (repeatable)")


def _sampling_params(args: argparse.Namespace, base: Any) -> Any:
    return base.replace(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay,
        max_new_tokens=args.max_tokens,
        seed=args.seed,
        stop_strings=tuple(base.stop_strings) + tuple(_unescape(s) for s in args.stop),
        ban_tokens=tuple(base.ban_tokens) + tuple(args.ban),
    )


def _stdin_text(read: Callable[[], str]) -> str:
    """Text read from standard input by ``read``, or a CliError if it was not UTF-8 (depending
    on the locale Python raises, or reads such bytes as lone surrogates, which no tokenizer
    takes)."""
    try:
        text = read()
    except UnicodeDecodeError as exc:
        raise CliError(f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = exc.object[exc.start].encode("utf-8", "surrogateescape")
        raise CliError(f"standard input is not UTF-8 text (byte {byte!r} at character {exc.start})") from None
    return text


def _load_with_tokenizer(args: argparse.Namespace) -> Any:
    """_load, for the commands that read and write text: a model without a tokenizer is a
    one-line error here (the API's advice, tokenizer=..., is not a CLI option)."""
    model = _load(args)
    if model.tokenizer is None:
        raise CliError(f"{args.model}: the model has no tokenizer (its config.json names none), so the CLI "
                       "cannot read text for it; save it with one (model.tokenizer = WorldTokenizer() or "
                       "load_tokenizer(...), then model.save(...))")
    return model


def _load(args: argparse.Namespace) -> Any:
    import torch

    from .checkpoint import DEFAULT_MODEL_DIR, load_model, usable_device

    dev = usable_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    dtype_name = args.dtype or ("fp32" if dev.type == "cpu" else "bf16")
    path = args.model if args.model is not None else DEFAULT_MODEL_DIR
    return load_model(path, device=dev, dtype=getattr(torch, _DTYPES[dtype_name]), quantize=args.quantize)


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


# -- generate ------------------------------------------------------------------------------------
def _add_generate(p: argparse.ArgumentParser) -> None:
    from .generation import SamplingParams

    _add_model_options(p)
    _add_sampling_options(p, SamplingParams())
    p.add_argument("prompt", metavar="PROMPT",
                   help='prompt text; "-" reads it from stdin (one trailing newline is dropped)')


def _run_generate(args: argparse.Namespace) -> int:
    from .generation import SamplingParams, stream

    params = _sampling_params(args, SamplingParams())  # settings errors before loading
    prompt = args.prompt
    if prompt == "-":
        prompt = _stdin_text(sys.stdin.read)
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
    model = _load_with_tokenizer(args)
    out = sys.stdout
    for piece in stream(model, prompt, params, cuda_graphs=args.cuda_graphs):
        _write(out, piece)
    if out.isatty():
        _write(out, "\n")
    return 0


# -- chat ----------------------------------------------------------------------------------------
def _add_chat(p: argparse.ArgumentParser) -> None:
    from .generation import SamplingParams

    _add_model_options(p)
    _add_sampling_options(p, SamplingParams.chat())
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="text prefilled once before the conversation (\\n understood)")


def _run_chat(args: argparse.Namespace) -> int:
    from .generation import ChatSession, SamplingParams

    params = _sampling_params(args, SamplingParams.chat())
    model = _load_with_tokenizer(args)
    system = _unescape(args.system) if args.system else None
    session = ChatSession(model, params, system=system, cuda_graphs=args.cuda_graphs)
    out, interactive = sys.stdout, sys.stdin.isatty()
    if interactive:
        print("rwkvkit chat: /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            _write(out, "User: ")
        line = _stdin_text(sys.stdin.readline)
        if not line:
            if interactive:
                _write(out, "\n")
            return 0
        message = line.rstrip("\n")
        command = message.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        _write(out, "Assistant:")
        session.send(message, callback=lambda piece: _write(out, piece))
        _write(out, "\n\n")


# -- info ----------------------------------------------------------------------------------------
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="a checkpoint (.pth, .safetensors or saved directory)")
    p.add_argument("--json", action="store_true", help="print the details as JSON")


def format_info(info: dict[str, Any]) -> str:
    """The text ``rwkvkit info`` prints for an ``inspect_checkpoint`` dict."""
    lora = info.get("lora") or {}
    params = int(info["parameters"])
    rows = [
        ("file", info.get("path", "")),
        ("architecture", info["arch"]),
        ("layers", info["n_layer"]),
        ("width", info["n_embd"]),
        ("heads", f"{info['n_head']} x {info['head_size']}"),
        ("vocabulary", info["vocab_size"]),
        ("ffn", info["ffn_dim"]),
        ("low-rank", " ".join(f"{k}={v}" for k, v in lora.items()) or "-"),
        ("dtype", info["dtype"]),
        ("parameters", f"{params:,} ({params / 1e6:.2f}M)"),
        ("state", f"{int(info['state_bytes_fp32']):,} bytes per batch row (fp32)"),
        ("cache", _cache_text(info)),
        ("tuned state", "yes" if info.get("tuned_state") else "no"),
        ("tokenizer", info.get("tokenizer") or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def _cache_text(info: dict[str, Any]) -> str:
    per_token = int(info.get("cache_bytes_per_token_bf16") or 0)
    if not per_token:
        return "none (the state does not grow with the context)"
    ratio = info.get("cache_ratio_vs_llama")
    return (f"{per_token:,} bytes per token per batch row (bf16), {ratio:,.1f}x smaller than a Llama "
            f"of the same depth and width")


def _run_info(args: argparse.Namespace) -> int:
    from .checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write(format_info(info))
    return 0


# -- bench ---------------------------------------------------------------------------------------
def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the train commands use it too)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="official .pth, a saved model directory, or a .safetensors (default: the bundled model)")
    _add_weight_options(p)
    p.add_argument("--prefill", type=_positive_int, default=512, metavar="T", help="prompt length (default: %(default)s)")
    p.add_argument("--batch", type=_batch_sizes, default=[1, 8], metavar="B,B,...",
                   help="decode batch sizes (default: 1,8)")
    p.add_argument("--steps", type=_positive_int, default=32, help="decoded tokens per run (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="runs per figure, median (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import device_name, format_result, measure

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    cfg = model.config
    weights = args.quantize or str(model.dtype).replace("torch.", "")
    print(f"model    {cfg.arch} L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size} ({args.model or 'bundled'})")
    print(f"device   {model.device.type}: {device_name(model.device)}")
    print(f"weights  {weights}")
    result = measure(model, label=weights, prefill_len=args.prefill, batch_sizes=args.batch,
                     steps=args.steps, repeats=args.repeats, cuda_graphs=args.cuda_graphs)
    sys.stdout.write(format_result(result))
    return 0


register(Command("generate", "continue a prompt, streaming the text", _add_generate, _run_generate))
register(Command("chat", "interactive User/Assistant chat (reads lines from stdin)", _add_chat, _run_chat))
register(Command("info", "show a checkpoint's architecture and sizes", _add_info, _run_info))
register(Command("bench", "measure prefill and decode speed of a model", _add_bench, _run_bench))

from .train import commands as _train_commands  # noqa: E402,F401  (prepare, eval-ppl)


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rwkvkit", description="RWKV language models: inference, training, tools.")
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _error(message: str) -> int:
    one_line = " ".join(str(message).split("\n")).strip()
    print(f"rwkvkit: error: {one_line}", file=sys.stderr)
    return 1


def entry() -> NoReturn:
    """The ``rwkvkit`` console command and ``python -m rwkvkit``: exit with ``main()``'s code.
    A torchrun worker (WORLD_SIZE > 1) leaves through ``os._exit`` once ``main`` has returned
    (its run closed, the process group destroyed, stdio flushed here), skipping the
    interpreter's finalization: there, gloo's teardown aborted a CPU worker after training had
    finished (SIGABRT, "terminate called without an active exception", no Python frame left) in
    2 of ~160 two-process runs, and torchrun then fails the whole job (0 of 200 with this)."""
    code = main()
    try:
        worker = int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        worker = False
    if worker:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rwkvkit`` command; returns the exit code."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, usage errors
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return int(args._run(args))
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly.
        try:
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except Exception:  # noqa: BLE001
            pass
        return 1
    except RwkvkitError as exc:
        return _error(str(exc))
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            return _error(f"{exc.filename}: {exc.strerror}")
        return _error(str(exc) or type(exc).__name__)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
