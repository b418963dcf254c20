"""layer_norm and rms_norm, forward and backward (one kernel each way, flag RMS)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
import triton

from autotune import Config

from .. import runtime
from ..kernels.norm import _norm_bwd_kernel, _norm_fwd_kernel
from ._common import acc_dtype, check_same, interpreter_upcast, row_num_warps, use_reference

# --------------------------------------------------------------------------- config choice

ONE_PASS_MAX = {2: 16384, 4: 16384, 8: 8192}  # most elements of one row held in one tile, by itemsize
LOOP_BLOCK_N = 4096  # chunk of a longer row (two sweeps)
SHORT_ROW_TILE = 4096  # elements a program aims at when rows are short: several rows per program


def _norm_tile(n_cols: int, n_rows: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the whole row (next_pow2, at least 16) while it fits one tile,
    else LOOP_BLOCK_N chunks; short rows stacked up to SHORT_ROW_TILE elements a program."""
    one_pass_max = ONE_PASS_MAX[dtype.itemsize]
    if n_cols > one_pass_max:
        return 1, LOOP_BLOCK_N
    block_n = max(16, triton.next_power_of_2(n_cols))
    return max(1, min(SHORT_ROW_TILE // block_n, triton.next_power_of_2(max(n_rows, 1)))), block_n


@functools.lru_cache(maxsize=4096)
def norm_config(n_cols: int, n_rows: int, dtype: torch.dtype) -> Config:
    """The config of _norm_fwd_kernel (layer_norm and rms_norm) for rows of n_cols elements.

    The single place it is chosen; for now a heuristic: _norm_tile's tile, warps
    growing with it (4, 8 from 2048 elements, 16 from 8192), 2 stages where it loops.
    """
    block_m, block_n = _norm_tile(n_cols, n_rows, dtype)
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=row_num_warps(block_m * block_n),
                  num_stages=2 if n_cols > block_n else 1)


@functools.lru_cache(maxsize=4096)
def norm_bwd_config(n_cols: int, n_rows: int, dtype: torch.dtype) -> Config:
    """The config of _norm_bwd_kernel: the forward's tile, and PROGRAMS_PER_SM, which sets
    the persistent grid (min(row blocks, PROGRAMS_PER_SM x SMs) programs), hence the
    height of the fp32 weight/bias partial-sum buffers the second stage reduces."""
    block_m, block_n = _norm_tile(n_cols, n_rows, dtype)
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "PROGRAMS_PER_SM": 2},
                  num_warps=row_num_warps(block_m * block_n), num_stages=2 if n_cols > block_n else 1)


# --------------------------------------------------------------------------- launchers


def _split_eps(eps: float) -> tuple[float, float]:
    """eps as fp32 hi + lo: Triton passes Python floats as fp32, which would round
    eps (1e-5, say) for float64 inputs; hi + lo carries it to ~1e-15 relative."""
    hi = float(np.float32(eps))
    return hi, float(np.float32(eps - hi))


def launch_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    rms: bool, config: Config | None = None):
    """(y, mean, rstd) for x (M, N) with any strides, weight and bias (N,) or None.

    mean (None for rms) and rstd are (M,) in fp32 (fp64 for float64). `config`
    overrides norm_config.
    """
    M, N = x.shape
    y = runtime.new_output((M, N), x.dtype, x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = None if rms else runtime.new_output((M,), acc, x.device)
    rstd = runtime.new_output((M,), acc, x.device)
    if y.numel() == 0:
        return y, mean, rstd
    cfg = config or norm_config(N, M, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _norm_fwd_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        mean if mean is not None else rstd, rstd,
        M, N, *_split_eps(eps),
        *x.stride(), *y.stride(),
        weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
        ONE_PASS=N <= cfg["BLOCK_N"], RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype(x.dtype), UPCAST=interpreter_upcast(x.dtype),
        **cfg.launch_kwargs(),
    )
    return y, mean, rstd


def launch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                    rstd: torch.Tensor, weight_grad: bool, bias_grad: bool, config: Config | None = None):
    """(dx, dweight, dbias) from dy and x (M, N), any strides; dweight / dbias None unless asked.

    Weight and bias gradients are reduced in two stages: per-program column sums
    (fp32, or fp64) in the kernel, then a torch sum over programs: deterministic.
    `config` overrides norm_bwd_config.
    """
    M, N = x.shape
    dx = runtime.new_output((M, N), x.dtype, x.device)
    acc = rstd.dtype
    cfg = config or norm_bwd_config(N, M, x.dtype)
    meta = cfg.launch_kwargs()
    programs_per_sm = meta.pop("PROGRAMS_PER_SM")
    one_pass = N <= cfg["BLOCK_N"]
    programs = min(triton.cdiv(M, cfg["BLOCK_M"]),
                   programs_per_sm * runtime.device_properties()["multiprocessor_count"]) if dx.numel() else 0
    # A one-pass program writes its whole part row; a looped one adds into it, so starts from zeros.
    new_part = (lambda: runtime.new_output((programs, N), acc, x.device)) if one_pass else (
        lambda: torch.zeros((programs, N), dtype=acc, device=x.device))
    dw_part = new_part() if weight_grad else None
    db_part = new_part() if bias_grad else None
    if programs:
        _norm_bwd_kernel[(programs,)](
            x, dy, dx, weight if weight is not None else x, mean if mean is not None else rstd, rstd,
            dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
            M, N, *x.stride(), *dy.stride(), *dx.stride(), weight.stride(0) if weight is not None else 0,
            ONE_PASS=one_pass, RMS=mean is None, HAS_WEIGHT=weight is not None,
            WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad,
            ACC_DTYPE=acc_dtype(x.dtype), UPCAST=interpreter_upcast(x.dtype),
            **meta,
        )
    dw = dw_part.sum(0).to(x.dtype) if weight_grad else None
    db = db_part.sum(0).to(x.dtype) if bias_grad else None
    return dx, dw, db


# --------------------------------------------------------------------------- autograd


class NormFunction(torch.autograd.Function):
    """layer_norm (rms=False) or rms_norm of x (M, N) over N; weight, bias (N,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        y, mean, rstd = launch_norm_fwd(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        _, need_w, need_b, _, _ = ctx.needs_input_grad
        dx, dw, db = launch_norm_bwd(dy, x, weight, mean, rstd, need_w, need_b)
        return dx, dw, db, None, None


# --------------------------------------------------------------------------- public ops


def _check_shapes(input, normalized_shape, weight, bias) -> tuple[int, ...]:
    """normalized_shape as a tuple, after torch's checks (same messages, same RuntimeError)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
                           "one element, but got normalized_shape = []")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{list(t.shape)} and normalized_shape = {list(shape)}")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size{list(input.shape)}")
    return shape


def _norm(input, shape, weight, bias, eps, rms):
    N = math.prod(shape)
    M = math.prod(input.shape[:input.dim() - len(shape)])
    # A view where the strides allow one (the kernels read rows and columns through
    # their strides); reshape copies only layouts no (M, N) strides describe, e.g. a transpose.
    x = input.reshape(M, N)
    w = weight.reshape(N) if weight is not None else None
    b = bias.reshape(N) if bias is not None else None
    return NormFunction.apply(x, w, b, float(eps), rms).view(input.shape)


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm on Triton kernels: statistics in fp32 (fp64 for float64), output in input's dtype."""
    _, device = check_same("layer_norm", {"input": input, "weight": weight, "bias": bias})
    shape = _check_shapes(input, normalized_shape, weight, bias)
    if use_reference("layer_norm", device):
        return F.layer_norm(input, shape, weight, bias, eps)
    return _norm(input, shape, weight, bias, eps, rms=False)


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """F.rms_norm on Triton kernels. eps=None is, as in torch, the machine epsilon of the
    compute type: float32's for float16 / bfloat16 / float32 inputs, float64's for float64."""
    _, device = check_same("rms_norm", {"input": input, "weight": weight})
    shape = _check_shapes(input, normalized_shape, weight, None)
    if use_reference("rms_norm", device):
        return F.rms_norm(input, shape, weight, eps)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    return _norm(input, shape, weight, None, eps, rms=True)
