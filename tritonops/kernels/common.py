"""@triton.jit helpers shared by the op families.

What depends on the interpreter or on the inputs' precision is derived here from
element types, so kernels take no parameters for it:
- `acc_type(dtype)`: the accumulator type, fp64 for fp64 data, fp32 otherwise.
- `upcast(x)`: a loaded tile in the type its arithmetic is right in: fp32 for fp16 /
  bf16 under the interpreter (whose 16-bit float arithmetic is wrong), x itself
  otherwise; on the GPU it emits nothing.
- `cast_to(x, dtype)`: x.to(dtype), rounded to nearest even also under the
  interpreter, whose fp32 -> bf16 cast truncates.
"""

import os

import triton
import triton.language as tl

# The condition of autotune.device.interpreter_active() (kernels/ does not import torch),
# read once at import, as Triton decides when it decorates each kernel whether to interpret it.
# A plain bool, not a tl.constexpr global: jit code reads it only through the constexpr
# functions below, so it folds away when compiling, and autotune's source hash (which takes
# the values of the constexpr globals a kernel names) stays the same with and without the
# interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@triton.constexpr_function
def interpreting():
    """Whether the calling jit code runs under the interpreter: a compile-time False on the GPU."""
    return INTERPRETER


@triton.constexpr_function
def acc_type(dtype):
    """The type to accumulate `dtype` data in: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == tl.float64 else tl.float32


@triton.constexpr_function
def compute_type(dtype):
    """The type arithmetic on `dtype` data runs in: float32 for 16-bit floats under the
    interpreter (its float16 / bfloat16 arithmetic is wrong), `dtype` itself otherwise."""
    if INTERPRETER and (dtype == tl.float16 or dtype == tl.bfloat16):
        return tl.float32
    return dtype


@triton.jit
def upcast(x):
    """x in compute_type(x.dtype); a cast to its own type emits nothing, so a no-op on the GPU."""
    return x.to(compute_type(x.dtype))


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
def cast_to(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even.

    The interpreter's fp32 -> bf16 cast truncates, so there the rounding is done by hand
    first; compiled code casts directly (the GPU's cast rounds).
    """
    if interpreting():
        if dtype == tl.bfloat16:
            x = _round_fp32_to_bf16(x.to(tl.float32))
    return x.to(dtype)
