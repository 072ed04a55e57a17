"""The `rwkvkit` command: info, generate, chat, and error reporting."""

from __future__ import annotations

import io
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from official_files import make_rwkv7_state_dict
from rwkvkit import load_model
from rwkvkit.cli import COMMANDS, Command, main, register
from rwkvkit.generation import ChatSession, SamplingParams, generate

SRC = Path(__file__).resolve().parents[1] / "src"




@pytest.fixture(scope="module")
def world_file(tmp_path_factory):
    sd = make_rwkv7_state_dict(2, 64, 32, 65536, (8, 8, 8, 16), seed=3, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("cli") / "RWKV-x070-tiny.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def world_model(world_file):
    return load_model(world_file)


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text_and_json(world_file, capsys):
    code, out, err = run(["info", world_file], capsys)
    assert code == 0 and err == ""
    assert "rwkv7" in out and "2 x 32" in out and "65536" in out and "w=8 a=8 v=8 g=16" in out
    assert "bfloat16" in out and "per batch row (fp32)" in out and "world" in out
    info = json.loads(run(["info", world_file, "--json"], capsys)[1])
    assert info["arch"] == "rwkv7" and info["n_layer"] == 2 and info["vocab_size"] == 65536
    assert f"{info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)" in out
    assert f"{info['state_bytes_fp32']:,} bytes" in out
    assert re.search(r"^tuned state +no$", out, re.M) and re.search(r"^tokenizer +world$", out, re.M)


def test_generate_streams_what_the_api_gives(world_file, world_model, capsys, monkeypatch):
    expected = generate(world_model, "Hello", temperature=0, max_new_tokens=8)
    code, out, err = run(["generate", "--model", world_file, "--temperature", "0", "--max-tokens", "8", "Hello"], capsys)
    assert code == 0 and out == expected and err == ""
    code, out, _ = run(["generate", "-m", world_file, "--temperature", "0", "--max-tokens", "8", "-"], capsys,
                       stdin="Hello\n", monkeypatch=monkeypatch)
    assert code == 0 and out == expected
    sampled = generate(world_model, "Hi", SamplingParams(seed=5, top_k=20, max_new_tokens=6, stop_strings=("\n\n", "e")))
    code, out, _ = run(["generate", "-m", world_file, "--seed", "5", "--top-k", "20", "--max-tokens", "6",
                        "--stop", "\\n\\n", "--stop", "e", "Hi"], capsys)
    assert code == 0 and out == sampled


def test_chat_over_piped_stdin(world_file, world_model, capsys, monkeypatch):
    code, out, err = run(
        ["chat", "-m", world_file, "--seed", "2", "--max-tokens", "10", "--system", "System: be kind"],
        capsys, stdin="hi\n/reset\n\nhello there\n/exit\nnever read\n", monkeypatch=monkeypatch,
    )
    assert code == 0 and out.count("Assistant:") == 2 and "reset" in err
    chat = ChatSession(world_model, SamplingParams.chat(seed=2, max_new_tokens=10), system="System: be kind")
    a = chat.send("hi").text
    chat.reset()
    b = chat.send("hello there").text
    assert out == f"Assistant:{a}\n\nAssistant:{b}\n\n"
    code, out, _ = run(["chat", "-m", world_file, "--max-tokens", "3"], capsys, stdin="one\ntwo\n", monkeypatch=monkeypatch)
    assert code == 0 and out.count("Assistant:") == 2  # EOF ends the chat


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent/model.pth"], "/nonexistent/model.pth"),
        (["generate", "-m", "/nonexistent/model.pth", "hi"], "/nonexistent/model.pth"),
        (["generate", "-m", "MODEL", "--top-p", "2", "hi"], "top_p=2.0"),
        (["generate", "-m", "MODEL", "--temperature", "-1", "hi"], "temperature=-1.0"),
        (["info", "GARBAGE"], "GARBAGE"),
        (["generate", "-m", "MODEL", "--seed", str(2**70), "hi"], "seed=1180591620717411303424: must be <="),
        (["generate", "-m", "MODEL", "--device", "meta", "hi"], "--device meta holds no values"),
        (["generate", "-m", "MODEL", "--device", "foo", "hi"], "--device 'foo': not a torch device"),
    ] + ([] if torch.cuda.is_available() else [
        (["generate", "-m", "MODEL", "--device", "cuda:0", "hi"], "--device cuda:0: CUDA is not available"),
    ]),
)
def test_errors_are_one_line(argv, message, world_file, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    argv = [str(world_file) if a == "MODEL" else str(garbage) if a == "GARBAGE" else a for a in argv]
    message = str(garbage) if message == "GARBAGE" else message
    code, out, err = run(argv, capsys)
    assert code == 1 and out == ""
    assert err.startswith("rwkvkit: error: ") and err.count("\n") == 1 and message in err


def test_usage_errors_and_help(capsys):
    assert main(["generate"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out and "info" in out


def test_new_subcommand_and_ctrl_c(capsys):
    def boom(args):
        raise KeyboardInterrupt

    register(Command("boom", "test only", lambda p: p.add_argument("--x"), boom))
    try:
        assert main(["boom", "--x", "1"]) == 130
        assert capsys.readouterr().err == ""
    finally:
        COMMANDS[:] = [c for c in COMMANDS if c.name != "boom"]


def test_module_entry_point_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvkit", "info", str(tmp_path / "missing.pth")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("rwkvkit: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("encoding", ["utf-8:strict", "utf-8:surrogateescape"])
def test_stdin_that_is_not_utf8(encoding):
    """Bytes that are not UTF-8 on standard input: one line, whether Python's stdin raises
    (strict) or reads them as lone surrogates."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONIOENCODING": encoding}
    proc = subprocess.run([sys.executable, "-m", "rwkvkit", "generate", "--max-tokens", "1", "-"],
                          input=b"hi \xff there", capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b"" and err.count("\n") == 1
    assert err.startswith("rwkvkit: error: standard input is not UTF-8 text")


def test_entry_leaves_torchrun_workers_through_os_exit(monkeypatch):
    """entry(): main's code through sys.exit, or through os._exit in a torchrun worker."""
    import rwkvkit.cli as cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(cli, "main", lambda: 7)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    for world, how in (("2", Exited), ("1", SystemExit), ("", SystemExit), ("x", SystemExit)):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(how) as exc:
            cli.entry()
        assert exc.value.args[0] == 7 if how is Exited else exc.value.code == 7, world
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        cli.entry()


def test_text_commands_need_a_tokenizer(tmp_path, capsys):
    """generate and chat on a saved model without a tokenizer: one line naming the model and
    what to do (not the Python API's tokenizer=... advice); info still works."""
    from rwkvkit.config import ModelConfig
    from rwkvkit.models.registry import model_class

    saved = model_class("rwkv7")(ModelConfig(arch="rwkv7", n_layer=1, n_embd=64, head_size=32, vocab_size=50))
    saved.save(tmp_path / "notok")
    for argv in (["generate", "-m", tmp_path / "notok", "hi"], ["chat", "-m", tmp_path / "notok"]):
        code, out, err = run(argv, capsys)
        assert code == 1 and out == "" and err.count("\n") == 1
        assert f"{tmp_path / 'notok'}: the model has no tokenizer" in err and "tokenizer=..." not in err
    assert run(["info", tmp_path / "notok"], capsys)[0] == 0
