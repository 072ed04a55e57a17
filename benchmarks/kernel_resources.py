"""Offline sm_90 build of one of our Triton kernels: registers, spill stack and MMA kinds per
thread, without a GPU (benchmarks/NOTES.md quotes these builds).

    python benchmarks/kernel_resources.py rwkvkit.ops.triton.wkv7:_bwd_chunks_kernel N=64 L=16 LOG2L=4 BV=64
    python benchmarks/kernel_resources.py rwkvkit.ops.triton.wkv6:_wkv6_recurrent_kernel --warps 2 N=64 BV=32

``--lines N`` also prints the N source lines with the most SASS instructions. ``--trips 3,2``
adds "executed": the instructions one thread runs, each loop's body (a branch back to an earlier
label) counted as many times as its trip count, the counts given in the order of the loops' first
instructions, an outer loop before its inner ones (the loops found are printed; a loop not given
runs once; nested loops multiply). Static counts have mispredicted the
GPU where a loop went from unrolled to rolled (benchmarks/NOTES.md, twelfth session). Both sides
of an if are counted.

KEY=VALUE sets a constexpr (ints, True/False, strings such as PREC=tf32). Pointer arguments are
float32 unless named in --bf16 (default: the usual input and gradient names) or --fp16; the chunk tables
(cu_ptr, chunk_cu_ptr, chunk_seq_ptr) are int32; every pointer is marked 16-byte aligned, as launches
specialise them. Uses the ptxas and cuobjdump that ship with Triton. The figures are indicative:
a build of this Triton for sm_90, not necessarily the GPU machine's Triton.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BF16_DEFAULT = "r_ptr,k_ptr,v_ptr,a_ptr,b_ptr,dy_ptr,y_ptr,dr_ptr,dk_ptr,dv_ptr,da_ptr,db_ptr"
INT_TABLES = ("cu_ptr", "chunk_cu_ptr", "chunk_seq_ptr")


def constexpr_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def build(fn, constexprs: dict, bf16: set[str], warps: int, stages: int, maxnreg: int | None = None,
          fp16: frozenset[str] = frozenset(), lines: int = 0, trips: list[int] | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_TABLES:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in bf16 else "*fp16" if name in fp16 else "*fp32"
        else:
            signature[name] = "i32"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n.endswith("_ptr")}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 64),
                            options=dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {})))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        disasm = ""
        if lines or trips is not None:
            disasm = subprocess.run([str(tool.parent / "nvdisasm"), "--print-line-info-inline", "-c", f.name],
                                    capture_output=True, text=True, check=True).stdout
        if lines:
            print_lines(disasm, lines)
    extra = {"executed": executed(disasm, trips)} if trips is not None else {}
    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "spill_stores": sass.count(" STL"),
        "shared_bytes": kernel.metadata.shared,
        "wgmma": sass.count("HGMMA"),
        "mma_sync": sass.count("HMMA"),
        "barriers": sass.count("BAR.SYNC"),
        "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
        # static instruction counts (loops counted once): all, and the kinds ncu found costly in
        # the WKV-6 key-side kernel (benchmarks/NOTES.md, eighth session)
        "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s", sass, flags=re.M)),
        "shuffles": sass.count("SHFL"),
        "shared_ld_st": len(re.findall(r"\b(?:LDS|STS|LDSM|STSM)\b", sass)),
        "selects": len(re.findall(r"\b(?:SEL|FSEL)\b", sass)),
        **extra,
    }


_INST = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(.*)")  # opcode, operands


@functools.cache
def _in_triton(path: str) -> bool:
    """Whether ``path`` is one of Triton's own files (ours under ops/triton/ are not)."""
    import triton

    return Path(path).resolve().is_relative_to(Path(triton.__file__).resolve().parent)


def _frame(line_info: str, before):
    """(file, line) of an nvdisasm line-info comment: the innermost frame outside Triton's own
    files; ``before`` if it names none."""
    frames = [(f, int(n)) for f, n in re.findall(r'"([^"]+)", line (\d+)', line_info)]
    ours = [fr for fr in frames if not _in_triton(fr[0])]
    return (ours or frames or [before])[0]


def executed(disasm: str, trips: list[int]) -> int:
    """Instructions one thread runs (see the module docstring: --trips), from nvdisasm's listing;
    prints each loop found: its instructions, its trip count and its commonest source lines."""
    insts, labels, where = [], {}, None
    for text in disasm.splitlines():
        if "//##" in text:
            where = _frame(text, where)
        elif label := re.match(r"^(\.L_x_\d+):", text):
            labels[label.group(1)] = len(insts)
        elif inst := _INST.match(text):
            insts.append((inst.group(1), inst.group(2), where))
    times = [1] * len(insts)
    loops = sorted((labels[m.group(1)], i) for i, (op, rest, _) in enumerate(insts) if op == "BRA"
             and (m := re.search(r"\((\.L_x_\d+)\)", rest)) and labels.get(m.group(1), i) < i)  # (not the BRA to
    # itself that ends every kernel), by their first instruction: an outer loop before its inner ones
    for n, (first, last) in enumerate(loops):
        trip = trips[n] if n < len(trips) else 1
        for j in range(first, last + 1):
            times[j] *= trip  # (nested loops multiply)
        where_from = collections.Counter(insts[j][2] for j in range(first, last + 1)).most_common(3)
        print(f"# loop {n}: {last - first + 1} instructions, trips {trip}; lines "
              + ", ".join(f"{Path(w[0]).name}:{w[1]} ({k})" for w, k in where_from if w))
    return sum(times)


def print_lines(disasm: str, top: int) -> None:
    """The source lines with the most SASS instructions (static: loops counted once), with their
    commonest opcodes: nvdisasm's line table, as Triton's line info gives it (the innermost frame
    outside Triton's own files; code inlined from a helper often keeps only its call site)."""
    counts: collections.Counter = collections.Counter()
    ops: dict = collections.defaultdict(collections.Counter)
    where = None
    for text in disasm.splitlines():
        if "//##" in text:
            where = _frame(text, where)
            continue
        inst = _INST.match(text)
        if inst and where:
            counts[where] += 1
            ops[where][inst.group(1)] += 1
    print(f"# instructions by source line (static, {sum(counts.values())} in all)")
    for (path, line), n in counts.most_common(top):
        try:
            code = Path(path).read_text().splitlines()[line - 1].strip()
        except (OSError, IndexError):
            code = ""
        common = " ".join(f"{op} {k}" for op, k in ops[(path, line)].most_common(4))
        print(f"{n:6d}  {Path(path).name}:{line}  {code[:90]}\n        {common}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", help="module:function, e.g. rwkvkit.ops.triton.wkv7:_prep_kernel")
    p.add_argument("constexprs", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3, help="num_stages (default: Triton's, as our launches use)")
    p.add_argument("--maxnreg", type=int, help="cap the registers per thread (Triton's maxnreg launch option)")
    p.add_argument("--bf16", default=BF16_DEFAULT, help="pointer arguments holding bf16 (comma-separated)")
    p.add_argument("--fp16", default="", help="pointer arguments holding fp16 (comma-separated)")
    p.add_argument("--lines", type=int, default=0, metavar="N",
                   help="also print the N source lines with the most instructions")
    p.add_argument("--trips", metavar="N[,N...]",
                   help="the loops' trip counts in address order: adds the executed instruction count")
    args = p.parse_intermixed_args(argv)
    sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: another tree can be measured
    # a fresh Triton cache: a cached binary of the same source built from another tree would
    # carry that tree's file paths in its line table (--lines would quote the wrong file)
    cache = tempfile.TemporaryDirectory(prefix="kernel_resources_")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    module, _, name = args.kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    constexprs = {}
    for item in args.constexprs:
        key, _, value = item.partition("=")
        if key not in fn.arg_names:
            p.error(f"{name} has no argument {key!r} (arguments: {', '.join(fn.arg_names)})")
        constexprs[key] = constexpr_value(value)
    result = build(fn, constexprs, set(filter(None, args.bf16.split(","))), args.warps, args.stages, args.maxnreg,
                   frozenset(filter(None, args.fp16.split(","))), args.lines,
                   None if args.trips is None else [int(t) for t in args.trips.split(",") if t])
    print(f"{name} warps={args.warps} {constexprs}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
