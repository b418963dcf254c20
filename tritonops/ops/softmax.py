"""softmax and log_softmax over any dim, forward and backward (one kernel, flag LOG)."""

import operator

import torch
import torch.nn.functional as F
import triton

from autotune import Config

from .. import runtime
from ..kernels.softmax import _softmax_bwd_kernel, _softmax_fwd_kernel
from ..tuning.softmax import SOFTMAX_BWD_TUNER, SOFTMAX_TUNER, softmax_key
from ._autocast import autocast_dtype, autocast_eligible
from ._common import FLOAT_DTYPES, check_no_forward_ad, check_same, unsupported_dtype, use_reference


# --------------------------------------------------------------------------- layout


def _collapse(sizes, strides):
    """(size, stride) walking the given dims as one, or None when no single stride does."""
    if 0 in sizes:  # nothing to walk (and no stride rule holds across an empty dim)
        return 0, 0
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


def _empty_output(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An output of t's shape in `dtype`: t's (dense) layout where that reads as
    (outer, N, inner), else contiguous. The fake implementations call it too, so
    torch.compile sees the real strides."""
    out = torch.empty_like(t, dtype=dtype)
    if _as_3d(out, dim) is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return out


def _new_output(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    out = _empty_output(t, dim, dtype)
    return runtime.poisoned(out) if runtime.POISON else out


# --------------------------------------------------------------------------- launchers


def launch_softmax_fwd(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype | None = None,
                       config: Config | None = None) -> torch.Tensor:
    """softmax (or log_softmax) of x (at least 1-D, dim >= 0) over `dim`, any strides,
    written in `out_dtype` (default x's). `config` overrides the tuner's choice."""
    out_dtype = out_dtype or x.dtype
    x, (outer, n, inner), x_strides = _strided_view(x, dim)
    y = _new_output(x, dim, out_dtype)
    if y.numel() == 0:
        return y
    n_rows = outer * inner
    cfg = config or SOFTMAX_TUNER.select(softmax_key(n, n_rows, out_dtype, x_strides[1] != 1, log))
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _softmax_fwd_kernel[grid](
        x, y, n_rows, n, inner, *x_strides, *_as_3d(y, dim)[1],
        ONE_PASS=n <= cfg["BLOCK_N"], LOG=log, **cfg.launch_kwargs(),
    )
    return y


def launch_softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool, x_dtype: torch.dtype,
                       config: Config | None = None) -> torch.Tensor:
    """The input gradient, in x_dtype, from the forward output y and its gradient dy (any strides)."""
    y, (outer, n, inner), y_strides = _strided_view(y, dim)
    dy, _, dy_strides = _strided_view(dy, dim)
    dx = _new_output(y, dim, x_dtype)
    if dx.numel() == 0:
        return dx
    n_rows = outer * inner
    cfg = config or SOFTMAX_BWD_TUNER.select(softmax_key(n, n_rows, y.dtype, y_strides[1] != 1, log))
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _softmax_bwd_kernel[grid](
        y, dy, dx, n_rows, n, inner, *y_strides, *dy_strides, *_as_3d(dx, dim)[1],
        ONE_PASS=n <= cfg["BLOCK_N"], LOG=log, **cfg.launch_kwargs(),
    )
    return dx


# --------------------------------------------------------------------------- torch.library ops
# tritonops::softmax and tritonops::log_softmax take any rank (0-D included) and any
# dim in range; their fake implementations allocate as the real ones do (same
# layout rules), and their autograd formulas call tritonops::softmax_backward.


def _as_1d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def _softmax_impl(input: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool) -> torch.Tensor:
    x = _as_1d(input)
    y = launch_softmax_fwd(x, dim % x.dim(), log, dtype or input.dtype)
    return y.view(()) if input.dim() == 0 else y


def _softmax_fake(input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    x = _as_1d(input)
    dim = dim % x.dim()
    y = _empty_output(_strided_view(x, dim)[0], dim, dtype or input.dtype)
    return y.view(()) if input.dim() == 0 else y


@torch.library.custom_op("tritonops::softmax", mutates_args=())
def softmax_op(input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    """F.softmax(input, dim) written in `dtype` (default input's) on our kernel (validated inputs)."""
    return _softmax_impl(input, dim, dtype, log=False)


@torch.library.custom_op("tritonops::log_softmax", mutates_args=())
def log_softmax_op(input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    """F.log_softmax(input, dim) written in `dtype` (default input's) on our kernel."""
    return _softmax_impl(input, dim, dtype, log=True)


softmax_op.register_fake(_softmax_fake)
log_softmax_op.register_fake(_softmax_fake)


@torch.library.custom_op("tritonops::softmax_backward", mutates_args=())
def softmax_backward_op(grad: torch.Tensor, output: torch.Tensor, dim: int, log: bool,
                        input_dtype: torch.dtype) -> torch.Tensor:
    """d input of softmax (log_softmax if `log`) from its output and the output's gradient."""
    y = _as_1d(output)
    dx = launch_softmax_bwd(y, _as_1d(grad), dim % y.dim(), log, input_dtype)
    return dx.view(()) if output.dim() == 0 else dx


@softmax_backward_op.register_fake
def _(grad, output, dim, log, input_dtype):
    y = _as_1d(output)
    dim = dim % y.dim()
    dx = _empty_output(_strided_view(y, dim)[0], dim, input_dtype)
    return dx.view(()) if output.dim() == 0 else dx


def _softmax_setup(ctx, inputs, output):
    input, dim, _ = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.input_dtype = dim, input.dtype


def _softmax_grad(log: bool):
    def grad_fn(ctx, grad):
        (output,) = ctx.saved_tensors
        return softmax_backward_op(grad, output, ctx.dim, log, ctx.input_dtype), None, None
    return grad_fn


softmax_op.register_autograd(_softmax_grad(False), setup_context=_softmax_setup)
log_softmax_op.register_autograd(_softmax_grad(True), setup_context=_softmax_setup)


# --------------------------------------------------------------------------- public ops


# dtype -> the input dtypes the kernel casts to it exactly on load
_WIDER = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float64: FLOAT_DTYPES,
}


# The Python types torch's argument parser takes for a dtype, and the dtypes it reads them as.
_PYTHON_DTYPES = {float: torch.float64, int: torch.int64, bool: torch.bool, complex: torch.complex128}


def _wrap_dim(dim, ndim: int) -> int:
    dim = operator.index(dim)
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def _softmax(op: str, input: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool) -> torch.Tensor:
    if dtype is not None:
        if isinstance(dtype, type):
            dtype = _PYTHON_DTYPES.get(dtype, dtype)
        if not isinstance(dtype, torch.dtype):  # as torch's argument parser: a plain TypeError
            raise TypeError(f"tritonops.{op}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise unsupported_dtype(op, "the requested output", dtype)
    elif autocast_dtype(op, input) is not None and autocast_eligible(input, input.device.type):
        # torch's autocast (CUDA) runs softmax with dtype=float32 when none is given
        dtype = torch.float32
    if dtype is not None:
        if isinstance(input, torch.Tensor) and (not input.is_floating_point() or input.dtype not in _WIDER[dtype]):
            # torch casts first; the kernel fuses only exact (widening) casts, so narrowing ones happen here.
            input = input.to(dtype)
    _, device = check_same(op, {"input": input})
    check_no_forward_ad(op, (input,))
    d = _wrap_dim(dim, input.dim())
    if use_reference(op, device):
        return (F.log_softmax if log else F.softmax)(input, d, dtype=dtype)
    return (log_softmax_op if log else softmax_op)(input, d, dtype)


def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.softmax on a Triton kernel: any rank and dim, any strides. `dtype` casts the input
    first; a widening cast is fused (read in the input's dtype, written in `dtype`). Under
    torch.autocast on CUDA it writes float32 unless `dtype` is given, as torch's does."""
    return _softmax("softmax", input, dim, dtype, log=False)


def log_softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.log_softmax on a Triton kernel; as softmax."""
    return _softmax("log_softmax", input, dim, dtype, log=True)
