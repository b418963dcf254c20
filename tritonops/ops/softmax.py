"""softmax and log_softmax over any dim, forward and backward (one kernel, flag LOG)."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
import triton

from autotune import Config

from .. import runtime
from ..kernels.softmax import _softmax_bwd_kernel, _softmax_fwd_kernel
from ._common import FLOAT_DTYPES, acc_dtype, check_same, interpreter_upcast, row_num_warps, use_reference

# --------------------------------------------------------------------------- config choice

ONE_PASS_MAX = {2: 16384, 4: 16384, 8: 8192}  # most elements of one row held in one tile, by itemsize
LOOP_BLOCK_N = 4096  # chunk of a longer row, swept twice (online softmax)
SHORT_ROW_TILE = 4096  # elements a program aims at when rows are short: several rows per program
STRIDED_ROWS = 32  # rows per program when the reduced dim is not the unit-stride one


def row_tile_config(n_cols: int, n_rows: int, dtype: torch.dtype, strided: bool) -> Config:
    """BLOCK_R x BLOCK_N tile for a row-wise reduction (softmax, norms).

    - Unit-stride rows: BLOCK_N = next_pow2(N) (at least 16) while that fits in one
      tile (ONE_PASS_MAX, 16K elements, 8K for float64); longer rows loop over
      LOOP_BLOCK_N chunks. Short rows are stacked, BLOCK_R = SHORT_ROW_TILE // BLOCK_N
      (never past next_pow2(n_rows)), so each program moves enough bytes.
    - Strided rows (the reduced dim is not unit-stride, e.g. softmax over dim 1 of
      (B, C, L)): BLOCK_R = 32 neighbouring rows, which are contiguous in memory, so the
      loads coalesce; BLOCK_N fills the rest of the one-tile budget, looping beyond it.
    Warps grow with the tile (row_num_warps); 2 stages only where there is a loop.
    """
    one_pass_max = ONE_PASS_MAX[dtype.itemsize]
    rows_cap = triton.next_power_of_2(max(n_rows, 1))
    if strided:
        block_r = min(STRIDED_ROWS, rows_cap)
        block_n = min(max(16, triton.next_power_of_2(n_cols)), one_pass_max // block_r)
    elif n_cols <= one_pass_max:
        block_n = max(16, triton.next_power_of_2(n_cols))
        block_r = max(1, min(SHORT_ROW_TILE // block_n, rows_cap))
    else:
        block_n, block_r = LOOP_BLOCK_N, 1
    looped = n_cols > block_n
    return Config({"BLOCK_R": block_r, "BLOCK_N": block_n},
                  num_warps=row_num_warps(block_r * block_n), num_stages=2 if looped else 1)


@functools.lru_cache(maxsize=4096)
def softmax_config(n_cols: int, n_rows: int, dtype: torch.dtype, strided: bool = False) -> Config:
    """The config of _softmax_fwd_kernel for rows of n_cols elements; dtype is the output's.

    The single place it is chosen; for now the row_tile_config heuristic.
    """
    return row_tile_config(n_cols, n_rows, dtype, strided)


@functools.lru_cache(maxsize=4096)
def softmax_bwd_config(n_cols: int, n_rows: int, dtype: torch.dtype, strided: bool = False) -> Config:
    """The config of _softmax_bwd_kernel; the same heuristic as the forward for now
    (two tiles live, y and dy, which 16K elements over 16 warps still hold in registers)."""
    return row_tile_config(n_cols, n_rows, dtype, strided)


# --------------------------------------------------------------------------- layout


def _collapse(sizes, strides):
    """(size, stride) walking the given dims as one, or None when no single stride does."""
    size, stride = 1, 0
    for sz, st in zip(reversed(sizes), reversed(strides)):
        if sz == 1:
            continue
        if size == 1:
            size, stride = sz, st
        elif st == stride * size:
            size *= sz
        else:
            return None
    return size, stride


def _as_3d(t: torch.Tensor, dim: int):
    """t read as (outer, N, inner) reduced over N: ((outer, N, inner), (strides)), or None."""
    outer = _collapse(t.shape[:dim], t.stride()[:dim])
    inner = _collapse(t.shape[dim + 1:], t.stride()[dim + 1:])
    if outer is None or inner is None:
        return None
    return (outer[0], t.shape[dim], inner[0]), (outer[1], t.stride(dim), inner[1])


def _strided_view(t: torch.Tensor, dim: int):
    """(t, sizes, strides), t copied to contiguous only when the dims before or after
    `dim` are not walked by one stride each (e.g. some permutations)."""
    view = _as_3d(t, dim)
    if view is None:
        t = t.contiguous()
        view = _as_3d(t, dim)
    return (t, *view)


def _new_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output of t's shape and (dense) layout, in `dtype`."""
    if dtype == t.dtype:
        return runtime.new_output_like(t)
    return runtime.new_output(t.shape, dtype, t.device)


# --------------------------------------------------------------------------- launchers


def launch_softmax_fwd(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype | None = None,
                       config: Config | None = None) -> torch.Tensor:
    """softmax (or log_softmax) of x (at least 1-D, dim >= 0) over `dim`, any strides,
    written in `out_dtype` (default x's). `config` overrides softmax_config."""
    out_dtype = out_dtype or x.dtype
    x, (outer, n, inner), x_strides = _strided_view(x, dim)
    y = _new_like(x, out_dtype)
    if y.numel() == 0:
        return y
    y_view = _as_3d(y, dim)
    if y_view is None:  # an output layout of x's that does not collapse: write a contiguous one
        y = runtime.new_output(x.shape, out_dtype, x.device)
        y_view = _as_3d(y, dim)
    n_rows = outer * inner
    cfg = config or softmax_config(n, n_rows, out_dtype, x_strides[1] != 1)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _softmax_fwd_kernel[grid](
        x, y, n_rows, n, inner, *x_strides, *y_view[1],
        ONE_PASS=n <= cfg["BLOCK_N"], LOG=log, ACC_DTYPE=acc_dtype(out_dtype),
        UPCAST=interpreter_upcast(x.dtype) or interpreter_upcast(out_dtype),
        **cfg.launch_kwargs(),
    )
    return y


def launch_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool, x_dtype: torch.dtype,
                       config: Config | None = None) -> torch.Tensor:
    """The input gradient, in x_dtype, from the forward output y and its gradient dy (any strides)."""
    y, (outer, n, inner), y_strides = _strided_view(y, dim)
    dy, _, dy_strides = _strided_view(dy, dim)
    dx = _new_like(y, x_dtype)
    if dx.numel() == 0:
        return dx
    n_rows = outer * inner
    cfg = config or softmax_bwd_config(n, n_rows, y.dtype, y_strides[1] != 1)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _softmax_bwd_kernel[grid](
        y, dy, dx, n_rows, n, inner, *y_strides, *dy_strides, *_as_3d(dx, dim)[1],
        ONE_PASS=n <= cfg["BLOCK_N"], LOG=log, ACC_DTYPE=acc_dtype(y.dtype),
        UPCAST=interpreter_upcast(x_dtype) or interpreter_upcast(y.dtype),
        **cfg.launch_kwargs(),
    )
    return dx


# --------------------------------------------------------------------------- autograd


class SoftmaxFunction(torch.autograd.Function):
    """softmax / log_softmax of x (at least 1-D) over dim >= 0, output in out_dtype."""

    @staticmethod
    def forward(ctx, x, dim, log, out_dtype):
        y = launch_softmax_fwd(x, dim, log, out_dtype)
        ctx.save_for_backward(y)
        ctx.dim, ctx.log, ctx.x_dtype = dim, log, x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return launch_softmax_bwd(y, dy, ctx.dim, ctx.log, ctx.x_dtype), None, None, None


# --------------------------------------------------------------------------- public ops


# dtype -> the input dtypes the kernel casts to it exactly on load
_WIDER = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float64: FLOAT_DTYPES,
}


def _wrap_dim(dim, ndim: int) -> int:
    dim = operator.index(dim)
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def _softmax(op: str, input: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool) -> torch.Tensor:
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"tritonops.{op}: dtype {dtype} is not supported; "
                            "supported are float16, bfloat16, float32 and float64")
        if isinstance(input, torch.Tensor) and (not input.is_floating_point() or input.dtype not in _WIDER[dtype]):
            # torch casts first; the kernel fuses only exact (widening) casts, so narrowing ones happen here.
            input = input.to(dtype)
    _, device = check_same(op, {"input": input})
    d = _wrap_dim(dim, input.dim())
    if use_reference(op, device):
        return (F.log_softmax if log else F.softmax)(input, d, dtype=dtype)
    x = input.reshape(1) if input.dim() == 0 else input
    y = SoftmaxFunction.apply(x, d, log, dtype or input.dtype)
    return y.view(()) if input.dim() == 0 else y


def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.softmax on a Triton kernel: any rank and dim, any strides. `dtype` casts the input
    first; a widening cast is fused (read in the input's dtype, written in `dtype`)."""
    return _softmax("softmax", input, dim, dtype, log=False)


def log_softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.log_softmax on a Triton kernel; as softmax."""
    return _softmax("log_softmax", input, dim, dtype, log=True)
