"""examples/goldfinch: the four comparison configs share one recipe and match in size, and the
MQAR script's data and its --tiny run work."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from rwkvkit.train.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "goldfinch"
MODEL_KEYS = {"arch", "preset", "n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "lora", "extra", "init_from"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"goldfinch_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_comparison_configs_share_one_recipe():
    configs = {name: load_config(EXAMPLES / f"{name}.toml").to_dict() for name in ("llama", "finch", "finch_c2", "goldfinch")}
    assert {c["arch"] for c in configs.values()} == {"llama", "rwkv6", "finch-c2", "goldfinch"}
    recipes = [{k: v for k, v in c.items() if k not in MODEL_KEYS | {"out_dir"}} for c in configs.values()]
    assert all(r == recipes[0] for r in recipes), "the four configs must differ only in [model] and out_dir"
    r = recipes[0]
    assert (r["betas"], r["eps"], r["warmup_steps"], r["weight_decay"], r["l2wrap"]) == ([0.9, 0.99], 1e-8, 10, 0.001, 1e-4)
    assert r["train_data"] == "data/default.tokens" and r["eval_context"] == "window"
    assert len({c["out_dir"] for c in configs.values()}) == 4
    assert {(c["n_layer"], c["n_embd"], c["vocab_size"]) for c in configs.values()} == {(12, 320, 8192)}


def test_non_embedding_parameters_within_five_percent():
    counts = load_script("param_counts").param_counts()
    sizes = [c["non_embedding"] for c in counts.values()]
    assert len(sizes) == 4 and max(sizes) <= 1.05 * min(sizes), counts
    assert len({c["embedding"] for c in counts.values()}) == 1


def test_mqar_data():
    mqar = load_script("mqar")
    x, y = mqar.mqar_batch(50, 64, 8, 128, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (50, 64)
    for row_x, row_y in zip(x, y):
        keys, values = row_x[:16:2], row_x[1:16:2]
        assert len(set(keys.tolist())) == 8 and keys.max() < 64 <= values.min()
        asked = (row_y != -100).nonzero().flatten()
        assert len(asked) == 8 and asked.min() >= 16
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row_x[asked].tolist()) == sorted(keys.tolist())  # each key asked once
        for pos in asked.tolist():
            assert row_y[pos] == answer[int(row_x[pos])] == row_x[pos + 1]


def test_mqar_tiny_run(tmp_path, capsys):
    mqar = load_script("mqar")
    report = mqar.main(["--tiny", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["arch"] for r in saved["results"]] == ["llama", "finch", "finch-c2", "goldfinch"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 and r["ms_per_step"] > 0 for r in saved["results"])
    out = capsys.readouterr().out
    assert "| goldfinch |" in out and f"plot: {tmp_path / 'r.png'}" in out
    assert (tmp_path / "r.png").stat().st_size > 1000
    again = mqar.main(["--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "again.png")])
    assert again == saved and (tmp_path / "again.png").is_file()
    assert mqar.table(saved["results"]) in capsys.readouterr().out


def test_mqar_queries_are_the_scored_positions():
    mqar = load_script("mqar")
    x, y = mqar.mqar_batch(6, 64, 8, 128, torch.Generator().manual_seed(1))
    q = mqar.Queries.of(x, y, torch.device("cpu"))
    assert q.pos.shape == q.val.shape == (6, 8)
    for i in range(6):
        scored = (y[i] != -100).nonzero().flatten()
        assert q.pos[i].tolist() == scored.tolist() and q.val[i].tolist() == y[i, scored].tolist()


def test_mqar_parallel_runs_equal_the_serial_ones(tmp_path, capsys):
    """--parallel (one process per run; here on the CPU) gives the serial run's numbers."""
    mqar = load_script("mqar")
    common = ["--tiny", "--no-progress", "--device", "cpu", "--archs", "llama,goldfinch", "--no-plot"]
    serial = mqar.main(common + ["--out", str(tmp_path / "serial.json")])
    parallel = mqar.main(common + ["--parallel", "--per-gpu", "2", "--out", str(tmp_path / "par.json")])
    keep = ("arch", "seq_len", "kv_pairs", "lr", "accuracy", "final_train_loss", "steps", "parameters")
    assert [{k: r[k] for k in keep} for r in parallel["results"]] == [{k: r[k] for k in keep} for r in serial["results"]]
    assert sorted(p.name for p in (tmp_path / "par_parts").iterdir()) == [
        "goldfinch_32_4_lr0.003.json", "goldfinch_32_4_lr0.003.log", "llama_32_4_lr0.003.json", "llama_32_4_lr0.003.log"]
    assert json.loads((tmp_path / "par.json").read_text())["settings"]["device"] == "parallel, one process per run: cpu"
