"""@triton.jit helpers shared by the op families."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # libdevice's tanh is unavailable under the interpreter; this form is accurate and overflow-safe.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _round_fp32_to_bf16(x):
    # Round to nearest even on the bits, so the truncating cast that follows is exact.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def cast_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even.

    UPCAST is set only under the interpreter with 16-bit types; its fp32 -> bf16
    cast truncates, so there the rounding is done by hand first.
    """
    if UPCAST:
        if dtype == tl.bfloat16:
            x = _round_fp32_to_bf16(x.to(tl.float32))
    return x.to(dtype)
