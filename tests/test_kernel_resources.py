"""benchmarks/kernel_resources.py's executed-instruction count (--trips) on a hand-written
nvdisasm listing: loops are branches back to an earlier label, nested loops multiply, and the
branch to itself that ends every kernel is not a loop."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "kernel_resources", Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py")
kernel_resources = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(kernel_resources)


def listing(ops: list[str]) -> str:
    """nvdisasm-like text: a label line for 'L<n>:' items, else an instruction at the next address."""
    out, addr = [], 0
    for op in ops:
        if op.endswith(":"):
            out.append(f".L_x_{op[1:-1]}:")
        else:
            out.append(f"        /*{addr:04x}*/                   {op} ;")
            addr += 16
    return "\n".join(out)


def test_loops_counted_by_their_trips():
    text = listing([
        "MOV R0, R1",                        # 1
        "L0:", "FADD R0, R0, R2",            # outer loop body starts
        "L1:", "FMUL R3, R3, R4", "@P0 BRA `(.L_x_1)",  # inner loop: 2 instructions
        "@P1 BRA `(.L_x_0)",                 # outer loop: 4 instructions in all
        "EXIT", "L2:", "BRA `(.L_x_2)",      # the kernel's last branch to itself
    ])
    # outer x3: FADD, BRA (2 x 3); inner x3 x5: FMUL, BRA (2 x 15); MOV, EXIT, BRA once
    assert kernel_resources.executed(text, [3, 5]) == 6 + 30 + 3
    assert kernel_resources.executed(text, []) == 7  # every loop once: the static count
    assert kernel_resources.executed(text, [3]) == 6 + 6 + 3  # the inner loop once per outer trip
