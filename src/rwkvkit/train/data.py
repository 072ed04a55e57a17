"""Training data: token files, corpus preparation and the training sampler.

Token stream convention (as the official RWKV data): every document's tokens are followed by
token 0 (end of text), and documents are laid end to end, so the files hold one flat stream
``doc0 0 doc1 0 doc2 0 ...`` that the sampler cuts windows from regardless of documents.

Our token file (``format="tokens"``)
    ``NAME.tokens``: the raw token ids, a little-endian ``uint16`` array (``uint32`` when the
    vocabulary has more than 65536 ids), nothing else. ``NAME.json`` beside it, the header::

        {"format": "rwkvkit-tokens", "version": 1, "dtype": "uint16", "vocab_size": 65536,
         "eot_id": 0, "tokenizer": {"kind": "world", "file": "rwkv_vocab_v20230424.txt",
         "sha256": "..."}, "n_tokens": 1234567, "n_documents": 890,
         "doc_offsets": [0, 811, ...]}

    ``doc_offsets`` are the start offsets (in tokens) of the documents; document ``i`` spans
    ``[doc_offsets[i], doc_offsets[i+1])`` (the last one ends at ``n_tokens``) and ends with
    its token 0. Above ``OFFSETS_INLINE_MAX`` documents the offsets go to
    ``NAME.offsets.npy`` (int64) instead, and the header names it in ``"doc_offsets_file"``.
    Files are written atomically (a temporary file renamed into place: data, then offsets,
    header last) and read back with a read-only ``numpy.memmap``.

Megatron / RWKV-LM binidx (``format="binidx"``)
    ``NAME.bin``: the raw token ids (``uint16``, dtype code 8; ``int32``, code 4, for
    vocabularies above 65536 ids, as Megatron does). ``NAME.idx``, all little-endian::

        b"MMIDIDX\\x00\\x00"  u64 version = 1   u8 dtype code
        u64 n_sequences      u64 n_doc_idx
        int32 sizes[n_sequences]  int64 pointers[n_sequences] (byte offsets in .bin)
        int64 doc_idx[n_doc_idx]  (first sequence of each document, then n_sequences)

    As RWKV-LM's ``make_data.py`` writes it, each document is one sequence that includes its
    trailing token 0, and ``doc_idx = [0, 1, ..., n_documents]``. The reader accepts any
    contiguous index (several sequences per document too).

Inputs of :func:`prepare`
    ``.txt`` / ``.md`` / ``.text`` files (by default one document per file, the file's exact
    text; ``text_split="blank-lines"`` makes every run of lines between blank lines a
    document, ``"lines"`` every non-blank line), JSON Lines files (``.jsonl``, ``.json``,
    ``.ndjson``: one JSON object per line with a string ``"text"``), any of them gzipped
    (``.gz``), or folders of them (searched recursively, in sorted path order; other files and
    hidden ones are ignored). Bad records (invalid UTF-8 or JSON, no string ``"text"``) raise
    :class:`DataError` naming ``file:line``, or with ``skip_bad`` are skipped and listed in the
    result. Empty documents are skipped and counted. A UTF-8 byte order mark at the start of
    a file is dropped.

Sampler
    :class:`TokenSampler`, see its docstring: the official order (sample ``g`` starts at
    ``((floor(p*phi) * (g+1)**3) mod p) * ctx_len``) or sequential / shuffled windows; a
    batch is a pure function of the step, so resuming is restoring one integer.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import struct
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import RwkvkitError
from ..files import atomic_path, atomic_write_text

__all__ = [
    "BadRecord",
    "BinIdxFile",
    "DataError",
    "Document",
    "PrepareResult",
    "TokenData",
    "TokenFile",
    "TokenSampler",
    "TokenWriter",
    "find_input_files",
    "is_prime",
    "is_token_data",
    "iter_documents",
    "magic_prime",
    "open_tokens",
    "prepare",
    "output_paths",
    "sample_start",
    "storage_dtype",
    "tokenize_documents",
    "tokenizer_spec",
    "write_tokens",
]

FORMAT_NAME = "rwkvkit-tokens"
FORMAT_VERSION = 1
EOT_ID = 0
OFFSETS_INLINE_MAX = 1 << 16
"""Above this many documents, ``doc_offsets`` go to ``NAME.offsets.npy``."""

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
BINIDX_VERSION = 1
# Megatron's (and RWKV-LM's binidx.py) dtype codes. 6 and 7 are floating point (6 is float64
# in both; 7 is float64 in RWKV-LM's copy and float32 in newer Megatron): never token ids.
BINIDX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}
_BINIDX_FLOAT_CODES = (6, 7)
_BINIDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_sequences, n_doc_idx

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
TEXT_SPLITS = ("file", "blank-lines", "lines")
FORMATS = ("tokens", "binidx")
_WRITE_BUFFER = 1 << 20  # tokens buffered by TokenWriter before a write


class DataError(RwkvkitError):
    """Bad training data: a malformed or inconsistent token file, an unreadable corpus file or
    record (the message names the file, and the line or header field at fault)."""


# ================================================================================================
# Token files: reading
# ================================================================================================
class TokenData:
    """A flat stream of token ids on disk, cut into documents (base of the two file kinds).

    Attributes:
        path: the data file (``NAME.tokens`` or ``NAME.bin``).
        tokens: the ids, a read-only 1-D ``numpy.memmap`` (an empty array for no tokens).
        doc_offsets: int64 start offset of each document; document ``i`` ends where ``i+1``
            starts (the last at ``n_tokens``). As written by rwkvkit, it includes its token 0.
        vocab_size: the vocabulary size from the header, or None where the file has none
            (binidx).

    ``len(data)`` is the number of tokens; ``data[i]`` is an int and ``data[a:b]`` a numpy
    view. The object pickles as its path (DataLoader workers reopen the file).
    """

    path: Path
    tokens: np.ndarray
    doc_offsets: np.ndarray
    vocab_size: int | None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_documents(self) -> int:
        return int(self.doc_offsets.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, key: Any) -> Any:
        out = self.tokens[key]
        return int(out) if np.ndim(out) == 0 else out

    def document_bounds(self, i: int) -> tuple[int, int]:
        """``(start, end)`` token offsets of document ``i``."""
        n = self.n_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        i %= n
        end = int(self.doc_offsets[i + 1]) if i + 1 < n else self.n_tokens
        return int(self.doc_offsets[i]), end

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (a view, with its trailing token 0 if it has one)."""
        start, end = self.document_bounds(i)
        return self.tokens[start:end]

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens in order (views, each ending with its token 0)."""
        ends = np.append(self.doc_offsets[1:], self.n_tokens).tolist()
        for start, end in zip(self.doc_offsets.tolist(), ends):
            yield self.tokens[start:end]

    def close(self) -> None:
        """Drop the memory maps (the object is unusable afterwards)."""
        self.tokens = np.empty(0, self.tokens.dtype)

    def __enter__(self) -> "TokenData":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, n_tokens={self.n_tokens}, "
                f"n_documents={self.n_documents})")


def _memmap(path: Path, dtype: np.dtype, count: int, offset: int = 0) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _strip_suffix(path: str | os.PathLike, suffixes: Sequence[str]) -> Path:
    p = Path(path)
    for s in suffixes:
        if p.name.endswith(s) and len(p.name) > len(s):
            return p.with_name(p.name[: -len(s)])
    return p


def _with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


class TokenFile(TokenData):
    """Our token file: ``NAME.tokens`` (raw ids) + ``NAME.json`` (header), see the module doc.

    ``TokenFile(path)`` / ``TokenFile.open(path)`` take ``NAME.tokens``, ``NAME.json`` or
    ``NAME``; the header is validated and the file size checked against it.

    Attributes (besides :class:`TokenData`'s): ``header`` (the parsed JSON), ``header_path``,
    ``tokenizer_spec`` (the header's ``"tokenizer"`` dict, maybe empty).

    Raises:
        DataError: a missing or malformed header (naming the file and field), a data file whose
            size does not match ``n_tokens``, or documents that do not end with token 0.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        prefix = _strip_suffix(path, (".tokens", ".json"))
        self.path = _with_suffix(prefix, ".tokens")
        self.header_path = _with_suffix(prefix, ".json")
        if not self.header_path.is_file():
            if not self.path.is_file():
                raise DataError(f"{path}: no such token file ({self.path.name} and {self.header_path.name})")
            raise DataError(f"{self.header_path}: missing header (every .tokens file needs its .json beside it)")
        try:
            header = json.loads(self.header_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.header_path}: not a valid JSON header ({exc})") from None
        self.header = header
        where = str(self.header_path)
        if not isinstance(header, dict):
            raise DataError(f"{where}: the header must be a JSON object, got {type(header).__name__}")
        if header.get("format") != FORMAT_NAME:
            raise DataError(f"{where}: field 'format' is {header.get('format')!r}, expected {FORMAT_NAME!r}")
        if header.get("version") != FORMAT_VERSION:
            raise DataError(f"{where}: field 'version' is {header.get('version')!r}; this rwkvkit reads version {FORMAT_VERSION}")
        dtype_name = header.get("dtype")
        if dtype_name not in ("uint16", "uint32"):
            raise DataError(f"{where}: field 'dtype' is {dtype_name!r}, expected 'uint16' or 'uint32'")
        dtype = np.dtype("<u2" if dtype_name == "uint16" else "<u4")
        vocab_size = _header_int(header, "vocab_size", where, minimum=1)
        if dtype_name == "uint16" and vocab_size > 1 << 16:
            raise DataError(f"{where}: field 'vocab_size' {vocab_size} does not fit dtype uint16")
        n_tokens = _header_int(header, "n_tokens", where)
        n_documents = _header_int(header, "n_documents", where)
        tokenizer = header.get("tokenizer", {})
        if not isinstance(tokenizer, dict):
            raise DataError(f"{where}: field 'tokenizer' must be an object, got {type(tokenizer).__name__}")
        self.tokenizer_spec = tokenizer
        self.vocab_size = vocab_size

        offsets = self._read_offsets(header, prefix, where)
        if offsets.shape[0] != n_documents:
            raise DataError(f"{where}: field 'doc_offsets' has {offsets.shape[0]} entries, 'n_documents' says {n_documents}")
        if n_documents:
            if offsets[0] != 0 or (n_documents > 1 and np.any(np.diff(offsets) <= 0)) or offsets[-1] >= n_tokens:
                raise DataError(f"{where}: field 'doc_offsets' must start at 0 and increase strictly, "
                                f"every offset below n_tokens {n_tokens}")
        elif n_tokens:
            raise DataError(f"{where}: {n_tokens} tokens but no documents")
        self.doc_offsets = offsets

        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file (the header {self.header_path.name} is there)")
        size = self.path.stat().st_size
        if size != n_tokens * dtype.itemsize:
            raise DataError(f"{self.path}: {size} bytes, but the header's 'n_tokens' {n_tokens} needs "
                            f"{n_tokens * dtype.itemsize} ({dtype_name}); the file is truncated or "
                            "does not belong to this header")
        self.tokens = _memmap(self.path, dtype, n_tokens)
        if n_documents:
            last = np.append(offsets[1:], n_tokens) - 1
            not_eot = np.flatnonzero(self.tokens[last] != EOT_ID)
            if not_eot.size:
                raise DataError(f"{self.path}: document {int(not_eot[0])} does not end with token {EOT_ID} "
                                "(the offsets do not match the data)")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenFile":
        """Open and validate ``NAME.tokens`` / ``NAME.json`` / ``NAME``."""
        return cls(path)

    def _read_offsets(self, header: dict[str, Any], prefix: Path, where: str) -> np.ndarray:
        if "doc_offsets_file" in header:
            name = header["doc_offsets_file"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise DataError(f"{where}: field 'doc_offsets_file' must be a file name beside the header, got {name!r}")
            opath = prefix.parent / name
            try:
                offsets = np.load(opath, allow_pickle=False)
            except FileNotFoundError:
                raise DataError(f"{opath}: no such file (named by 'doc_offsets_file' in {where})") from None
            except (ValueError, OSError) as exc:
                raise DataError(f"{opath}: not a .npy array ({exc})") from None
            if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
                raise DataError(f"{opath}: expected a 1-D integer array, got {offsets.dtype} {offsets.shape}")
            return offsets.astype(np.int64, copy=False)
        if "doc_offsets" not in header:
            raise DataError(f"{where}: missing field 'doc_offsets' (or 'doc_offsets_file')")
        raw = header["doc_offsets"]
        if not isinstance(raw, list) or not all(type(v) is int for v in raw):
            raise DataError(f"{where}: field 'doc_offsets' must be a list of integers")
        return np.asarray(raw, dtype=np.int64).reshape(-1)

    def tokenizer(self) -> Any:
        """The tokenizer named in the header: its vocabulary file beside the token file, or the
        bundled one when the name and sha256 match it.

        Raises:
            DataError: no tokenizer recorded, or its file cannot be found / does not match.
        """
        from ..tokenizer import DEFAULT_VOCAB_FILE, WorldTokenizer

        spec = self.tokenizer_spec
        where = str(self.header_path)
        if spec.get("kind") != "world" or not isinstance(spec.get("file"), str):
            raise DataError(f"{where}: field 'tokenizer' names no World vocabulary ({spec!r})")
        name = Path(spec["file"]).name
        digest = spec.get("sha256")
        for candidate in (self.path.parent / name, DEFAULT_VOCAB_FILE):
            if candidate.name == name and candidate.is_file():
                if digest is None or _sha256(candidate) == digest:
                    return WorldTokenizer(candidate)
        raise DataError(f"{where}: the tokenizer vocabulary {name!r} (sha256 {digest}) is neither beside "
                        "the token file nor the bundled one")


def _header_int(header: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    if key not in header:
        raise DataError(f"{where}: missing field {key!r}")
    value = header[key]
    if type(value) is not int or value < minimum:
        raise DataError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


class BinIdxFile(TokenData):
    """A Megatron / RWKV-LM ``NAME.bin`` + ``NAME.idx`` pair (``MMIDIDX`` version 1).

    ``BinIdxFile(path)`` takes ``NAME.bin``, ``NAME.idx`` or ``NAME``. ``tokens`` is the whole
    ``.bin`` as one stream (as RWKV-LM's trainer reads it); ``sizes``, ``pointers`` and
    ``doc_idx`` are the index arrays; documents follow ``doc_idx``. ``vocab_size`` is None.

    Raises:
        DataError: a bad magic, version or dtype code, a truncated index, an index that does
            not describe the ``.bin`` exactly (naming the file and what is wrong).
    """

    vocab_size = None

    def __init__(self, path: str | os.PathLike) -> None:
        prefix = _strip_suffix(path, (".bin", ".idx"))
        self.path = _with_suffix(prefix, ".bin")
        self.index_path = idx = _with_suffix(prefix, ".idx")
        for p in (idx, self.path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (a binidx dataset is NAME.bin + NAME.idx)")
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(_BINIDX_HEADER.size)
        if len(head) < _BINIDX_HEADER.size:
            if not BINIDX_MAGIC.startswith(head[:9]) or len(head) < 9:
                raise DataError(f"{idx}: not a binidx index (no MMIDIDX magic)")
            raise DataError(f"{idx}: truncated header ({idx_size} bytes)")
        magic, version, code, n_seq, n_doc_idx = _BINIDX_HEADER.unpack(head)
        if magic != BINIDX_MAGIC:
            raise DataError(f"{idx}: not a binidx index (magic {magic!r}, expected {BINIDX_MAGIC!r})")
        if version != BINIDX_VERSION:
            raise DataError(f"{idx}: index version {version}, only version {BINIDX_VERSION} is supported")
        if code in _BINIDX_FLOAT_CODES:
            raise DataError(f"{idx}: dtype code {code} is floating point, not token ids")
        if code not in BINIDX_DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code} (known: {sorted(BINIDX_DTYPES)})")
        dtype = BINIDX_DTYPES[code]
        off = _BINIDX_HEADER.size
        need = off + n_seq * (4 + 8) + n_doc_idx * 8
        if idx_size < need:
            raise DataError(f"{idx}: truncated: {idx_size} bytes, the header's counts "
                            f"({n_seq} sequences, {n_doc_idx} doc_idx entries) need {need}")
        self.sizes = _memmap(idx, np.dtype("<i4"), n_seq, off)
        self.pointers = _memmap(idx, np.dtype("<i8"), n_seq, off + 4 * n_seq)
        self.doc_idx = _memmap(idx, np.dtype("<i8"), n_doc_idx, off + 12 * n_seq)

        sizes = np.asarray(self.sizes, dtype=np.int64)
        if n_seq and sizes.min() < 0:
            raise DataError(f"{idx}: negative sequence size")
        starts = np.concatenate(([0], np.cumsum(sizes)))  # in tokens
        n_tokens = int(starts[-1])
        if not np.array_equal(np.asarray(self.pointers), starts[:-1] * dtype.itemsize):
            raise DataError(f"{idx}: sequence pointers are not contiguous byte offsets of the sizes "
                            "(only contiguous indexes are supported)")
        doc_idx = np.asarray(self.doc_idx)
        if n_doc_idx == 0 or doc_idx[0] != 0 or np.any(np.diff(doc_idx) < 0) or doc_idx[-1] != n_seq:
            raise DataError(f"{idx}: doc_idx must rise from 0 to the sequence count {n_seq}")
        bin_size = self.path.stat().st_size
        if bin_size != n_tokens * dtype.itemsize:
            raise DataError(f"{self.path}: {bin_size} bytes, but {idx.name} describes {n_tokens} tokens "
                            f"of {dtype} ({n_tokens * dtype.itemsize} bytes)")
        self.dtype_code = code
        self.tokens = _memmap(self.path, dtype, n_tokens)
        self.doc_offsets = starts[doc_idx[:-1]].astype(np.int64)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BinIdxFile":
        return cls(path)


def is_token_data(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a token file (ours or binidx) rather than a text input."""
    p = Path(path)
    name = p.name
    if name.endswith((".bin", ".idx")):
        prefix = _strip_suffix(p, (".bin", ".idx"))
        return _with_suffix(prefix, ".idx").is_file()
    if name.endswith(".tokens"):
        return True
    if name.endswith(".json"):
        return _with_suffix(_strip_suffix(p, (".json",)), ".tokens").is_file()
    if p.is_dir() or p.is_file():
        return False
    return any(_with_suffix(p, s).is_file() for s in (".tokens", ".idx"))


def open_tokens(path: str | os.PathLike) -> TokenData:
    """Open a token file of either kind: ``NAME.tokens`` / ``NAME.json`` (ours), ``NAME.bin`` /
    ``NAME.idx`` (binidx), or ``NAME`` when one of them exists."""
    p = Path(path)
    if p.name.endswith((".bin", ".idx")):
        return BinIdxFile(p)
    if p.name.endswith((".tokens", ".json")):
        return TokenFile(p)
    if _with_suffix(p, ".json").is_file() or _with_suffix(p, ".tokens").is_file():
        return TokenFile(p)
    if _with_suffix(p, ".idx").is_file() or _with_suffix(p, ".bin").is_file():
        return BinIdxFile(p)
    raise DataError(f"{p}: not a token file (expected NAME.tokens with NAME.json, or NAME.bin with NAME.idx)")


# ================================================================================================
# Token files: writing
# ================================================================================================
def storage_dtype(vocab_size: int, format: str = "tokens") -> np.dtype:
    """The on-disk dtype for ``vocab_size``: uint16 up to 65536 ids, else uint32 (ours) or
    int32 (binidx, which has no unsigned 32-bit code)."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size > 1 << 31:
        raise DataError(f"vocab_size {vocab_size} is too large for a token file")
    return np.dtype("<u4" if format == "tokens" else "<i4")


def output_paths(output: str | os.PathLike, format: str = "tokens") -> tuple[Path, Path]:
    """``(data file, header/index file)`` for an output name, e.g. ``corpus`` ->
    ``corpus.tokens`` + ``corpus.json`` (or ``corpus.bin`` + ``corpus.idx``); a given suffix
    of either kind is dropped first."""
    if format not in FORMATS:
        raise DataError(f"unknown token file format {format!r} (choose from {', '.join(FORMATS)})")
    prefix = _strip_suffix(output, (".tokens", ".json", ".bin", ".idx"))
    if format == "tokens":
        return _with_suffix(prefix, ".tokens"), _with_suffix(prefix, ".json")
    return _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".idx")


class TokenWriter:
    """Write a token file document by document; the files appear atomically on :meth:`close`.

    Args:
        path: output name (``NAME``, or with a suffix of the chosen format).
        vocab_size: every id must be below it; it also picks the dtype (see
            :func:`storage_dtype`).
        format: ``"tokens"`` (ours) or ``"binidx"``.
        tokenizer: the header's ``"tokenizer"`` entry (ours only), e.g. from
            :func:`tokenizer_spec`.
        offsets_inline_max: above this many documents, our format writes the offsets to
            ``NAME.offsets.npy``.

    Use as a context manager: on an exception nothing is left behind (and an existing file of
    that name is untouched).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        format: str = "tokens",
        tokenizer: dict[str, Any] | None = None,
        offsets_inline_max: int = OFFSETS_INLINE_MAX,
    ) -> None:
        if type(vocab_size) is not int or vocab_size < 1:
            raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.data_path, self.index_path = output_paths(path, format)
        self.format = format
        self.vocab_size = vocab_size
        self.dtype = storage_dtype(vocab_size, format)
        self.tokenizer = dict(tokenizer or {})
        self.offsets_inline_max = offsets_inline_max
        self.n_tokens = 0
        self._lengths = array("q")
        self._buf = np.empty(_WRITE_BUFFER, self.dtype)
        self._fill = 0
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.data_path))
        try:
            self._file = open(tmp, "wb")
        except BaseException:
            self._stack.__exit__(_Abort, _Abort(), None)
            raise
        self._closed = False

    @property
    def n_documents(self) -> int:
        return len(self._lengths)

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append one document: its ids, then token 0."""
        if hasattr(ids, "detach"):  # a torch tensor
            ids = ids.detach().cpu().numpy()  # type: ignore[union-attr]
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DataError(f"a document must be a 1-D sequence of integer ids, got {arr.dtype} {arr.shape}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise DataError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        n = arr.size + 1
        if self._fill + n > self._buf.size:
            self._flush()
        if n > self._buf.size:
            self._file.write(arr.astype(self.dtype).tobytes())
            self._file.write(np.array([EOT_ID], self.dtype).tobytes())
        else:
            self._buf[self._fill : self._fill + n - 1] = arr
            self._buf[self._fill + n - 1] = EOT_ID
            self._fill += n
        self._add_length(n)

    def add_documents_raw(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append complete documents as stored: ``tokens`` (each document already ending with
        token 0, ids already checked) cut by ``lengths``. Used to copy runs of documents."""
        if int(np.sum(lengths)) != tokens.shape[0]:
            raise DataError("add_documents_raw: lengths do not add up to the tokens")
        self._flush()
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        for n in np.asarray(lengths).tolist():
            self._add_length(int(n))

    def _add_length(self, n: int) -> None:
        if self.format == "binidx" and n >= 1 << 31:
            raise DataError(f"a document of {n} tokens does not fit binidx's int32 sizes")
        self._lengths.append(n)
        self.n_tokens += n

    def _flush(self) -> None:
        if self._fill:
            self._file.write(self._buf[: self._fill].data)
            self._fill = 0

    def close(self) -> None:
        """Finish: move the data into place, then write the header / index (atomically)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush()
            self._file.close()
            self._buf = np.empty(0, self.dtype)
        except BaseException:
            self.abort()
            raise
        self._stack.close()  # fsync + rename the data file
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if lengths.size else lengths
        if self.format == "binidx":
            self._write_index(lengths)
        else:
            self._write_header(offsets)

    def abort(self) -> None:
        """Discard everything written (no file is created or replaced)."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._file.close()
        self._stack.__exit__(_Abort, _Abort(), None)  # atomic_path removes its temporary file

    def _write_header(self, offsets: np.ndarray) -> None:
        prefix = _strip_suffix(self.data_path, (".tokens",))
        header: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
            "vocab_size": self.vocab_size,
            "eot_id": EOT_ID,
            "tokenizer": self.tokenizer,
            "n_tokens": self.n_tokens,
            "n_documents": int(offsets.shape[0]),
        }
        offsets_path = _with_suffix(prefix, ".offsets.npy")
        if offsets.shape[0] > self.offsets_inline_max:
            with atomic_path(offsets_path) as tmp, open(tmp, "wb") as f:
                np.save(f, offsets, allow_pickle=False)
            header["doc_offsets_file"] = offsets_path.name
        else:
            header["doc_offsets"] = offsets.tolist()
            with contextlib.suppress(FileNotFoundError):
                offsets_path.unlink()  # a stale one from an earlier, larger file of this name
        atomic_write_text(self.index_path, json.dumps(header, separators=(",", ":")) + "\n")

    def _write_index(self, lengths: np.ndarray) -> None:
        code = {v: k for k, v in BINIDX_DTYPES.items()}[self.dtype]
        n = int(lengths.shape[0])
        pointers = np.concatenate(([0], np.cumsum(lengths)[:-1])) * self.dtype.itemsize if n else lengths
        with atomic_path(self.index_path) as tmp, open(tmp, "wb") as f:
            f.write(_BINIDX_HEADER.pack(BINIDX_MAGIC, BINIDX_VERSION, code, n, n + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(np.asarray(pointers, dtype="<i8").tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Abort(Exception):
    pass


def write_tokens(
    path: str | os.PathLike,
    documents: Iterable[Iterable[int]],
    *,
    vocab_size: int,
    format: str = "tokens",
    tokenizer: dict[str, Any] | None = None,
) -> TokenData:
    """Write ``documents`` (each a sequence of ids; token 0 is appended to each) and open the
    result."""
    with TokenWriter(path, vocab_size=vocab_size, format=format, tokenizer=tokenizer) as w:
        for doc in documents:
            w.add_document(doc)
    return open_tokens(w.data_path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The header's ``"tokenizer"`` entry: kind, vocabulary file name and its sha256."""
    spec: dict[str, Any] = {"kind": getattr(tokenizer, "kind", type(tokenizer).__name__)}
    vocab = getattr(tokenizer, "vocab_file", None)
    if vocab is not None and Path(vocab).is_file():
        spec["file"] = Path(vocab).name
        spec["sha256"] = _sha256(Path(vocab))
    return spec


# ================================================================================================
# Reading corpora
# ================================================================================================
@dataclass(frozen=True)
class Document:
    """One document of a corpus: its text and where it starts (file, 1-based line)."""

    text: str
    source: str
    line: int


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read: where it is (file, 1-based line) and why."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def _input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def find_input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The corpus files of ``inputs`` in reading order: files as given, folders searched
    recursively for ``.txt``/``.md``/``.text``/``.jsonl``/``.json``/``.ndjson`` (optionally
    ``.gz``) in sorted path order, hidden files and folders skipped.

    Raises:
        DataError: a missing input, a file of an unknown type, or nothing to read.
    """
    files: list[Path] = []
    inputs = list(inputs)
    if not inputs:
        raise DataError("no input files given")
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [
                f for f in p.rglob("*")
                if f.is_file() and _input_kind(f) and not any(
                    part.startswith(".") for part in f.relative_to(p).parts)
            ]
            if not found:
                raise DataError(f"{p}: no .txt, .md, .jsonl or .json files in this folder")
            files.extend(sorted(found, key=lambda f: f.relative_to(p).as_posix()))
        elif p.is_file():
            if _input_kind(p) is None:
                raise DataError(f"{p}: unknown input type (expected .txt, .md, .text, .jsonl, .json, "
                                ".ndjson, optionally .gz)")
            files.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file or folder")
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


class _Progress:
    """Counts the raw (compressed) bytes read from a file into a tqdm bar."""

    def __init__(self, raw: Any, update: Callable[[int], None] | None) -> None:
        self.raw, self.update_fn, self.last = raw, update, 0

    def __call__(self) -> None:
        if self.update_fn is not None:
            pos = self.raw.tell()
            if pos > self.last:
                self.update_fn(pos - self.last)
                self.last = pos


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark at the start of a file is dropped


def _is_dot_json(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".json", ".json.gz"))


def _strip_eol(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _read_jsonl(path: Path, stream: Any, tick: _Progress) -> Iterator[Document | BadRecord]:
    src = str(path)
    hint = " (.json inputs are read as JSON Lines: one object per line)" if _is_dot_json(path) else ""
    for lineno, raw in enumerate(stream, 1):
        if lineno % 256 == 0:
            tick()
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield BadRecord(src, lineno, f"invalid UTF-8 (byte {exc.start} of the line)")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadRecord(src, lineno, f"invalid JSON: {exc.msg} (column {exc.colno}){hint}")
            continue
        except RecursionError:
            yield BadRecord(src, lineno, "invalid JSON: nested too deeply")
            continue
        if not isinstance(obj, dict):
            yield BadRecord(src, lineno, f'expected a JSON object with a "text" field, got {_json_type(obj)}')
        elif "text" not in obj:
            yield BadRecord(src, lineno, 'no "text" field')
        elif not isinstance(obj["text"], str):
            yield BadRecord(src, lineno, f'"text" is {_json_type(obj["text"])}, not a string')
        else:
            yield Document(obj["text"], src, lineno)


def _read_text(path: Path, stream: Any, tick: _Progress, split: str) -> Iterator[Document | BadRecord]:
    src = str(path)
    if split == "file":
        data = stream.read()
        if data.startswith(_BOM):
            data = data[len(_BOM):]
        try:
            yield Document(data.decode("utf-8"), src, 1)
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            yield BadRecord(src, line, "invalid UTF-8 (the whole file is one document: skipped)")
        return
    para: list[str] = []
    start = bad = 0
    for lineno, raw in enumerate(stream, 1):
        if lineno % 256 == 0:
            tick()
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            line: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = None
        if split == "lines":
            if line is None:
                yield BadRecord(src, lineno, "invalid UTF-8")
            elif line.strip():
                yield Document(_strip_eol(line), src, lineno)
            continue
        if line is not None and not line.strip():  # a blank line ends the paragraph
            if para or bad:
                yield _paragraph(src, para, start, bad)
            para, start, bad = [], 0, 0
            continue
        start = start or lineno
        if line is None:
            bad = bad or lineno
        else:
            para.append(line)
    if para or bad:
        yield _paragraph(src, para, start, bad)


def _paragraph(src: str, lines: list[str], start: int, bad: int) -> Document | BadRecord:
    if bad:
        return BadRecord(src, bad, f"invalid UTF-8 (in the document starting at line {start}: skipped)")
    return Document(_strip_eol("".join(lines)), src, start)


def iter_documents(
    files: Iterable[str | os.PathLike],
    *,
    text_split: str = "file",
    progress: Callable[[int], None] | None = None,
) -> Iterator[Document | BadRecord]:
    """Every record of the corpus files, in order: a :class:`Document`, or a
    :class:`BadRecord` for one that cannot be read (the caller decides what to do with it).

    ``progress(n)`` is called with the number of raw bytes read since the last call.

    Raises:
        DataError: a file that cannot be read as a whole (e.g. corrupt gzip data).
    """
    if text_split not in TEXT_SPLITS:
        raise DataError(f"unknown text split {text_split!r} (choose from {', '.join(TEXT_SPLITS)})")
    for f in files:
        path = Path(f)
        kind = _input_kind(path) or "text"
        try:
            with open(path, "rb") as raw:
                tick = _Progress(raw, progress)
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw
                with stream:
                    if kind == "jsonl":
                        yield from _read_jsonl(path, stream, tick)
                    else:
                        yield from _read_text(path, stream, tick, text_split)
                    tick()
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc or type(exc).__name__})") from None


# ================================================================================================
# prepare
# ================================================================================================
@dataclass
class PrepareResult:
    """What :func:`prepare` wrote and read."""

    train_path: Path
    val_path: Path | None
    files: int
    documents: int
    tokens: int
    train_documents: int
    train_tokens: int
    val_documents: int
    val_tokens: int
    empty_documents: int
    seconds: float
    skipped: list[BadRecord] = field(default_factory=list)


def load_tokenizer_arg(spec: Any) -> Any:
    """A tokenizer from ``None`` / ``"world"`` (the bundled World vocabulary), a path to a
    World vocabulary file, or a tokenizer object (returned as is)."""
    from ..tokenizer import WorldTokenizer

    if spec is None or spec == "world":
        return WorldTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        return WorldTokenizer(spec)
    return spec


def _val_selection(lengths: np.ndarray, val_fraction: float, val_tokens: int | None, seed: int) -> np.ndarray:
    """Boolean mask of the held-out documents: whole documents, drawn in the order of a
    permutation seeded by ``seed``, until the fraction (of documents) or token target is met;
    at least one document when a split is asked for, never all of them."""
    n = lengths.shape[0]
    mask = np.zeros(n, bool)
    wanted = (val_tokens or 0) > 0 or val_fraction > 0
    if not wanted:
        return mask
    if n < 2:
        raise DataError(f"cannot hold out a validation split from {n} document(s); "
                        "use a validation fraction of 0 (--val-fraction 0)")
    order = np.random.default_rng(seed).permutation(n)
    if val_tokens:
        reached = np.cumsum(lengths[order]) >= val_tokens
        k = int(np.argmax(reached)) + 1 if reached.any() else n
    else:
        k = int(round(val_fraction * n))
    k = min(max(k, 1), n - 1)
    mask[order[:k]] = True
    return mask


def _copy_documents(staging: np.ndarray, lengths: np.ndarray, offsets: np.ndarray,
                    mask: np.ndarray, writer: TokenWriter) -> None:
    """Copy the documents where ``mask`` is True from ``staging`` into ``writer``, run by run."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for run in np.split(idx, breaks):
        a, b = int(run[0]), int(run[-1]) + 1
        writer.add_documents_raw(staging[offsets[a] : offsets[a] + lengths[a:b].sum()], lengths[a:b])


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: Any = None,
    *,
    val_fraction: float = 0.01,
    val_tokens: int | None = None,
    seed: int = 0,
    format: str = "tokens",
    text_split: str = "file",
    skip_bad: bool = False,
    progress: bool | None = False,
    offsets_inline_max: int = OFFSETS_INLINE_MAX,
) -> PrepareResult:
    """Tokenize a corpus into a training token file and a held-out validation file.

    Args:
        inputs: files and folders (see the module docstring for the accepted types).
        output: the output name: ``OUT`` gives ``OUT.tokens`` + ``OUT.json`` (or ``OUT.bin``
            + ``OUT.idx`` for ``format="binidx"``) and the validation split ``OUT.val.*``.
        tokenizer: a tokenizer object (``encode``, ``vocab_size``; end of text is id 0),
            ``"world"``/None for the bundled World tokenizer, or a vocabulary file path.
        val_fraction: fraction of the documents held out (rounded, at least 1 when > 0).
        val_tokens: instead, hold out documents until at least this many tokens.
        seed: picks the validation documents (the same inputs and seed give the same files).
        format: ``"tokens"`` or ``"binidx"``.
        text_split: how text files become documents: ``"file"``, ``"blank-lines"``, ``"lines"``.
        skip_bad: skip bad records (listed in the result) instead of raising.
        progress: show a tqdm bar over the input bytes (None: only on a terminal).

    Both outputs keep the corpus order of their documents; without a split, an ``OUT.val.*``
    left by an earlier run is removed. Tokenizing streams one document at
    a time into a staging file beside the output (so about twice the output's size of disk is
    needed while it runs); the outputs appear atomically at the end.

    Raises:
        DataError: bad inputs or records (``file:line: why``), or nothing to write.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if format not in FORMATS:
        raise DataError(f"unknown token file format {format!r} (choose from {', '.join(FORMATS)})")
    if not (0.0 <= val_fraction < 1.0) or math.isnan(val_fraction):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens < 0:
        raise DataError(f"val_tokens must be >= 0, got {val_tokens}")
    if text_split not in TEXT_SPLITS:
        raise DataError(f"unknown text split {text_split!r} (choose from {', '.join(TEXT_SPLITS)})")
    files = find_input_files(inputs)
    tok = load_tokenizer_arg(tokenizer)
    if getattr(tok, "eot_id", EOT_ID) != EOT_ID:
        raise DataError(f"the tokenizer's end-of-text id is {tok.eot_id}; token files need {EOT_ID}")
    vocab_size = int(tok.vocab_size)
    spec = tokenizer_spec(tok)
    train_data, _ = output_paths(output, format)
    prefix = _strip_suffix(train_data, (".tokens", ".bin"))
    val_prefix = _with_suffix(prefix, ".val")

    skipped: list[BadRecord] = []
    n_empty = 0
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=_no_bar(progress),
               dynamic_ncols=True)
    staging_prefix = prefix.parent / f".{prefix.name}.staging.{os.getpid()}"
    try:
        staging = TokenWriter(staging_prefix, vocab_size=vocab_size, format=format)
        with staging:
            for record in iter_documents(files, text_split=text_split, progress=bar.update):
                if isinstance(record, Document):
                    try:
                        ids = tok.encode(record.text)
                    except RwkvkitError as exc:  # e.g. a lone surrogate from a JSON \ud800 escape
                        record = BadRecord(record.source, record.line, f"cannot tokenize: {exc}")
                    else:
                        if not ids:
                            n_empty += 1
                        else:
                            staging.add_document(np.fromiter(ids, np.int64, len(ids)))
                            if staging.n_documents % 1024 == 0:
                                bar.set_postfix(docs=staging.n_documents, tokens=staging.n_tokens, refresh=False)
                        continue
                if not skip_bad:
                    raise DataError(f"{record} (skip_bad / --skip-bad skips such records and lists them)")
                skipped.append(record)
        bar.close()
        staged = open_tokens(staging.data_path)
        n_docs, n_tokens = staged.n_documents, staged.n_tokens
        if n_docs == 0:
            raise DataError(f"no documents in the input ({len(files)} file(s), {n_empty} empty "
                            f"document(s), {len(skipped)} bad record(s) skipped)")
        offsets = staged.doc_offsets
        lengths = np.diff(np.append(offsets, n_tokens))
        val_mask = _val_selection(lengths, val_fraction, val_tokens, seed)
        with TokenWriter(prefix, vocab_size=vocab_size, format=format, tokenizer=spec,
                         offsets_inline_max=offsets_inline_max) as w:
            _copy_documents(staged.tokens, lengths, offsets, ~val_mask, w)
        val_path = None
        if not val_mask.any():
            _remove_outputs(val_prefix, format)  # a stale split of an earlier run must not survive
        else:
            with TokenWriter(val_prefix, vocab_size=vocab_size, format=format, tokenizer=spec,
                             offsets_inline_max=offsets_inline_max) as wv:
                _copy_documents(staged.tokens, lengths, offsets, val_mask, wv)
            val_path = wv.data_path
        staged.close()
    finally:
        bar.close()
        _remove_outputs(staging_prefix, format)
    val_docs = int(val_mask.sum())
    val_toks = int(lengths[val_mask].sum())
    return PrepareResult(
        train_path=w.data_path,
        val_path=val_path,
        files=len(files),
        documents=n_docs,
        tokens=n_tokens,
        train_documents=n_docs - val_docs,
        train_tokens=n_tokens - val_toks,
        val_documents=val_docs,
        val_tokens=val_toks,
        empty_documents=n_empty,
        seconds=time.perf_counter() - t0,
        skipped=skipped,
    )


def _remove_outputs(prefix: Path, format: str) -> None:
    for p in (*output_paths(prefix, format), _with_suffix(prefix, ".offsets.npy")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: True hides, None hides unless stderr is a terminal."""
    return None if progress is None else not progress


def tokenize_documents(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    text_split: str = "file",
    skip_bad: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize text inputs in memory: ``(tokens, doc_offsets)`` laid out as in a token file
    (each document followed by token 0). For evaluation data; use :func:`prepare` for
    training corpora."""
    chunks: list[np.ndarray] = []
    offsets: list[int] = []
    n = 0
    for record in iter_documents(find_input_files(inputs), text_split=text_split):
        if isinstance(record, Document):
            try:
                ids = tokenizer.encode(record.text)
            except RwkvkitError as exc:
                record = BadRecord(record.source, record.line, f"cannot tokenize: {exc}")
            else:
                if ids:
                    offsets.append(n)
                    chunks.append(np.fromiter(ids, np.int64, len(ids)))
                    chunks.append(np.zeros(1, np.int64))
                    n += len(ids) + 1
                continue
        if not skip_bad:
            raise DataError(str(record))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return tokens, np.asarray(offsets, np.int64)


# ================================================================================================
# Sampler
# ================================================================================================
_GOLDEN = (math.sqrt(5) - 1) / 2
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller-Rabin with the first 12 prime bases: exact for
    n < 3.3e24, far beyond any token count)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(n_tokens: int, ctx_len: int) -> int:
    """The official "magic prime" for a corpus: the largest prime ``p ≡ 2 (mod 3)`` with
    ``p <= n_tokens // ctx_len - 1`` (as RWKV-LM's make_data.py computes it).

    Raises:
        DataError: the corpus has fewer than ``3 * ctx_len`` tokens (no such prime).
    """
    if ctx_len < 1:
        raise DataError(f"ctx_len must be >= 1, got {ctx_len}")
    for i in range(n_tokens // ctx_len - 1, 1, -1):
        if i % 3 == 2 and is_prime(i):
            return i
    raise DataError(f"{n_tokens} tokens are too few for ctx_len {ctx_len} (at least {3 * ctx_len} are needed)")


def sample_start(index: int, prime: int, ctx_len: int) -> int:
    """Start offset of global sample ``index`` (0-based) in the official order:
    ``((floor(prime * phi) * (index + 1)**3) mod prime) * ctx_len`` with phi = (sqrt(5)-1)/2.

    Because ``prime ≡ 2 (mod 3)``, cubing is a bijection modulo ``prime``, so samples
    ``0 .. prime-1`` visit every slot ``0 .. prime-1`` exactly once; the order then repeats.
    (RWKV-LM numbers its samples from 1: its ``ii`` is ``index + 1``.)
    """
    factor = int(prime * _GOLDEN)
    return (factor * pow(index + 1, 3, prime)) % prime * ctx_len


ORDERS = ("magic", "shuffle", "sequential")


class TokenSampler:
    """Training batches of ``ctx_len + 1`` contiguous tokens from a token stream.

    Args:
        data: a :class:`TokenData` (or any 1-D array-like of token ids).
        ctx_len: tokens per sample (``x`` and ``y`` are ``ctx_len`` long, ``y`` shifted by one).
        batch_size: samples per step on this rank (the micro batch).
        order: ``"magic"`` (the official order, below), ``"shuffle"`` (non-overlapping windows
            ``k * ctx_len``, a fresh seeded permutation each pass) or ``"sequential"`` (those
            windows in order).
        rank, world_size: data-parallel position; every rank must use the same settings.
        seed: for ``"shuffle"`` only.
        prime: the magic prime (default :func:`magic_prime` of the data); ``shift`` is added
            to every magic start (RWKV-LM's ``my_pile_shift``, default 0).

    Scheme. Step ``s`` covers the global samples ``s*W*B .. (s+1)*W*B - 1`` (``W`` ranks,
    ``B`` rows each); row ``b`` of rank ``r`` takes global sample ``g = s*W*B + b*W + r``.
    That is RWKV-LM's numbering (``ii = 1 + epoch*samples_per_epoch + idx*world_size + rank``
    with ``idx = step_in_epoch*B + b``), so with the same prime, ctx_len, B and W the batches
    are the official ones; ranks never share a sample within a pass. Sample ``g`` starts at
    :func:`sample_start` (``g``) in the magic order, or window ``g mod n_samples`` (of that
    pass's permutation) otherwise. A batch is a pure function of ``step``: to resume, save the
    step and call :meth:`batch` from there. ``n_samples`` is the number of distinct samples
    in one pass (``prime`` for the magic order).
    """

    def __init__(
        self,
        data: TokenData | np.ndarray,
        ctx_len: int,
        batch_size: int,
        *,
        order: str = "magic",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        prime: int | None = None,
        shift: int = 0,
    ) -> None:
        if order not in ORDERS:
            raise DataError(f"unknown sample order {order!r} (choose from {', '.join(ORDERS)})")
        if ctx_len < 1 or batch_size < 1:
            raise DataError(f"ctx_len and batch_size must be >= 1, got {ctx_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size {world_size})")
        self.data = data
        self.tokens = data.tokens if isinstance(data, TokenData) else data
        self.n_tokens = int(len(self.tokens))
        self.ctx_len, self.batch_size = ctx_len, batch_size
        self.order, self.rank, self.world_size, self.seed = order, rank, world_size, seed
        self.shift = shift
        need = ctx_len + 1
        if order == "magic":
            self.prime = magic_prime(self.n_tokens, ctx_len) if prime is None else int(prime)
            if self.prime < 2 or self.prime % 3 != 2 or not is_prime(self.prime):
                raise DataError(f"magic prime {self.prime} is not a prime ≡ 2 (mod 3)")
            last = (self.prime - 1) * ctx_len + shift + need
            if shift < 0 or last > self.n_tokens:
                raise DataError(f"magic prime {self.prime} with ctx_len {ctx_len} and shift {shift} "
                                f"reads up to token {last}, past the data's {self.n_tokens}")
            self.n_samples = self.prime
        else:
            self.prime = None
            self.n_samples = (self.n_tokens - 1) // ctx_len
            if self.n_samples < 1:
                raise DataError(f"{self.n_tokens} tokens are too few for one sample of ctx_len {ctx_len}")
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def samples_per_step(self) -> int:
        """Global samples per step (all ranks): ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    def sample_indices(self, step: int) -> list[int]:
        """Global sample numbers of this rank's rows at ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        base = step * self.samples_per_step
        return [base + b * self.world_size + self.rank for b in range(self.batch_size)]

    def start_of(self, index: int) -> int:
        """Token offset where global sample ``index`` starts."""
        if self.order == "magic":
            return sample_start(index, self.prime, self.ctx_len) + self.shift  # type: ignore[arg-type]
        n = self.n_samples
        window = index % n
        if self.order == "shuffle":
            epoch = index // n
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(n))
            window = int(self._perm[1][window])
        return window * self.ctx_len

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of this rank's rows at ``step`` (int64 [batch_size])."""
        return np.array([self.start_of(i) for i in self.sample_indices(step)], dtype=np.int64)

    def batch(self, step: int) -> tuple[Any, Any]:
        """``(x, y)``: LongTensors [batch_size, ctx_len], ``y`` = ``x`` shifted by one token."""
        import torch

        need = self.ctx_len + 1
        rows = np.empty((self.batch_size, need), np.int64)
        for b, s in enumerate(self.starts(step).tolist()):
            rows[b] = self.tokens[s : s + need]
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self.iterate()

    def iterate(self, start_step: int = 0, end_step: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Batches of steps ``start_step, start_step+1, ...`` (forever if ``end_step`` is None)."""
        step = start_step
        while end_step is None or step < end_step:
            yield self.batch(step)
            step += 1
