"""The RWKV "World" tokenizer: greedy longest-match over a byte vocabulary.

Vocabulary file
    One token per line, ``<id> <python literal> <byte length>``; the literal is a ``str``
    (its UTF-8 bytes are the token) or a ``bytes`` literal. Ids 1..256 are the single bytes
    0x00..0xFF; id 0 is not in the file: it is end-of-text and decodes to nothing. The
    bundled file is ``assets/rwkv_vocab_v20230424.txt`` (65529 tokens, model vocabulary
    65536).

Encoding
    The text's UTF-8 bytes are cut, left to right, into the longest token that matches at
    the current position. The ids are identical to those of the reference
    ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``; this implementation is much faster on real text:

    1. Two adjacent bytes ``a, b`` that never occur next to each other inside any token
       form a *hard boundary*: no token can straddle it, so the greedy walk must end a token
       there, and the text splits into pieces that tokenize independently. These pieces
       are mostly words or single CJK characters.
    2. A piece that is itself a token is one token. This is checked for all pieces at
       once with numpy: pieces of at most 15 bytes are packed into two 64-bit words and
       looked up exactly (no hash collisions are possible: the full key is compared) in an
       open-addressing table of the vocabulary.
    3. The other pieces (several tokens, or longer than 15 bytes) go through a pure-Python
       greedy matcher, and the result is cached per piece, since such pieces repeat
       (``" Timmy"``, ``"\\n        return"``). The matcher tries, at each position, the
       lengths from the longest down in short pieces and walks the prefixes forward in
       longer ones (linear time; in very long pieces decisions are memoised by the bytes
       they depend on, so a megabyte of one repeated byte is fast too).

    Texts under 512 UTF-8 bytes skip the numpy machinery (its fixed cost is higher there)
    and go through the matcher directly. The piece cache is bounded (it is emptied when it
    holds 65536 pieces) and is the only state that changes: a tokenizer can be shared
    between threads.

Decoding
    Token bytes are concatenated and decoded as UTF-8 with ``errors="replace"``: bytes that
    are not valid UTF-8 (for instance a character split by the end of the sequence) become
    U+FFFD instead of raising (the reference returns a lone U+FFFD for the whole text then).
    :meth:`WorldTokenizer.decoder` gives a streaming decoder that holds back an incomplete
    trailing character until later tokens complete it.
"""

from __future__ import annotations

import ast
import codecs
import operator
import os
import shutil
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TokenizerError

__all__ = ["DEFAULT_VOCAB_FILE", "IncrementalDecoder", "WorldTokenizer", "load_tokenizer"]

DEFAULT_VOCAB_FILE = Path(__file__).parent / "assets" / "rwkv_vocab_v20230424.txt"
"""The bundled World vocabulary (from the `rwkv` package, Apache-2.0; see assets/)."""

_EOT_ID = 0

# Longest byte string that the two-word keys of _ShortTokenIndex hold.
_SHORT_MAX = 15
# Below this many UTF-8 bytes, encode() runs the pure-Python matcher on the whole text
# (about where the numpy path becomes faster).
_VECTOR_MIN_BYTES = 512
# The piece cache is emptied when it holds _PIECE_CACHE_LIMIT pieces; pieces longer than
# _PIECE_CACHE_MAX_BYTES are not kept.
_PIECE_CACHE_LIMIT = 1 << 16
_PIECE_CACHE_MAX_BYTES = 64
# _greedy_walk memoises its decisions in pieces longer than _MEMO_MIN_BYTES; the memo is
# emptied when it holds _MEMO_LIMIT decisions.
_MEMO_MIN_BYTES = 4096
_MEMO_LIMIT = 1 << 12

# A quoted vocabulary literal holding one of these needs the real parser (ast.literal_eval).
_NOT_PLAIN = ("\\", "\r", "\n", "\0")


class IncrementalDecoder:
    """Streaming detokenizer: turns token ids into text as they arrive, one or more at a time.

    :meth:`feed` returns only complete characters: the bytes of a character split across
    tokens (at most 3) are held back until the tokens that complete it arrive. Bytes that
    cannot become valid UTF-8 are emitted as U+FFFD as soon as that is known (at the latest
    with the next byte), so the decoder never stalls. Concatenating every :meth:`feed`
    output and the final :meth:`flush` gives exactly :meth:`WorldTokenizer.decode` of all
    the ids. Built on ``codecs.getincrementaldecoder("utf-8")(errors="replace")``.
    """

    def __init__(self, tokenizer: WorldTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one token id or several; return the text they complete (maybe "")."""
        try:
            batch = [operator.index(ids)]  # type: ignore[arg-type]
        except TypeError:  # not a single integer: a sequence, array or tensor of ids
            batch = ids  # type: ignore[assignment]
        return self._utf8.decode(self._tokenizer.decode_bytes(batch))

    def flush(self) -> str:
        """End the stream: return the held-back bytes (an incomplete character becomes
        U+FFFD) and reset, so the decoder can start a new stream."""
        return self._utf8.decode(b"", final=True)


class WorldTokenizer:
    """The RWKV World tokenizer (greedy longest match over a byte-level vocabulary).

    Args:
        vocab_file: a vocabulary in World format; None for the bundled
            ``rwkv_vocab_v20230424.txt``.

    Attributes:
        eot_id: the end-of-text id, 0 (decodes to nothing).
        vocab_size: the model vocabulary size: the largest id + 1, rounded up to a multiple
            of 64 (65536 for the bundled file).
        vocab_file: the file the vocabulary was read from.

    Raises:
        TokenizerError: the file is missing or malformed (the message names file and line).

    Instances can be shared between threads (the only state that changes is a cache).
    """

    kind = "world"

    def __init__(self, vocab_file: str | os.PathLike[str] | None = None) -> None:
        self.vocab_file = Path(DEFAULT_VOCAB_FILE if vocab_file is None else vocab_file)
        id_to_token = _read_vocab(self.vocab_file)
        self.eot_id = _EOT_ID
        self.vocab_size = (max(id_to_token) + 64) // 64 * 64
        token_to_id = {token: token_id for token_id, token in id_to_token.items()}
        self._id_to_bytes: dict[int, bytes] = {_EOT_ID: b"", **id_to_token}
        self._max_token_len = max(map(len, token_to_id))
        # Every token -> its id, and every proper prefix of a token that is not a token -> -1.
        self._prefix_ids: dict[bytes, int] = dict.fromkeys(
            (token[:k] for token in token_to_id for k in range(1, len(token))), -1
        )
        self._prefix_ids.update(token_to_id)
        self._token_ids = token_to_id
        self._byte_ids = [token_to_id[bytes([b])] for b in range(256)]
        self._cuts = _hard_boundaries(list(token_to_id))
        self._index = _ShortTokenIndex(token_to_id)
        self._pieces: dict[bytes, tuple[int, ...]] = {}  # piece -> ids, see _tokenize_pieces

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_file={str(self.vocab_file)!r})"

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (greedy longest match over its UTF-8 bytes).

        Raises:
            TokenizerError: ``text`` is not a str, or holds a lone surrogate (no UTF-8 form).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TokenizerError(
                f"cannot encode the text: the character at index {exc.start} is a lone "
                f"surrogate (U+{ord(text[exc.start]):04X}), which has no UTF-8 form"
            ) from None
        if len(data) < _VECTOR_MIN_BYTES:
            return self._greedy(data)
        return self._encode_pieces(data)

    def _encode_pieces(self, data: bytes) -> list[int]:
        """Encode by hard-boundary pieces (see the module docstring); ``data`` is not empty."""
        size = len(data)
        pairs = np.ndarray((size - 1,), ">u2", data, strides=(1,))  # data[i] << 8 | data[i + 1]
        cuts = np.flatnonzero(self._cuts.take(pairs)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [size]))
        ids = self._index.lookup(data, starts, ends - starts)
        missing = np.flatnonzero(ids == 0)
        if missing.size == 0:
            return ids.tolist()
        slices = map(slice, starts.take(missing).tolist(), ends.take(missing).tolist())
        groups = self._tokenize_pieces(list(map(data.__getitem__, slices)))
        # Splice: piece j contributes counts[j] ids, from offsets[j] on in the output.
        sizes = np.fromiter(map(len, groups), np.intp, len(groups))
        counts = np.ones(len(ids), np.intp)
        counts[missing] = sizes
        offsets = np.cumsum(counts) - counts
        out = np.empty(int(offsets[-1] + counts[-1]), np.int64)
        out[offsets] = ids
        owner, offset = _ragged(sizes)
        out[offsets.take(missing).take(owner) + offset] = np.fromiter(
            chain.from_iterable(groups), np.int64, len(owner)
        )
        return out.tolist()

    def _tokenize_pieces(self, pieces: list[bytes]) -> list[tuple[int, ...]]:
        """Token ids of each piece (a byte string with no hard boundary inside)."""
        cached = self._pieces.get
        groups = list(map(cached, pieces))
        if None in groups:  # (id tuples are never empty, so `or` skips only None)
            groups = [g or cached(p) or self._new_piece(p) for p, g in zip(pieces, groups)]
        return groups  # type: ignore[return-value]

    def _new_piece(self, piece: bytes) -> tuple[int, ...]:
        """Tokenize a piece that is not in the cache, and cache it unless it is long."""
        ids = tuple(self._greedy(piece))
        if len(piece) <= _PIECE_CACHE_MAX_BYTES:
            if len(self._pieces) >= _PIECE_CACHE_LIMIT:
                self._pieces.clear()
            self._pieces[piece] = ids
        return ids

    def _greedy(self, data: bytes) -> list[int]:
        """Greedy longest-match tokenization of ``data`` in pure Python."""
        if len(data) > _SHORT_MAX + 1:
            return self._greedy_walk(data)
        # Short input: at each position try the candidate lengths from the longest down.
        lookup = self._token_ids.get
        size = len(data)
        ids = []
        pos = 0
        while pos < size:
            end = size
            while (found := lookup(data[pos:end])) is None:
                end -= 1  # stops at end == pos + 1 at the latest: every byte is a token
            ids.append(found)
            pos = end
        return ids

    def _greedy_walk(self, data: bytes) -> list[int]:
        """Greedy longest match by walking prefixes forward (linear time for any input)."""
        lookup = self._prefix_ids.get
        byte_ids = self._byte_ids
        size = len(data)
        max_len = self._max_token_len
        # A decision depends only on the next max_len bytes: in long inputs (a megabyte of one
        # repeated byte, say) remember decisions by that window so repeats cost one lookup.
        memo: dict[bytes, tuple[int, int]] | None = {} if size > _MEMO_MIN_BYTES else None
        window = b""
        ids: list[int] = []
        pos = 0
        while pos < size:
            if memo is not None:
                window = data[pos : pos + max_len]
                known = memo.get(window)
                if known is not None:
                    ids.append(known[0])
                    pos += known[1]
                    continue
            best_id, best_end = byte_ids[data[pos]], pos + 1
            end = pos + 2
            while end <= size:
                found = lookup(data[pos:end])
                if found is None:
                    break
                if found > 0:
                    best_id, best_end = found, end
                end += 1
            if memo is not None:
                if len(memo) >= _MEMO_LIMIT:
                    memo.clear()
                memo[window] = (best_id, best_end - pos)
            ids.append(best_id)
            pos = best_end
        return ids

    # -- decoding ------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of the tokens (``ids`` may also be a numpy array or a
        tensor); the end-of-text id 0 contributes nothing.

        Raises:
            TokenizerError: an id that is not in the vocabulary (negative, unused, too large).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TokenizerError(f"decode: ids must be a sequence of token ids, got {type(ids).__name__}")
        ids = list(ids)
        bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool)), None)
        if bad is not None:
            raise TokenizerError(f"decode: ids must be one flat sequence of integer token ids, found {bad!r}")
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except KeyError as exc:
            raise TokenizerError(
                f"token id {exc.args[0]!r} is not in the vocabulary {self.vocab_file.name} "
                f"(vocab_size {self.vocab_size}; 0 is end-of-text)"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the tokens. Bytes that are not valid UTF-8 (e.g. a character cut by
        the end of ``ids``) become U+FFFD (``errors="replace"``) instead of raising.

        Raises:
            TokenizerError: an id that is not in the vocabulary.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decoder(self) -> IncrementalDecoder:
        """A new streaming decoder (see :class:`IncrementalDecoder`)."""
        return IncrementalDecoder(self)

    # -- files ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Copy the vocabulary file into ``directory`` (created if needed) and return the
        config entry that :func:`load_tokenizer` reads back, e.g.
        ``{"kind": "world", "file": "rwkv_vocab_v20230424.txt"}``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.vocab_file.name
        if not (target.exists() and target.samefile(self.vocab_file)):
            shutil.copyfile(self.vocab_file, target)
        return {"kind": self.kind, "file": self.vocab_file.name}


def load_tokenizer(spec: Mapping[str, Any], directory: str | os.PathLike[str]) -> WorldTokenizer:
    """Rebuild a tokenizer from the dict that :meth:`WorldTokenizer.save` returned and the
    folder holding its file.

    Raises:
        TokenizerError: an unknown kind, a missing or bad file name, or a bad vocabulary.
    """
    if not isinstance(spec, Mapping):
        raise TokenizerError(f"tokenizer config must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind != WorldTokenizer.kind:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r} (supported: {WorldTokenizer.kind!r})"
        )
    name = spec.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise TokenizerError(
            f"tokenizer config: 'file' must be a file name in the folder, got {name!r}"
        )
    path = Path(directory) / name
    if not path.is_file():
        raise TokenizerError(f"tokenizer vocabulary file not found: {path}")
    return WorldTokenizer(path)


# -- vocabulary loading --------------------------------------------------------------------------
def _read_vocab(path: Path) -> dict[int, bytes]:
    """Parse a World vocabulary file into {id: token bytes}, validating every line."""
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise TokenizerError(f"cannot read vocabulary file {path}: {exc.strerror or exc}") from None
    id_to_token: dict[int, bytes] = {}
    line_of_token: dict[bytes, int] = {}
    for lineno, raw in enumerate(raw_lines, 1):
        raw = raw.rstrip(b"\r")
        if not raw:
            continue
        try:
            token_id, token = _parse_line(raw)
        except ValueError as exc:
            raise TokenizerError(f"{path}, line {lineno}: {exc}") from None
        if token_id in id_to_token:
            raise TokenizerError(f"{path}, line {lineno}: duplicate token id {token_id}")
        if token in line_of_token:
            raise TokenizerError(
                f"{path}, line {lineno}: token {token!r} already defined on line "
                f"{line_of_token[token]}"
            )
        id_to_token[token_id] = token
        line_of_token[token] = lineno
    missing = [b for b in range(256) if bytes([b]) not in line_of_token]
    if missing:
        raise TokenizerError(
            f"{path}: not a World vocabulary: {len(missing)} single bytes have no token "
            f"(first: 0x{missing[0]:02X}); all 256 are needed to encode any text"
        )
    return id_to_token


def _parse_line(raw: bytes) -> tuple[int, bytes]:
    """``b"<id> <literal> <byte length>"`` -> (id, token bytes); ValueError says what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    first, last = line.find(" "), line.rfind(" ")
    if first <= 0 or last <= first + 1:
        raise ValueError(f"expected '<id> <literal> <byte length>', got {line[:80]!r}")
    id_text, literal, length_text = line[:first], line[first + 1 : last], line[last + 1 :]
    if not (id_text.isascii() and id_text.isdigit() and int(id_text) > 0):
        raise ValueError(f"token id must be a positive integer, got {id_text[:40]!r}")
    if not (length_text.isascii() and length_text.isdigit()):
        raise ValueError(f"byte length must be an integer, got {length_text[:40]!r}")
    quote = literal[0]
    if len(literal) >= 2 and quote in "'\"" and literal[-1] == quote and not any(
        c in literal[1:-1] for c in (quote, *_NOT_PLAIN)
    ):
        value: object = literal[1:-1]  # a plain quoted string: what ast.literal_eval would give
    else:
        try:
            value = ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"not a Python str or bytes literal: {literal[:80]!r}") from None
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"the string {literal[:80]!r} has no UTF-8 form") from None
    if not isinstance(value, bytes) or not value:
        raise ValueError(
            f"the token must be a non-empty str or bytes literal, got {literal[:80]!r}"
        )
    if len(value) != int(length_text):
        raise ValueError(f"token {value!r} has {len(value)} bytes, the line says {length_text}")
    return int(id_text), value


def _hard_boundaries(tokens: list[bytes]) -> np.ndarray:
    """Boolean table over byte pairs ``a << 8 | b``: True where ``a`` never directly precedes
    ``b`` inside a token, so no token can cross the gap between them."""
    joined = np.frombuffer(b"".join(tokens), np.uint8)
    pairs = joined[:-1].astype(np.intp) << 8 | joined[1:]
    last_bytes = np.cumsum([len(t) for t in tokens])[:-1] - 1  # pairs there span two tokens
    inside = np.ones(len(pairs), bool)
    inside[last_bytes] = False
    cuts = np.ones(1 << 16, bool)
    cuts[pairs[inside]] = False
    return cuts


def _ragged(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of the given sizes laid end to end: each element's group and its index
    within that group."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    return owner, np.arange(len(owner)) - (np.cumsum(sizes) - sizes).take(owner)


# -- exact vectorised lookup of short tokens ---------------------------------------------------
def _key_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per length 0..16 (16 = too long): mask of the low word, mask of the high word, and the
    length tag or-ed into the high word (16 gets a tag no token has, so it never matches)."""
    low = [(1 << (8 * min(n, 8))) - 1 for n in range(_SHORT_MAX + 2)]
    high = [(1 << (8 * min(max(n - 8, 0), 7))) - 1 for n in range(_SHORT_MAX + 2)]
    tag = [n << 56 for n in range(_SHORT_MAX + 2)]
    return np.array(low, np.uint64), np.array(high, np.uint64), np.array(tag, np.uint64)


_LOW_MASK, _HIGH_MASK, _LENGTH_TAG = _key_tables()
_MUL_LOW = np.uint64(0x9E3779B97F4A7C15)
_MUL_HIGH = np.uint64(0xC2B2AE3D27D4EB4F)


def _pack_keys(
    data: bytes, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-word keys of the byte strings ``data[s : s + n]``: bytes 0-7 little-endian in
    the low word, bytes 8-14 and the length (16 for anything longer than 15) in the high."""
    padded = data + bytes(16)
    # Overlapping 8-byte windows: low_words[i] = padded[i : i + 8] and
    # high_words[i] = padded[i + 8 : i + 16].
    low_words = np.ndarray((len(data),), "<u8", padded, strides=(1,))
    high_words = np.ndarray((len(data),), "<u8", padded, offset=8, strides=(1,))
    lengths = np.minimum(lengths, _SHORT_MAX + 1)
    low = low_words.take(starts) & _LOW_MASK.take(lengths)
    high = (high_words.take(starts) & _HIGH_MASK.take(lengths)) | _LENGTH_TAG.take(lengths)
    return low, high


class _ShortTokenIndex:
    """Open-addressing (linear probing) table of the tokens of at most 15 bytes, queried for
    many byte strings at once; the full key is compared, so a hit is always exact."""

    def __init__(self, token_to_id: dict[bytes, int]) -> None:
        tokens = [t for t in token_to_id if len(t) <= _SHORT_MAX]
        lengths = np.array([len(t) for t in tokens], np.intp)
        low, high = _pack_keys(b"".join(tokens), np.cumsum(lengths) - lengths, lengths)
        ids = np.array([token_to_id[t] for t in tokens], np.int32)
        self._bits = max(int(len(tokens) * 4 - 1).bit_length(), 8)  # load factor <= 1/4
        self._mask = (1 << self._bits) - 1
        size = self._mask + 1
        self._low = np.zeros(size, np.uint64)
        self._high = np.zeros(size, np.uint64)  # 0 marks an empty slot (keys have a length tag)
        self._ids = np.zeros(size, np.int32)
        # Insert all keys at once, one probe step per round: in each round every pending key
        # tries its slot, one key per free slot wins, the others move on to the next slot.
        pending = np.arange(len(tokens))
        slots = self._home(low, high)
        self._window = 0  # every key ends up less than this many slots after its home
        while pending.size:
            self._window += 1
            free = np.flatnonzero(self._high[slots] == 0)
            won_slots, first = np.unique(slots[free], return_index=True)
            winners = pending[free[first]]
            self._low[won_slots], self._high[won_slots] = low[winners], high[winners]
            self._ids[won_slots] = ids[winners]
            placed = np.zeros(pending.size, bool)
            placed[free[first]] = True
            pending, slots = pending[~placed], (slots[~placed] + 1) & self._mask

    def _home(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Home slots of keys: multiplicative hashing of both words, top bits."""
        mixed = (low * _MUL_LOW) ^ (high * _MUL_HIGH)
        return (mixed >> np.uint64(64 - self._bits)).astype(np.intp)

    def lookup(self, data: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Id of each ``data[s : s + n]`` if that is a token of at most 15 bytes, else 0."""
        low, high = _pack_keys(data, starts, lengths)
        slots = self._home(low, high)
        slot_high = self._high.take(slots)
        hit = (slot_high == high) & (self._low.take(slots) == low)
        out = np.where(hit, self._ids.take(slots), 0)
        # Keys whose home slot holds another key: look at the next slots, as far as any key
        # was displaced (an empty home slot already means "not a token").
        pending = np.flatnonzero(~hit & (slot_high != 0))
        if pending.size and self._window > 1:
            window = (slots.take(pending)[:, None] + np.arange(1, self._window)) & self._mask
            hits = (self._high.take(window) == high.take(pending)[:, None]) & (
                self._low.take(window) == low.take(pending)[:, None]
            )
            found = hits.any(axis=1)
            out[pending[found]] = self._ids.take(window[found, hits[found].argmax(axis=1)])
        return out
