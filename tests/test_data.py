"""Training data: token files, binidx, `prepare`, bad records, and the training sampler."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvkit.cli import main
from rwkvkit.tokenizer import WorldTokenizer
from rwkvkit.train import commands  # noqa: F401  (registers prepare / eval-ppl)
from rwkvkit.train.data import (
    BinIdxFile,
    DataError,
    TokenFile,
    TokenSampler,
    TokenWriter,
    find_input_files,
    is_prime,
    magic_prime,
    open_tokens,
    prepare,
    sample_start,
    write_tokens,
)

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = [
    Path("/work/shared/data/corpus/tinystories_valid_sample.jsonl.gz"),
    REPO.parent / "shared" / "data" / "corpus" / "tinystories_valid_sample.jsonl.gz",
]

DOCS = [
    "Once upon a time there was a little cat.",
    "The cat liked milk.\nIt drank it every day.",
    "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🐈 and more.",
    "  leading and trailing spaces  ",
    "A longer document. " * 60,
    "def f(x):\n    return x * 2\n",
    "Line one\r\nLine two with CRLF",
    "Last one.",
]


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


def expected_stream(tok, docs) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [0]
    return out


def write_jsonl(path: Path, docs, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
    return path


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ================================================================================================
# prepare: inputs -> token file round trips
# ================================================================================================
@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "folder"])
@pytest.mark.parametrize("fmt", ["tokens", "binidx"])
def test_prepare_round_trip(tmp_path, tok, kind, fmt):
    src = tmp_path / "in"
    src.mkdir()
    if kind == "txt":
        inputs = []
        for i, d in enumerate(DOCS):
            p = src / f"doc{i}.txt"
            p.write_bytes(d.encode("utf-8"))  # exact bytes: "\r\n" kept
            inputs.append(p)
    elif kind == "jsonl":
        inputs = [write_jsonl(src / "c.jsonl", DOCS)]
    elif kind == "jsonl.gz":
        inputs = [write_jsonl(src / "c.jsonl.gz", DOCS, gzip.open)]
    else:  # nested folder, mixed types, read in sorted relative-path order; others ignored
        (src / "b" / "c" / "deep").mkdir(parents=True)
        write_jsonl(src / "a.jsonl", DOCS[:3])
        (src / "b" / "c" / "deep" / "x.txt").write_bytes(DOCS[3].encode())
        write_jsonl(src / "b" / "d.json.gz", DOCS[4:7], gzip.open)
        (src / "e.md").write_text(DOCS[7], encoding="utf-8")
        (src / "notes.csv").write_text("ignored")
        (src / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
        inputs = [src]
    res = prepare(inputs, tmp_path / "out" / "corpus", tok, val_fraction=0, format=fmt)
    assert res.val_path is None and res.documents == len(DOCS) and res.skipped == []
    data = open_tokens(res.train_path)
    want = expected_stream(tok, DOCS)
    assert data[:].tolist() == want and len(data) == res.tokens == len(want)
    assert data.n_documents == len(DOCS)
    for text, doc in zip(DOCS, data.documents()):
        assert doc[-1] == 0 and 0 not in doc[:-1].tolist()
        assert tok.decode(doc[:-1]) == text
    if fmt == "tokens":
        assert isinstance(data, TokenFile) and res.train_path.name == "corpus.tokens"
        h = json.loads((tmp_path / "out" / "corpus.json").read_text())
        assert h["format"] == "rwkvkit-tokens" and h["version"] == 1 and h["dtype"] == "uint16"
        assert h["vocab_size"] == 65536 and h["n_tokens"] == len(want) and h["n_documents"] == len(DOCS)
        assert h["tokenizer"]["kind"] == "world" and h["tokenizer"]["file"] == "rwkv_vocab_v20230424.txt"
        assert (tmp_path / "out" / "corpus.tokens").stat().st_size == 2 * len(want)
        assert np.array_equal(np.fromfile(res.train_path, "<u2"), want)
        assert data.tokenizer().encode("cat") == tok.encode("cat")
    else:
        assert isinstance(data, BinIdxFile) and res.train_path.name == "corpus.bin"
    # nothing else is left in the output folder (no staging or temporary files)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == (["corpus.json", "corpus.tokens"] if fmt == "tokens" else ["corpus.bin", "corpus.idx"])


def test_folder_order_is_sorted_and_recursive(tmp_path):
    for rel in ["z.txt", "a/b.txt", "a/a.jsonl", "m.jsonl.gz", "a/.git/x.txt", "readme.rst"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    got = [p.relative_to(tmp_path).as_posix() for p in find_input_files([tmp_path])]
    assert got == ["a/a.jsonl", "a/b.txt", "m.jsonl.gz", "z.txt"]
    with pytest.raises(DataError, match="no such file"):
        find_input_files([tmp_path / "missing.txt"])
    if Path(os.devnull).exists():  # it exists, but holds no text
        with pytest.raises(DataError, match="not a regular file or folder"):
            find_input_files([os.devnull])
    with pytest.raises(DataError, match="unknown input type"):
        find_input_files([tmp_path / "readme.rst"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        find_input_files([tmp_path / "empty"])


def test_text_split_modes(tmp_path, tok):
    text = "First para\nstill first.\n\n\n  \nSecond para.\r\n\nThird\n"
    p = tmp_path / "t.txt"
    p.write_bytes(text.encode())
    by_blank = prepare([p], tmp_path / "b", tok, val_fraction=0, text_split="blank-lines")
    docs = [tok.decode(d[:-1]) for d in open_tokens(by_blank.train_path).documents()]
    assert docs == ["First para\nstill first.", "Second para.", "Third"]
    by_line = prepare([p], tmp_path / "l", tok, val_fraction=0, text_split="lines")
    docs = [tok.decode(d[:-1]) for d in open_tokens(by_line.train_path).documents()]
    assert docs == ["First para", "still first.", "Second para.", "Third"]  # blank/whitespace lines skipped
    whole = prepare([p], tmp_path / "w", tok, val_fraction=0)
    assert [tok.decode(d[:-1]) for d in open_tokens(whole.train_path).documents()] == [text]


def test_empty_documents_are_skipped_and_counted(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", ["a", "", "b"])
    res = prepare([src], tmp_path / "o", tok, val_fraction=0)
    assert res.documents == 2 and res.empty_documents == 1
    with pytest.raises(DataError, match="no documents"):
        prepare([write_jsonl(tmp_path / "e.jsonl", [""])], tmp_path / "o2", tok, val_fraction=0)


def test_tinystories_sample(tmp_path, tok):
    path = next((p for p in TINYSTORIES if p.is_file()), None)
    if path is None:
        pytest.skip("shared/data/corpus/tinystories_valid_sample.jsonl.gz not found")
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == 20:
                break
    small = write_jsonl(tmp_path / "ts.jsonl", texts)
    res = prepare([small], tmp_path / "ts", tok, val_fraction=0)
    assert open_tokens(res.train_path)[:].tolist() == expected_stream(tok, texts)


# ================================================================================================
# validation split
# ================================================================================================
def _docs(data):
    return [tuple(d.tolist()) for d in data.documents()]


def test_validation_split_disjoint_deterministic_whole_documents(tmp_path, tok):
    texts = [f"Document number {i}: " + "word " * (i % 7) for i in range(200)]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    all_docs = [tuple(tok.encode(t) + [0]) for t in texts]

    a = prepare([src], tmp_path / "a" / "c", tok, val_fraction=0.1, seed=5)
    train, val = open_tokens(a.train_path), open_tokens(a.val_path)
    assert a.val_path.name == "c.val.tokens" and (tmp_path / "a" / "c.val.json").is_file()
    assert a.val_documents == 20 == val.n_documents and a.train_documents == 180
    assert a.train_tokens + a.val_tokens == a.tokens == len(train) + len(val)
    tr, va = _docs(train), _docs(val)
    assert set(tr).isdisjoint(va) and sorted(tr + va) == sorted(all_docs)  # whole documents
    # both keep corpus order
    assert tr == [d for d in all_docs if d in set(tr)] and va == [d for d in all_docs if d in set(va)]

    b = prepare([src], tmp_path / "b" / "c", tok, val_fraction=0.1, seed=5)
    for x, y in [(a.train_path, b.train_path), (a.val_path, b.val_path)]:
        assert x.read_bytes() == y.read_bytes()
    c = prepare([src], tmp_path / "c" / "c", tok, val_fraction=0.1, seed=6)
    assert _docs(open_tokens(c.val_path)) != va

    d = prepare([src], tmp_path / "d" / "c", tok, val_tokens=100, seed=5)
    assert d.val_tokens >= 100 and d.val_documents >= 1
    vd = _docs(open_tokens(d.val_path))
    assert sum(map(len, vd)) - min(map(len, vd)) < 100 or len(vd) == 1  # stops once reached


def test_validation_split_edge_cases(tmp_path, tok):
    one = write_jsonl(tmp_path / "one.jsonl", ["only"])
    with pytest.raises(DataError, match="validation"):
        prepare([one], tmp_path / "o", tok, val_fraction=0.5)
    two = write_jsonl(tmp_path / "two.jsonl", ["a", "b"])
    res = prepare([two], tmp_path / "t", tok, val_fraction=0.001)  # rounds to 0 -> at least 1
    assert res.val_documents == 1 and res.train_documents == 1
    res = prepare([two], tmp_path / "u", tok, val_tokens=10**9)  # never all of them
    assert res.val_documents == 1


# ================================================================================================
# binidx
# ================================================================================================
def read_binidx_by_hand(prefix: Path):
    """An independent reader of the MMIDIDX layout, from the format description."""
    raw = (prefix.parent / (prefix.name + ".idx")).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    pos = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(raw, "<i4", n, pos)
    pointers = np.frombuffer(raw, "<i8", n, pos + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", n_doc, pos + 12 * n)
    assert len(raw) == pos + 12 * n + 8 * n_doc
    dtype = {8: "<u2", 4: "<i4"}[code]
    data = np.fromfile(prefix.parent / (prefix.name + ".bin"), dtype)
    return version, code, sizes, pointers, doc_idx, data


def write_binidx_by_hand(prefix: Path, sequences, doc_idx, code=8):
    """An independent writer of the MMIDIDX layout (Megatron dtype codes: 8 uint16, 4 int32)."""
    dtype = {8: "<u2", 4: "<i4"}[code]
    itemsize = np.dtype(dtype).itemsize
    sizes = [len(s) for s in sequences]
    pointers = np.concatenate(([0], np.cumsum(sizes)[:-1])) * itemsize
    with open(prefix.parent / (prefix.name + ".bin"), "wb") as f:
        for s in sequences:
            f.write(np.asarray(s, dtype).tobytes())
    with open(prefix.parent / (prefix.name + ".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, "<i4").tobytes())
        f.write(np.asarray(pointers, "<i8").tobytes())
        f.write(np.asarray(doc_idx, "<i8").tobytes())


def test_binidx_writer_layout_follows_make_data(tmp_path, tok):
    """As RWKV-LM's make_data.py: one sequence per document, ending with token 0;
    doc_idx = [0, 1, ..., n]; uint16 = dtype code 8."""
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    res = prepare([src], tmp_path / "bi", tok, val_fraction=0, format="binidx")
    version, code, sizes, pointers, doc_idx, data = read_binidx_by_hand(tmp_path / "bi")
    assert (version, code) == (1, 8)
    enc = [tok.encode(d) for d in DOCS]
    assert sizes.tolist() == [len(e) + 1 for e in enc]
    assert pointers.tolist() == (2 * np.concatenate(([0], np.cumsum(sizes)[:-1]))).tolist()
    assert doc_idx.tolist() == list(range(len(DOCS) + 1))
    assert data.tolist() == expected_stream(tok, DOCS)
    for e, p, s in zip(enc, pointers, sizes):
        seq = data[p // 2 : p // 2 + s]
        assert seq[-1] == 0 and seq[:-1].tolist() == e
    assert res.train_path == tmp_path / "bi.bin"


def test_binidx_reader_on_hand_written_files(tmp_path):
    seqs = [[5, 6, 7, 0], [8, 0], [9, 10, 11, 12, 0]]
    write_binidx_by_hand(tmp_path / "rw", seqs, [0, 1, 2, 3])
    d = BinIdxFile(tmp_path / "rw.bin")
    assert d[:].tolist() == sum(seqs, []) and d.dtype == np.dtype("<u2") and d.vocab_size is None
    assert [x.tolist() for x in d.documents()] == seqs
    assert d.doc_offsets.tolist() == [0, 4, 6]
    for name in ("rw", "rw.idx", "rw.bin"):
        assert open_tokens(tmp_path / name)[:].tolist() == sum(seqs, [])
    # Megatron style: several sequences per document, int32 ids
    write_binidx_by_hand(tmp_path / "mg", [[1, 2], [3], [70000, 4], [5]], [0, 2, 4], code=4)
    m = BinIdxFile(tmp_path / "mg")
    assert m.dtype == np.dtype("<i4") and [x.tolist() for x in m.documents()] == [[1, 2, 3], [70000, 4, 5]]


def test_binidx_round_trip_large_vocab(tmp_path):
    docs = [[1, 70000, 3], [65536, 99999]]
    d = write_tokens(tmp_path / "big", docs, vocab_size=100000, format="binidx")
    assert d.dtype == np.dtype("<i4") and [x.tolist() for x in d.documents()] == [[1, 70000, 3, 0], [65536, 99999, 0]]
    version, code, *_ = read_binidx_by_hand(tmp_path / "big")
    assert code == 4
    t = write_tokens(tmp_path / "bigt", docs, vocab_size=100000)
    assert t.dtype == np.dtype("<u4") and json.loads((tmp_path / "bigt.json").read_text())["dtype"] == "uint32"
    assert t[:].tolist() == [1, 70000, 3, 0, 65536, 99999, 0]


def test_binidx_errors(tmp_path):
    write_binidx_by_hand(tmp_path / "ok", [[1, 0], [2, 0]], [0, 1, 2])
    idx = (tmp_path / "ok.idx").read_bytes()

    def bad(name, data, match, bin_data=None):
        (tmp_path / f"{name}.idx").write_bytes(data)
        (tmp_path / f"{name}.bin").write_bytes(bin_data if bin_data is not None else (tmp_path / "ok.bin").read_bytes())
        with pytest.raises(DataError, match=match):
            BinIdxFile(tmp_path / name)

    bad("magic", b"NOTMAGIC\x00" + idx[9:], "magic")
    bad("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], "version 2")
    bad("float", idx[:17] + bytes([6]) + idx[18:], "floating point")
    bad("code", idx[:17] + bytes([9]) + idx[18:], "unknown dtype code 9")
    bad("trunc", idx[:-8], "truncated")
    bad("short", idx[:20], "truncated header")
    bad("binsize", idx, r"binsize\.bin: 6 bytes, but binsize\.idx describes 4 tokens", bin_data=b"\x01\x00\x00\x00\x02\x00")
    with pytest.raises(DataError, match="no such file"):
        BinIdxFile(tmp_path / "missing")


# ================================================================================================
# our token file: header validation, offsets file, atomic writes
# ================================================================================================
def make_token_file(tmp_path, name="t", docs=([3, 4], [5], [6, 7, 8])):
    return write_tokens(tmp_path / name, docs, vocab_size=100, tokenizer={"kind": "world", "file": "v.txt"})


def test_token_file_api(tmp_path):
    t = make_token_file(tmp_path)
    assert len(t) == 9 and t[0] == 3 and isinstance(t[0], int) and t[2:4].tolist() == [0, 5]
    assert t.n_documents == 3 and t.doc_offsets.tolist() == [0, 3, 5]
    assert t.document(-1).tolist() == [6, 7, 8, 0] and t.document_bounds(1) == (3, 5)
    assert not t.tokens.flags.writeable
    for name in ("t", "t.tokens", "t.json"):
        assert TokenFile.open(tmp_path / name)[:].tolist() == [3, 4, 0, 5, 0, 6, 7, 8, 0]
    import pickle

    again = pickle.loads(pickle.dumps(t))
    assert again[:].tolist() == t[:].tolist() and len(pickle.dumps(t)) < 500  # pickles as its path
    with pytest.raises(DataError, match="outside the vocabulary"):
        write_tokens(tmp_path / "x", [[100]], vocab_size=100)


def test_offsets_in_npy_file(tmp_path):
    docs = [[i + 1] * (i % 3 + 1) for i in range(10)]
    with TokenWriter(tmp_path / "n", vocab_size=50, offsets_inline_max=4) as w:
        for d in docs:
            w.add_document(d)
    h = json.loads((tmp_path / "n.json").read_text())
    assert "doc_offsets" not in h and h["doc_offsets_file"] == "n.offsets.npy"
    t = TokenFile(tmp_path / "n")
    assert [x.tolist()[:-1] for x in t.documents()] == docs
    # rewriting it small puts the offsets back inline and removes the stale .npy
    write_tokens(tmp_path / "n", docs[:2], vocab_size=50)
    assert not (tmp_path / "n.offsets.npy").exists() and TokenFile(tmp_path / "n").n_documents == 2


def test_writer_is_atomic(tmp_path):
    make_token_file(tmp_path, "a")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "a", vocab_size=100) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temp files
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "new", vocab_size=100, format="binidx") as w:
            w.add_document([1])
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h: h.pop("format"), r"t\.json: field 'format' is None"),
        (lambda h: h.update(format="other"), "field 'format'"),
        (lambda h: h.update(version=2), "field 'version' is 2"),
        (lambda h: h.update(dtype="int8"), "field 'dtype'"),
        (lambda h: h.pop("n_tokens"), "missing field 'n_tokens'"),
        (lambda h: h.update(n_tokens=-1), "field 'n_tokens' must be an integer"),
        (lambda h: h.update(vocab_size="big"), "field 'vocab_size'"),
        (lambda h: h.update(vocab_size=70000), "does not fit dtype uint16"),
        (lambda h: h.update(n_tokens=10), r"t\.tokens: 18 bytes, but the header's 'n_tokens' 10"),
        (lambda h: h.update(n_documents=2), "'doc_offsets' has 3 entries, 'n_documents' says 2"),
        (lambda h: h.update(doc_offsets=[0, 3, 3]), "increase strictly"),
        (lambda h: h.update(doc_offsets=[0, 2, 5]), "document 0 does not end with token 0"),
        (lambda h: h.pop("doc_offsets"), "missing field 'doc_offsets'"),
        (lambda h: h.update(doc_offsets="x"), "must be a list of integers"),
        (lambda h: h.update(tokenizer=3), "field 'tokenizer'"),
    ],
)
def test_header_validation(tmp_path, change, match):
    make_token_file(tmp_path)
    hp = tmp_path / "t.json"
    h = json.loads(hp.read_text())
    change(h)
    hp.write_text(json.dumps(h))
    with pytest.raises(DataError, match=match):
        TokenFile(tmp_path / "t.tokens")


def test_header_file_problems(tmp_path):
    make_token_file(tmp_path)
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(DataError, match=r"t\.json: not a valid JSON header"):
        TokenFile(tmp_path / "t")
    (tmp_path / "t.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must be a JSON object"):
        TokenFile(tmp_path / "t")
    (tmp_path / "t.json").unlink()
    with pytest.raises(DataError, match=r"t\.json: missing header"):
        TokenFile(tmp_path / "t.tokens")
    with pytest.raises(DataError, match=r"nope\.tokens: no such token file \(nope\.tokens and nope\.json\)"):
        TokenFile(tmp_path / "nope.tokens")
    make_token_file(tmp_path, "u")
    (tmp_path / "u.tokens").unlink()
    with pytest.raises(DataError, match=r"u\.tokens: no such file"):
        TokenFile(tmp_path / "u")
    make_token_file(tmp_path, "v")
    with open(tmp_path / "v.tokens", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated"):
        open_tokens(tmp_path / "v")
    with pytest.raises(DataError, match="not a token file"):
        open_tokens(tmp_path / "nothing")


# ================================================================================================
# bad records
# ================================================================================================
BAD_LINES = [
    b'{"text": "good one"}',  # 1
    b'{"text": "broken',  # 2 invalid JSON
    b"",  # 3 blank: ignored
    b'{"title": "no text"}',  # 4
    b'{"text": 42}',  # 5
    b'{"text": "caf\xe9"}',  # 6 invalid UTF-8 (latin-1 byte)
    b'["text"]',  # 7 not an object
    b'{"text": "\\ud800 lone surrogate"}',  # 8 valid JSON, no UTF-8 form
    b'{"text": "good two"}',  # 9
]


def test_bad_records_raise_with_file_and_line(tmp_path, tok):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    with pytest.raises(DataError, match=rf"{src}:2: invalid JSON.*--skip-bad"):
        prepare([src], tmp_path / "o", tok, val_fraction=0)
    assert not any(p.name.startswith("o") or "staging" in p.name for p in tmp_path.iterdir())


def test_bad_records_skipped_and_listed(tmp_path, tok):
    src = tmp_path / "bad.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"\n".join(BAD_LINES) + b"\n")
    res = prepare([src], tmp_path / "o", tok, val_fraction=0, skip_bad=True)
    assert [(b.source, b.line) for b in res.skipped] == [(str(src), n) for n in (2, 4, 5, 6, 7, 8)]
    reasons = [b.reason for b in res.skipped]
    assert "invalid JSON" in reasons[0] and reasons[1] == 'no "text" field'
    assert reasons[2] == '"text" is a number, not a string' and "invalid UTF-8" in reasons[3]
    assert "got an array" in reasons[4] and "surrogate" in reasons[5]
    assert [tok.decode(d[:-1]) for d in open_tokens(res.train_path).documents()] == ["good one", "good two"]


def test_bad_text_files(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_bytes(b"fine\nstill fine\n\nbad \xff here\nmore\n\nok again\n")
    with pytest.raises(DataError, match=rf"{p}:4: invalid UTF-8"):
        prepare([p], tmp_path / "o", tok, val_fraction=0)
    res = prepare([p], tmp_path / "o", tok, val_fraction=0, skip_bad=True, text_split="blank-lines")
    assert [(b.line, "line 4" in b.reason or "starting at line 4" in b.reason) for b in res.skipped] == [(4, True)]
    assert [tok.decode(d[:-1]) for d in open_tokens(res.train_path).documents()] == ["fine\nstill fine", "ok again"]
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    with pytest.raises(DataError, match="corrupt gzip"):
        prepare([gz], tmp_path / "g", tok, val_fraction=0, skip_bad=True)


def test_cli_prepare(tmp_path, tok, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    code, out, err = run_cli(["prepare", src, "--output", tmp_path / "o"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("rwkvkit: error: ") and f"{src}:2: invalid JSON" in err

    code, out, err = run_cli(["prepare", src, "-o", tmp_path / "o", "--skip-bad", "--val-fraction", "0"], capsys)
    assert code == 0
    assert [line.split(": ")[0] for line in err.splitlines()] == [f"skipped {src}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    assert "documents    2" in out and "6 skipped" in out and "validation   none" in out

    good = write_jsonl(tmp_path / "g.jsonl", [f"doc {i} " * 40 for i in range(30)])
    code, out, err = run_cli(["prepare", good, "-o", tmp_path / "g", "--format", "binidx",
                              "--val-tokens", "50", "--seed", "3", "--ctx-len", "64"], capsys)
    assert code == 0, err
    assert "magic prime" in out and str(tmp_path / "g.val.bin") in out
    assert BinIdxFile(tmp_path / "g").n_documents + BinIdxFile(tmp_path / "g.val").n_documents == 30

    code, out, err = run_cli(["prepare", good, "-o", tmp_path / "x", "--val-fraction", "1.5"], capsys)
    assert code == 2 and "--val-fraction" in err


# ================================================================================================
# sampler
# ================================================================================================
def test_is_prime_and_magic_prime():
    small = [n for n in range(2, 5000) if all(n % d for d in range(2, int(n**0.5) + 1))]
    assert [n for n in range(5000) if is_prime(n)] == small
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1) and not is_prime(3215031751)  # strong pseudoprime to 2,3,5,7
    for n_tokens, ctx in [(100_000, 512), (1_000_003, 64), (3 * 128, 128), (10**9, 4096)]:
        p = magic_prime(n_tokens, ctx)
        top = n_tokens // ctx - 1
        assert p % 3 == 2 and is_prime(p) and p <= top
        assert not any(q % 3 == 2 and is_prime(q) for q in range(p + 1, top + 1))
        assert p * ctx + 1 <= n_tokens  # the last sample fits
    assert magic_prime(1_498_226_207, 512) == 2926181  # RWKV-LM README: minipile, ctx 512
    with pytest.raises(DataError, match="too few"):
        magic_prime(3 * 128 - 1, 128)


@pytest.mark.parametrize("p", [2, 5, 11, 17, 23, 29, 41, 47, 1013, 32297])
def test_magic_order_is_a_permutation(p):
    assert p % 3 == 2 and is_prime(p)
    slots = [sample_start(i, p, 1) for i in range(p)]
    assert sorted(slots) == list(range(p))
    assert [sample_start(i + p, p, 1) for i in range(p)] == slots  # then it repeats
    # the official formula, written out independently (RWKV-LM numbers samples from ii = 1)
    factor = int(p * (math.sqrt(5) - 1) / 2)
    assert slots == [((factor * ii * ii * ii) % p) for ii in range(1, p + 1)]


def test_sampler_batches_match_the_data_and_the_official_read(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(rng.integers(5, 60))).tolist() for _ in range(120)]
    data = write_tokens(tmp_path / "s", docs, vocab_size=1000, format="binidx")
    ctx = 16
    s = TokenSampler(data, ctx, 4)
    assert s.prime == magic_prime(len(data), ctx)
    flat = np.fromfile(tmp_path / "s.bin", "<u2").astype(np.int64)  # the official flat read
    for step in (0, 1, 7):
        x, y = s.batch(step)
        assert x.dtype == torch.long and x.shape == y.shape == (4, ctx)
        for b in range(4):
            ii = 1 + step * 4 + b
            start = ((int(s.prime * ((math.sqrt(5) - 1) / 2)) * ii**3) % s.prime) * ctx
            assert x[b].tolist() == flat[start : start + ctx].tolist()
            assert y[b].tolist() == flat[start + 1 : start + ctx + 1].tolist()


def test_sampler_resume_and_determinism(tmp_path):
    data = write_tokens(tmp_path / "s", [list(range(1, 400))] * 5, vocab_size=500)
    for order in ("magic", "shuffle", "sequential"):
        a = TokenSampler(data, 8, 3, order=order, seed=1)
        run = [a.batch(s) for s in range(20)]
        b = TokenSampler(TokenFile(tmp_path / "s"), 8, 3, order=order, seed=1)  # a fresh one: same batches
        resumed = list(b.iterate(start_step=12, end_step=20))
        for (x1, y1), (x2, y2) in zip(run[12:], resumed):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("order", ["magic", "shuffle", "sequential"])
def test_sampler_ranks_are_disjoint(tmp_path, order):
    data = write_tokens(tmp_path / "s", [list(range(1, 300))] * 10, vocab_size=300)
    W, B, ctx = 4, 3, 8
    samplers = [TokenSampler(data, ctx, B, order=order, rank=r, world_size=W, seed=2) for r in range(W)]
    n = samplers[0].n_samples
    steps = n // (W * B)  # one pass
    indices = [i for s in range(steps) for smp in samplers for i in smp.sample_indices(s)]
    assert sorted(indices) == list(range(steps * W * B))
    starts = [int(v) for s in range(steps) for smp in samplers for v in smp.starts(s)]
    assert len(set(starts)) == len(starts)  # no two ranks (or rows) read the same window in a pass
    assert all(st % ctx == 0 and st + ctx + 1 <= len(data) for st in starts)
    if order != "magic":
        one = TokenSampler(data, ctx, 1, order=order, seed=2)
        assert sorted(int(one.starts(i)[0]) for i in range(n)) == [k * ctx for k in range(n)]
    assert samplers[1].sample_indices(2) == [2 * W * B + b * W + 1 for b in range(B)]


def test_sampler_errors(tmp_path):
    data = write_tokens(tmp_path / "s", [[1] * 20], vocab_size=10)
    with pytest.raises(DataError, match="too few"):
        TokenSampler(data, 16, 1)
    with pytest.raises(DataError, match="not a prime"):
        TokenSampler(data, 2, 1, prime=7)
    with pytest.raises(DataError, match="past the data"):
        TokenSampler(data, 2, 1, prime=11)
    with pytest.raises(DataError, match="rank"):
        TokenSampler(data, 2, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="order"):
        TokenSampler(data, 2, 1, order="random")


def test_bom_stale_split_and_json_hint(tmp_path, tok):
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    t = tmp_path / "bom.txt"
    t.write_bytes(b"\xef\xbb\xbfhello")
    res = prepare([j, t], tmp_path / "o", tok, val_fraction=0.5)
    assert res.val_path is not None and (tmp_path / "o.val.json").is_file()
    both = _docs(open_tokens(res.train_path)) + _docs(open_tokens(res.val_path))
    assert sorted(both) == sorted(tuple(tok.encode(x) + [0]) for x in ("a", "b", "hello"))
    prepare([j, t], tmp_path / "o", tok, val_fraction=0)  # no split now: the old one is removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.")) == ["o.json", "o.tokens"]
    arr = tmp_path / "array.json"
    arr.write_text('[\n  {"text": "x"}\n]\n')
    with pytest.raises(DataError, match=r"array\.json:1: invalid JSON.*read as JSON Lines"):
        prepare([arr], tmp_path / "a", tok, val_fraction=0)
