"""A sequential scan over a batch's chunks run alongside the kernels that work on every chunk
in parallel.

The chunked WKV kernels come in two kinds: a scan that carries the state through a sequence's
chunks one after another (few programs, a long latency-bound chain) and per-chunk kernels
(thousands of short programs, throughput-bound) that feed it or read what it wrote. Run one
after the other, the scan leaves most of the GPU idle. Cut every sequence into segments of
consecutive chunks: the scan over segment s needs only the per-chunk work of segment s (and
the state the scan over segment s - 1 left), so the two kinds can run at once on two streams,
the scan on a high-priority one so that its programs are placed first as the others retire.
The scans' state carries from one segment's launch to the next through their output buffer
(the final state, or the initial state's gradient); the numbers are those of the one-launch
form, bit for bit. The side stream is one per device and thread (a graph captured in one thread
never takes another thread's launches).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import triton

_LOCAL = threading.local()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The high-priority stream the scans run on (one per device and thread, made once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = getattr(_LOCAL, "streams", None)
    if streams is None:
        streams = _LOCAL.streams = {}
    stream = streams.get(index)
    if stream is None:
        # (a priority below the device's range maps to its highest)
        stream = streams[index] = torch.cuda.Stream(device, priority=-100)
    return stream


def split(n_seqs: int, n_chunks: int, max_chunks: int, n_segments: int) -> list[tuple[int, int]]:
    """[j0, j1) of each segment of a batch of ``n_seqs`` sequences with ``n_chunks`` chunks in
    all, at most ``max_chunks`` each: ``n_segments`` (at most one per chunk) runs of about equal
    length over the chunks of the longest sequence (one empty segment if there are none); one
    segment where the counts differ much (a segment's per-chunk launch has a program for every
    sequence's place in it, so uneven packed sequences would launch many empty programs)."""
    if max_chunks <= 0:
        return [(0, 0)]
    if n_seqs * max_chunks > 1.25 * n_chunks:
        n_segments = 1
    step = triton.cdiv(max_chunks, max(1, min(n_segments, max_chunks)))
    return [(j, min(j + step, max_chunks)) for j in range(0, max_chunks, step)]


def pipeline(
    device: torch.device,
    segs: list[tuple[int, int]],
    first: Callable[[int, int], None],
    second: Callable[[int, int], None],
    *,
    first_is_scan: bool,
) -> None:
    """For each segment in order, ``first(j0, j1)`` then ``second(j0, j1)``, where second(s)
    depends on first(s) only (and on second(s - 1) through its own stream). On CUDA with more
    than one segment the scan (``first`` if ``first_is_scan``, else ``second``) runs on the
    side stream, so first(s + 1) overlaps second(s); the current stream waits for it at the
    end, so callers see one ordered stream. Elsewhere the calls simply run in order."""
    if len(segs) == 1 or device.type != "cuda":
        for seg in segs:
            first(*seg)
            second(*seg)
        return
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(main)  # (the inputs are written on the current stream)
    s1, s2 = (side, main) if first_is_scan else (main, side)
    try:
        for seg in segs:
            with torch.cuda.stream(s1):
                first(*seg)
            done = torch.cuda.Event()
            done.record(s1)
            s2.wait_event(done)
            with torch.cuda.stream(s2):
                second(*seg)
    finally:  # (also when a launch raises: nothing on the side stream outlives the call unordered)
        main.wait_stream(side)
