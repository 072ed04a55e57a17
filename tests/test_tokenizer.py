"""The World tokenizer: ids identical to the reference ``rwkv`` package on any text, lossless
round trips, streaming decoding, vocabulary files and save/load."""

import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rwkvkit.tokenizer as tokenizer_module
from rwkvkit.errors import TokenizerError
from rwkvkit.tokenizer import DEFAULT_VOCAB_FILE, WorldTokenizer, load_tokenizer

TOK = WorldTokenizer()  # shared: encoding is deterministic, its piece cache only saves time


def _token_texts() -> list[str]:
    """Every token whose bytes are valid UTF-8, as text: building blocks that hit long tokens."""
    texts = []
    for token_id in range(1, 65530):
        try:
            texts.append(TOK.decode_bytes([token_id]).decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return texts


TOKEN_TEXTS = _token_texts()
LONG_TOKEN_TEXTS = [t for t in TOKEN_TEXTS if len(t.encode()) >= 8]

SAMPLES = {
    "empty": "",
    "english": "Once upon a time, in a big forest, there lived a rhinoceros named Roxy. "
    "She loved to climb! \"Wow,\" said Kitty — isn't it bright?\n\nThe end.",
    "chinese": "人工智能正在改变我们的生活方式。语言模型是一种能够理解和生成自然语言的计算机程序，"
    "“你好！”他说：我们明天早上八点在火车站见面。\n",
    "japanese": "吾輩は猫である。名前はまだ無い。東京の桜は三月の終わりごろに咲き始めます。カタカナ",
    "korean": "파이썬은 강력한 기능을 지닌 범용 컴퓨터 프로그래밍 언어다.",
    "code": 'def main(argv):\n    """Doc."""\n    for i in range(10):\n        if i % 2 == 0:\n'
    '            print(f"{i:>4d}\\t{argv!r}")  # comment\n\treturn {"a": [1, 2.5e-3]}\n',
    "emoji": "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 🧑🏿‍🚀 a🤖b",
    "whitespace": " \t\n\r\n  \n\n\n" + " " * 300 + "x" + "\t" * 70 + "\n" * 40 + "  \u3000\u00a0 ",
    "mixed": "Straße café naïve Ελληνικά русский עברית العربية हिन्दी ไทย 中文 日本語 한국어 e\u0301",
    "controls": "".join(map(chr, range(32))) + "\x7f\x80\x9f\u200b\u200d\ufeff\ufffd\U0010ffff",
    "latin1": "".join(map(chr, range(256))),
    "rules": "=" * 200 + "\n" + "-" * 99 + "#" * 81 + "*" * 40 + "." * 33,
}


@pytest.fixture(scope="module")
def ref():
    """The reference tokenizer of the rwkv package (pure Python; takes a second or two)."""
    module = pytest.importorskip("rwkv.rwkv_tokenizer")
    return module.TRIE_TOKENIZER(str(DEFAULT_VOCAB_FILE))


@contextmanager
def patched(**values):
    """Temporarily set module constants of rwkvkit.tokenizer."""
    with mock.patch.multiple(tokenizer_module, **values):
        yield


def encodings(text: str) -> dict[str, list[int]]:
    """encode() as configured, with the numpy piece path forced even for tiny inputs
    (from a cold piece cache, then a warm one), and with the pure-Python matcher only."""
    out = {"default": TOK.encode(text)}
    with patched(_VECTOR_MIN_BYTES=2):
        TOK._pieces.clear()
        out["pieces-cold"] = TOK.encode(text)
        out["pieces-warm"] = TOK.encode(text)
    with patched(_VECTOR_MIN_BYTES=float("inf")):
        out["matcher"] = TOK.encode(text)
    return out


def assert_matches(ref, text: str) -> None:
    expected = ref.encode(text)
    for path, ids in encodings(text).items():
        assert ids == expected, f"{path} differs from the reference on {text[:60]!r}"


# -- ids identical to the reference ---------------------------------------------------------------
def test_bundled_vocabulary_matches_reference(ref):
    assert TOK.vocab_size == 65536 and TOK.eot_id == 0 and TOK.kind == "world"
    assert TOK.vocab_file == DEFAULT_VOCAB_FILE
    assert {i: TOK.decode_bytes([i]) for i in ref.idx2token} == ref.idx2token
    assert TOK.decode_bytes([0]) == b""


def test_short_token_index_is_exact():
    """The vectorised index finds every token of at most 15 bytes and nothing else (a miss
    would only cost speed, a false hit would give wrong ids)."""
    tokens = [TOK.decode_bytes([i]) for i in range(1, 65530)]
    short = [t for t in tokens if len(t) <= 15]
    data = b"".join(short) + b"."
    lengths = np.array([len(t) for t in short])
    starts = np.cumsum(lengths) - lengths
    ids = {t: i for i, t in enumerate(tokens, 1)}
    assert TOK._index.lookup(data, starts, lengths).tolist() == [ids[t] for t in short]
    longer = [data[s : s + n + 1] for s, n in zip(starts.tolist(), lengths.tolist())]
    expected = [ids.get(t, 0) if len(t) <= 15 else 0 for t in longer]
    assert TOK._index.lookup(data, starts, lengths + 1).tolist() == expected


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_match_reference(ref, name):
    assert_matches(ref, SAMPLES[name])
    assert TOK.decode(TOK.encode(SAMPLES[name])) == SAMPLES[name]


def test_long_mixed_text_matches_reference(ref):
    rng = random.Random(1234)
    samples = list(SAMPLES.values())
    text = "".join(rng.choice(TOKEN_TEXTS if rng.random() < 0.7 else samples) for _ in range(4000))
    assert_matches(ref, text)
    assert all(type(i) is int for i in TOK.encode(text))  # plain ints, not numpy scalars


@pytest.mark.parametrize(
    "text",
    [
        "a" * 20000,
        " " * 20000,
        "\n" * 5000,
        "ab" * 10000,
        "=-" * 5000,
        "".join(map(chr, range(256))) * 40,
        "中" * 7000,
        "".join(" " * (n * 37 % 150) + "\n" + "\t" * (n % 7) for n in range(400)),  # one long piece
    ],
    ids=["a", "spaces", "newlines", "ab", "=-", "latin1", "zh", "ragged-whitespace"],
)
def test_pathological_runs_match_reference(ref, text):
    assert_matches(ref, text)
    with patched(_MEMO_LIMIT=3):  # the walk's memo, emptied while it works
        assert_matches(ref, text)


@pytest.mark.parametrize(
    "text", ["a" * 1_000_000, " " * 1_000_000, "".join(map(chr, range(256))) * 2000]
)
def test_megabyte_inputs_are_fast(text):
    start = time.perf_counter()
    ids = TOK.encode(text)
    assert time.perf_counter() - start < 20  # linear: well under a second here
    assert TOK.decode(ids) == text


def test_piece_cache_is_bounded(ref):
    text = SAMPLES["code"] * 3 + "".join(random.Random(5).choices(TOKEN_TEXTS, k=3000))
    fresh = WorldTokenizer()
    with patched(_PIECE_CACHE_LIMIT=8):
        assert fresh.encode(text) == ref.encode(text)
        assert 0 < len(fresh._pieces) <= 8


def test_shared_between_threads(ref):
    texts = [SAMPLES["code"] * 20, SAMPLES["english"] * 20, SAMPLES["chinese"] * 20] * 4
    with patched(_PIECE_CACHE_LIMIT=4), ThreadPoolExecutor(4) as pool:
        results = list(pool.map(TOK.encode, texts * 5))
    assert results == [ref.encode(t) for t in texts * 5]


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
_token_text = st.lists(
    st.one_of(st.sampled_from(TOKEN_TEXTS), st.sampled_from(LONG_TOKEN_TEXTS), _text), max_size=25
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_text)
def test_any_text_matches_reference(ref, text):
    assert_matches(ref, text)


@settings(max_examples=300, deadline=None)
@given(_token_text)
def test_text_made_of_tokens_matches_reference(ref, text):
    assert_matches(ref, text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, _token_text))
def test_decode_inverts_encode(text):
    for ids in encodings(text).values():
        assert TOK.decode(ids) == text


def test_lone_surrogate_is_refused():
    with pytest.raises(TokenizerError, match=r"index 2 .*U\+D800"):
        TOK.encode("ab\ud800c")
    with pytest.raises(TokenizerError, match="index 300"):
        TOK.encode("x" * 300 + "\udcff")
    with pytest.raises(TokenizerError, match="takes a str"):
        TOK.encode(b"bytes")  # type: ignore[arg-type]


# -- decoding ----------------------------------------------------------------------------------
def byte_ids(data: bytes) -> list[int]:
    """One single-byte token per byte (ids 1..256 are the bytes 0x00..0xFF)."""
    return [b + 1 for b in data]


def test_decode_end_of_text_and_bad_ids():
    ids = TOK.encode("hello world")
    assert TOK.decode([0]) == "" and TOK.decode([]) == ""
    assert TOK.decode([0, *ids, 0]) == "hello world"
    assert TOK.decode(np.array(ids)) == "hello world"
    for bad in (-1, 65530, 65535, 65536, 10**12):
        with pytest.raises(TokenizerError, match=str(bad)):
            TOK.decode([*ids, bad])
        with pytest.raises(TokenizerError, match=str(bad)):
            TOK.decoder().feed(bad)
    assert TOK.decode(torch.tensor(ids)) == TOK.decode(range(0)) + "hello world"
    for bad, message in [(torch.tensor([ids]), "one flat sequence of integer token ids, found \\["),
                         ([65.0], "found 65.0"), ([True], "found True"), (5, "got int"), (None, "got NoneType"),
                         ("hello", "got str")]:
        with pytest.raises(TokenizerError, match=message):
            TOK.decode(bad)


def test_decode_split_character():
    zh = "中文".encode()
    assert TOK.decode(byte_ids(zh)) == "中文"
    assert TOK.decode(byte_ids(zh[:2])) == "\ufffd"  # a cut character: one U+FFFD, no error
    assert TOK.decode(byte_ids(zh[:4])) == "中\ufffd"
    assert TOK.decode(byte_ids(b"\xff") + TOK.encode("ok")) == "\ufffdok"
    assert TOK.decode_bytes(byte_ids(zh[:2])) == zh[:2]


def test_incremental_decoder_holds_back_split_characters():
    decoder = TOK.decoder()
    assert [decoder.feed(i) for i in byte_ids("中文".encode())] == ["", "", "中", "", "", "文"]
    assert decoder.flush() == ""
    assert decoder.feed(byte_ids(b"\xe4\xb8")) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(np.int64(byte_ids(b"a")[0])) == "a"  # reusable after flush
    assert decoder.feed(byte_ids(b"\xff\xe4")) == "\ufffd"  # never valid: out at once
    assert decoder.feed(TOK.encode("x")) == "\ufffdx"
    assert decoder.flush() == ""


_some_ids = st.one_of(
    st.integers(1, 256),  # single bytes: split characters
    st.sampled_from([0, *TOK.encode("中文 日本語 👨‍👩‍👧 naïve text")]),
    st.integers(257, 65529),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_some_ids, max_size=6), max_size=15), st.booleans())
def test_incremental_decoder_stream_equals_decode(chunks, one_at_a_time):
    decoder = TOK.decoder()
    fed: list[int] = []
    emitted = ""
    for chunk in chunks:
        outs = [decoder.feed(i) for i in chunk] if one_at_a_time else [decoder.feed(chunk)]
        fed += chunk
        for out in outs:
            emitted += out
        whole = TOK.decode(fed)
        assert whole.startswith(emitted)  # nothing emitted is ever taken back
        # At most the bytes of one incomplete sequence are held back (up to 3: Python's
        # decoder keeps b"\xed\xa0" until the next byte shows it is invalid).
        assert len(whole) - len(emitted) <= 3
    emitted += decoder.flush()
    assert emitted == TOK.decode(fed)


# -- vocabulary files ----------------------------------------------------------------------------
def write_vocab(path, extra_lines=(), bytes_upto=256):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(bytes_upto)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def test_custom_vocabulary(tmp_path):
    extra = ["257 'ab' 2", "258 'abc' 3", "300 '中' 3", '400 b"\\xe4\\xb8" 2']
    vocab = write_vocab(tmp_path / "v.txt", extra)
    tok = WorldTokenizer(vocab)
    assert tok.vocab_size == 448  # 400 + 1 rounded up to a multiple of 64
    text = "abcab中" * 100  # also long enough for the numpy path
    assert tok.encode("abcab中") == [258, 257, 300]
    assert tok.encode(text) == [258, 257, 300] * 100
    assert tok.encode("\u4e0a") == [400, 0x8A + 1]  # 上 = e4 b8 8a: the 2-byte token wins
    assert tok.decode(tok.encode(text)) == text
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(vocab.read_bytes().replace(b"\n", b"\r\n"))
    assert WorldTokenizer(crlf).encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    "line, message",
    [
        ("257 'ab'", "expected '<id> <literal> <byte length>'"),
        ("257 'ab' 3", "has 2 bytes, the line says 3"),
        ("257 ab 2", "not a Python str or bytes literal"),
        ("257 __import__('os').system('echo hacked') 2", "not a Python str or bytes literal"),
        ("x 'ab' 2", "token id must be a positive integer"),
        ("0 'ab' 2", "token id must be a positive integer"),
        ("257 'ab' two", "byte length must be an integer"),
        ("257 12 2", "must be a non-empty str or bytes literal"),
        ("257 '' 0", "must be a non-empty str or bytes literal"),
        ("257 '\\ud800' 3", "has no UTF-8 form"),
        ("1 'ab' 2", "duplicate token id 1"),
        ("257 'a' 1", "already defined on line 98"),
    ],
)
def test_malformed_vocabulary_line(tmp_path, line, message):
    vocab = write_vocab(tmp_path / "bad_vocab.txt", ["300 'xyz' 3", line])
    with pytest.raises(TokenizerError, match="bad_vocab.txt, line 258") as info:
        WorldTokenizer(vocab)
    assert message in str(info.value)


def test_vocabulary_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="missing_vocab.txt"):
        WorldTokenizer(tmp_path / "missing_vocab.txt")
    with pytest.raises(TokenizerError, match="6 single bytes have no token"):
        WorldTokenizer(write_vocab(tmp_path / "short.txt", bytes_upto=250))
    (tmp_path / "latin1.txt").write_bytes(b"1 '\xe9' 1\n")
    with pytest.raises(TokenizerError, match="latin1.txt, line 1: not valid UTF-8"):
        WorldTokenizer(tmp_path / "latin1.txt")


# -- save / load ---------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    spec = TOK.save(tmp_path / "model")
    assert spec == {"kind": "world", "file": "rwkv_vocab_v20230424.txt"}
    assert (tmp_path / "model" / spec["file"]).read_bytes() == DEFAULT_VOCAB_FILE.read_bytes()
    loaded = load_tokenizer(json.loads(json.dumps(spec)), tmp_path / "model")
    assert loaded.vocab_file == tmp_path / "model" / spec["file"]
    text = SAMPLES["mixed"] + SAMPLES["code"] * 5
    assert loaded.encode(text) == TOK.encode(text)
    assert loaded.save(tmp_path / "model") == spec  # saving onto its own file is fine


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "bpe", "file": "rwkv_vocab_v20230424.txt"}, "unknown tokenizer kind 'bpe'"),
        ({"file": "rwkv_vocab_v20230424.txt"}, "unknown tokenizer kind None"),
        ({"kind": "world"}, "'file' must be a file name"),
        ({"kind": "world", "file": "../rwkv_vocab_v20230424.txt"}, "'file' must be a file name"),
        ({"kind": "world", "file": "other_vocab.txt"}, "other_vocab.txt"),
        (["world"], "must be a dict"),
    ],
)
def test_load_tokenizer_errors(tmp_path, spec, message):
    TOK.save(tmp_path)
    with pytest.raises(TokenizerError, match=re.escape(message)):
        load_tokenizer(spec, tmp_path)
