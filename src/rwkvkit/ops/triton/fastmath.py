"""Math helpers shared by the Triton kernels.

``fast_exp``: e^x by one ``ex2.approx.ftz`` on the GPU, with subnormal results flushed to 0
(tl.exp adds a range check and two scalings for subnormal results: 5 instructions for 2; a
decay factor below 2^-126 is 0 for every sum it enters; relative error ~2^-22 otherwise). The
Triton CPU interpreter runs no PTX, so there it is tl.exp.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
COMPILED = tl.constexpr(not INTERPRETED)


@triton.jit
def fast_exp(x):
    if COMPILED:
        out = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = tl.exp(x)
    return out
