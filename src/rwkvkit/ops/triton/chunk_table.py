"""Where every chunk of a batch lies, for the chunked Triton kernels (WKV-7 and WKV-6): a dense
[B, T] batch, or packed variable-length sequences given by cumulative offsets (``cu_seqlens``).
A chunk never crosses a sequence boundary: each sequence's chunks start at its own first
token, and its last chunk may be partial."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class ChunkTable(NamedTuple):
    """Where every chunk lies: ``cu`` token offsets of the sequences [S + 1], ``chunk_cu``
    chunk offsets of the sequences [S + 1], ``chunk_seq`` the sequence of each chunk
    [chunks] (int32, on the device), and the counts."""

    cu: torch.Tensor
    chunk_cu: torch.Tensor
    chunk_seq: torch.Tensor
    n_seqs: int
    n_chunks: int
    max_chunks: int  # the most chunks of any one sequence


_DENSE_TABLES: dict[tuple, ChunkTable] = {}


def dense_table(B: int, T: int, L: int, device: torch.device) -> ChunkTable:
    """The table of a dense batch: B sequences of T tokens (cached; built anew inside a CUDA
    graph capture, so that the graph owns its table: a cached one may be dropped later)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (B, T, L, str(device))
    table = None if capturing else _DENSE_TABLES.get(key)
    if table is None:
        nc = triton.cdiv(T, L)
        ar = torch.arange(B + 1, dtype=torch.int32, device=device)
        chunk_seq = torch.arange(B * nc, dtype=torch.int32, device=device) // nc
        table = ChunkTable(ar * T, ar * nc, chunk_seq, B, B * nc, nc)
        if capturing:
            return table
        if len(_DENSE_TABLES) > 64:
            _DENSE_TABLES.clear()
        _DENSE_TABLES[key] = table
    return table


def varlen_table(
    cu_seqlens: torch.Tensor, L: int, total: int, fn: str = "wkv7_triton", device: torch.device | None = None
) -> ChunkTable:
    """The table of packed sequences with cumulative offsets ``cu_seqlens`` (reads them on
    the host once; ``fn`` names the caller in the ValueError of bad offsets; the table goes
    to ``device``, default that of ``cu_seqlens``)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"{fn}: cu_seqlens must be a 1-D integer tensor of S + 1 offsets, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    offsets = [int(x) for x in cu_seqlens.tolist()]
    shown = f"{offsets[:8]}" + ("..." if len(offsets) > 8 else "")
    if offsets[0] != 0:
        problem = f"must start at 0, got {offsets[0]}"
    elif offsets[-1] != total:
        problem = f"must end at the {total} packed tokens, got {offsets[-1]}"
    elif any(b < a for a, b in zip(offsets, offsets[1:])):
        problem = "must not decrease"
    else:
        problem = None
    if problem is not None:
        raise ValueError(f"{fn}: cu_seqlens {problem} (offsets {shown})")
    counts = [triton.cdiv(b - a, L) for a, b in zip(offsets, offsets[1:])]
    chunk_cu = list(itertools.accumulate(counts, initial=0))
    device = cu_seqlens.device if device is None else device
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    chunk_seq = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    return ChunkTable(
        as_i32(offsets), as_i32(chunk_cu), chunk_seq.int(), len(counts), chunk_cu[-1], max(counts, default=0)
    )


@triton.jit
def chunk_of(pid, chunk_cu_ptr, seg_j0, seg_len, SEG: tl.constexpr):
    """The chunk of a per-chunk kernel's program ``pid`` and whether it exists. Without SEG the
    table's chunk ``pid``; with SEG one segment's programs are (sequence, j) pairs, j = seg_j0 +
    pid % seg_len the chunk's place in its sequence (past a sequence's end: none)."""
    if SEG:
        seq = pid // seg_len
        j = seg_j0 + pid % seg_len
        c0 = tl.load(chunk_cu_ptr + seq)
        return c0 + j, j < tl.load(chunk_cu_ptr + seq + 1) - c0
    return pid, pid >= 0
