"""layer_norm and rms_norm, forward and backward (one kernel each way, flag RMS)."""

import math
import operator
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import triton

from autotune import Config

from .. import runtime
from ..kernels.norm import _norm_bwd_kernel, _norm_fwd_kernel
from ..tuning.norm import NORM_BWD_TUNER, NORM_TUNER, norm_bwd_key, norm_key
from ._autocast import autocast_inputs
from ._common import check_float, check_no_forward_ad, check_same, use_reference


# --------------------------------------------------------------------------- launchers


def _split_eps(eps: float) -> tuple[float, float]:
    """eps as fp32 hi + lo: Triton passes Python floats as fp32, which would round
    eps (1e-5, say) for float64 inputs; hi + lo carries it to ~1e-15 relative."""
    hi = float(np.float32(eps))
    return hi, float(np.float32(eps - hi))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    rms: bool, config: Config | None = None, out_dtype: torch.dtype | None = None):
    """(y, mean, rstd) for x (M, N) with any strides, weight and bias (N,) or None.

    y is written in `out_dtype` (default x's); mean (None for rms) and rstd are (M,) in fp32
    (fp64 for float64). `config` overrides the tuner's choice.
    """
    M, N = x.shape
    y = runtime.new_output((M, N), out_dtype or x.dtype, x.device)
    acc = _stats_dtype(x.dtype)
    mean = None if rms else runtime.new_output((M,), acc, x.device)
    rstd = runtime.new_output((M,), acc, x.device)
    if y.numel() == 0:
        return y, mean, rstd
    cfg = config or NORM_TUNER.select(norm_key(N, M, x.dtype, rms, weight is not None))
    grid = (triton.cdiv(M, cfg["BLOCK_R"]),)
    _norm_fwd_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        mean if mean is not None else rstd, rstd,
        M, N, *_split_eps(eps),
        *x.stride(), *y.stride(),
        weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
        ONE_PASS=N <= cfg["BLOCK_N"], RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        **cfg.launch_kwargs(),
    )
    return y, mean, rstd


def launch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                    rstd: torch.Tensor, weight_grad: bool, bias_grad: bool, config: Config | None = None,
                    param_dtype: torch.dtype | None = None):
    """(dx, dweight, dbias) from dy and x (M, N), any strides; dweight / dbias None unless asked.

    Weight and bias gradients are reduced in two stages: per-program column sums
    (fp32, or fp64) in the kernel, then a torch sum over programs: deterministic.
    They are written in `param_dtype` (default x's: the weight's and bias's dtype).
    `config` overrides the tuner's choice.
    """
    M, N = x.shape
    dx = runtime.new_output((M, N), x.dtype, x.device)
    acc = rstd.dtype
    cfg = config or NORM_BWD_TUNER.select(
        norm_bwd_key(N, M, x.dtype, mean is None, weight is not None, weight_grad or bias_grad))
    if "PROGRAMS_PER_SM" not in cfg.host:  # a meta-parameter would reach the kernel, which has none
        raise ValueError(f"tritonops: the norm backward's config needs PROGRAMS_PER_SM as a host parameter, "
                         f"e.g. Config(meta, host={{'PROGRAMS_PER_SM': 2}}); got {cfg}")
    one_pass = N <= cfg["BLOCK_N"]
    programs = min(triton.cdiv(M, cfg["BLOCK_R"]),
                   cfg["PROGRAMS_PER_SM"] * runtime.device_properties()["multiprocessor_count"]) if dx.numel() else 0
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
            WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad, **cfg.launch_kwargs(),
        )
    param_dtype = param_dtype or x.dtype
    dw = dw_part.sum(0).to(param_dtype) if weight_grad else None
    db = db_part.sum(0).to(param_dtype) if bias_grad else None
    return dx, dw, db


# --------------------------------------------------------------------------- torch.library ops
# The forward ops also return the row statistics (mean, rstd: (M,) fp32, fp64 for
# float64) for their backward; the public functions return only the output.


def _rows_cols(input: torch.Tensor, normalized_shape: list[int]) -> tuple[int, int]:
    """(M, N): the flattened leading dims and the flattened normalized dims."""
    return math.prod(input.shape[:input.dim() - len(normalized_shape)]), math.prod(normalized_shape)


def _rms_norm_promotes() -> bool:
    """Whether this torch's rms_norm, given a weight of another dtype, returns the promoted
    dtype (a composite that multiplies by the weight after casting back to input's dtype) rather
    than input's (one that casts last, as torch 2.13's): asked of torch once, at import."""
    if not hasattr(torch, "rms_norm"):
        return False
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # so the probe does not use up torch's one "Mismatch dtype" warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.rms_norm(torch.ones(1, 2, dtype=torch.bfloat16), [2], torch.ones(2)).dtype != torch.bfloat16
    finally:
        torch.set_warn_always(warn_always)


_RMS_NORM_PROMOTES = _rms_norm_promotes()


def _output_dtype(input: torch.Tensor, weight: torch.Tensor | None, rms: bool) -> torch.dtype:
    """The output dtype torch gives: input's (layer_norm; rms_norm where torch casts last), or
    promoted with weight's (rms_norm where this torch promotes)."""
    if rms and weight is not None and _RMS_NORM_PROMOTES:
        return torch.promote_types(input.dtype, weight.dtype)
    return input.dtype


def _norm_fwd(input, normalized_shape, weight, bias, eps, rms):
    M, N = _rows_cols(input, normalized_shape)
    # A view where the strides allow one (the kernels read rows and columns through
    # their strides); reshape copies only layouts no (M, N) strides describe, e.g. a transpose.
    y, mean, rstd = launch_norm_fwd(input.reshape(M, N), weight.reshape(N) if weight is not None else None,
                                    bias.reshape(N) if bias is not None else None, eps, rms,
                                    out_dtype=_output_dtype(input, weight, rms))
    return y.view(input.shape), mean, rstd


def _norm_fwd_fake(input, normalized_shape, weight, rms):
    M, _ = _rows_cols(input, normalized_shape)
    stats = input.new_empty([M], dtype=_stats_dtype(input.dtype))
    y = input.new_empty(input.shape, dtype=_output_dtype(input, weight, rms))
    return (y, stats) if rms else (y, stats, input.new_empty([M], dtype=stats.dtype))


@torch.library.custom_op("tritonops::layer_norm", mutates_args=())
def layer_norm_op(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F.layer_norm(...), mean, rstd) on our kernel (validated inputs)."""
    return _norm_fwd(input, normalized_shape, weight, bias, eps, rms=False)


@layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps):
    return _norm_fwd_fake(input, normalized_shape, weight, rms=False)


@torch.library.custom_op("tritonops::rms_norm", mutates_args=())
def rms_norm_op(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.rms_norm(...), rstd) on our kernel (validated inputs, eps resolved)."""
    y, _, rstd = _norm_fwd(input, normalized_shape, weight, None, eps, rms=True)
    return y, rstd


@rms_norm_op.register_fake
def _(input, normalized_shape, weight, eps):
    return _norm_fwd_fake(input, normalized_shape, weight, rms=True)


def _norm_bwd(grad, input, normalized_shape, weight, mean, rstd, need_input, need_weight, need_bias, param_dtype):
    M, N = _rows_cols(input, normalized_shape)
    dx, dw, db = launch_norm_bwd(grad.reshape(M, N), input.reshape(M, N),
                                 weight.reshape(N) if weight is not None else None, mean, rstd,
                                 need_weight, need_bias, param_dtype=param_dtype)
    empty = grad.new_empty  # a fresh one for each: outputs of a custom op may not alias each other
    return (dx.view(input.shape) if need_input else empty(0),
            dw.view(normalized_shape) if need_weight else empty(0),
            db.view(normalized_shape) if need_bias else empty(0))


def _norm_bwd_fake(grad, input, normalized_shape, need_input, need_weight, need_bias, param_dtype):
    empty = grad.new_empty
    return (input.new_empty(input.shape) if need_input else empty(0),
            input.new_empty(normalized_shape, dtype=param_dtype) if need_weight else empty(0),
            input.new_empty(normalized_shape, dtype=param_dtype) if need_bias else empty(0))


@torch.library.custom_op("tritonops::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad: torch.Tensor, input: torch.Tensor, normalized_shape: list[int],
                           weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, need_input: bool,
                           need_weight: bool, need_bias: bool, param_dtype: torch.dtype,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d input, d weight, d bias) of layer_norm, the last two in `param_dtype` (weight's and
    bias's: input's, or float32 for a 16-bit input); an empty tensor for a gradient not asked for."""
    return _norm_bwd(grad, input, normalized_shape, weight, mean, rstd, need_input, need_weight, need_bias,
                     param_dtype)


@layer_norm_backward_op.register_fake
def _(grad, input, normalized_shape, weight, mean, rstd, need_input, need_weight, need_bias, param_dtype):
    return _norm_bwd_fake(grad, input, normalized_shape, need_input, need_weight, need_bias, param_dtype)


@torch.library.custom_op("tritonops::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: torch.Tensor, input: torch.Tensor, normalized_shape: list[int],
                         weight: torch.Tensor | None, rstd: torch.Tensor, need_input: bool,
                         need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d weight) of rms_norm, d weight in weight's dtype; an empty tensor for a gradient
    not asked for."""
    return _norm_bwd(grad, input, normalized_shape, weight, None, rstd, need_input, need_weight, False,
                     _param_dtype(input, weight))[:2]


@rms_norm_backward_op.register_fake
def _(grad, input, normalized_shape, weight, rstd, need_input, need_weight):
    return _norm_bwd_fake(grad, input, normalized_shape, need_input, need_weight, False,
                          _param_dtype(input, weight))[:2]


def _param_dtype(input: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """The dtype of a norm's weight and bias (one dtype when both are given), else input's."""
    return next((p.dtype for p in params if p is not None), input.dtype)


def _layer_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.param_dtype = _param_dtype(input, weight, bias)


def _layer_norm_grad(ctx, grad, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    need_input, _, need_weight, need_bias = ctx.needs_input_grad[:4]
    dx, dw, db = layer_norm_backward_op(grad, input, ctx.normalized_shape, weight, mean, rstd,
                                        need_input, need_weight, need_bias, ctx.param_dtype)
    return (dx if need_input else None), None, (dw if need_weight else None), (db if need_bias else None), None


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def _rms_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(input, weight, rstd)
    ctx.normalized_shape = normalized_shape


def _rms_norm_grad(ctx, grad, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    need_input, _, need_weight = ctx.needs_input_grad[:3]
    dx, dw = rms_norm_backward_op(grad, input, ctx.normalized_shape, weight, rstd, need_input, need_weight)
    return (dx if need_input else None), None, (dw if need_weight else None), None


rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# --------------------------------------------------------------------------- public ops


def _normalized_shape(op: str, normalized_shape) -> tuple[int, ...]:
    """normalized_shape as a tuple of ints, taking what F.layer_norm / F.rms_norm take: a tuple,
    list or torch.Size of integers (anything with __index__, one-element integer tensors
    included); a bare int, a bool or a float is a TypeError there, and so here (nn.LayerNorm's
    constructor is what turns an int into a tuple)."""
    if not isinstance(normalized_shape, (tuple, list)):
        raise TypeError(f"tritonops.{op}: normalized_shape must be a tuple of ints, "
                        f"not {type(normalized_shape).__name__}")
    shape = []
    for i, d in enumerate(normalized_shape):
        if isinstance(d, torch.Tensor) and d.dtype == torch.bool:  # torch's parser takes it, its op refuses it
            raise RuntimeError(f"tritonops.{op}: normalized_shape must hold integers, got a bool tensor at pos {i}")
        if isinstance(d, bool):
            d = None  # operator.index takes True; torch's parser does not
        try:
            shape.append(operator.index(d))
        except TypeError:
            raise TypeError(f"tritonops.{op}: normalized_shape must be a tuple of ints, but found element of type "
                            f"{type(normalized_shape[i]).__name__} at pos {i}") from None
    return tuple(shape)


def _check_shapes(input, shape: tuple[int, ...], weight, bias) -> None:
    """torch's checks of normalized_shape against the tensors (same messages, same RuntimeError)."""
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


def _check_params(op: str, input: torch.Tensor, params: dict[str, torch.Tensor | None]) -> torch.device:
    """input and the given weight / bias are floating and on one device; returns that device.

    Parameter dtypes follow torch: rms_norm takes a weight of any floating dtype (computed
    with it, output in input's dtype); layer_norm takes parameters of input's dtype, or
    float32 ones (both, when both are given) for a float16 / bfloat16 input."""
    _, device = check_same(op, {"input": input})
    for name, p in params.items():
        if p is None:
            continue
        check_float(op, name, p)
        if p.device != device:
            raise RuntimeError(f"tritonops.{op}: expected all tensors on one device, but input is on {device} "
                               f"and {name} is on {p.device}")
    given = {name: p.dtype for name, p in params.items() if p is not None}
    if op == "layer_norm" and any(dt != input.dtype for dt in given.values()):
        mixed_ok = input.dtype in (torch.float16, torch.bfloat16) and all(dt == torch.float32 for dt in given.values())
        if not mixed_ok:
            shown = ", ".join(f"{name} {dt}" for name, dt in given.items())
            raise RuntimeError(f"tritonops.layer_norm: expected weight and bias of input's dtype ({input.dtype}), or "
                               f"float32 ones for a float16 / bfloat16 input (mixed dtype), but got {shown}")
    return device


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm on Triton kernels: statistics in fp32 (fp64 for float64), output in input's
    dtype; weight and bias of input's dtype, or float32 for a 16-bit input. Under
    torch.autocast on CUDA it runs in float32, as torch's does."""
    shape = _normalized_shape("layer_norm", normalized_shape)  # first, as torch's argument parser
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    check_no_forward_ad("layer_norm", (input, weight, bias))
    device = _check_params("layer_norm", input, {"weight": weight, "bias": bias})
    _check_shapes(input, shape, weight, bias)
    if use_reference("layer_norm", device):
        return F.layer_norm(input, shape, weight, bias, eps)
    return layer_norm_op(input, list(shape), weight, bias, float(eps))[0]


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """F.rms_norm on Triton kernels. eps=None is, as in torch, the machine epsilon of the
    compute type: float32's for float16 / bfloat16 / float32 inputs, float64's for float64.
    The weight may have another floating dtype than input (output in the dtype torch's
    rms_norm gives then: input's in current torch, promoted with weight's in older ones). Under
    torch.autocast on CUDA it runs in float32, as torch's does."""
    shape = _normalized_shape("rms_norm", normalized_shape)  # first, as torch's argument parser
    input, weight = autocast_inputs("rms_norm", input, weight)
    check_no_forward_ad("rms_norm", (input, weight))
    device = _check_params("rms_norm", input, {"weight": weight})
    _check_shapes(input, shape, weight, None)
    if use_reference("rms_norm", device):
        return F.rms_norm(input, shape, weight, eps)
    if eps is None:
        eps = torch.finfo(_stats_dtype(input.dtype)).eps
    return rms_norm_op(input, list(shape), weight, float(eps))[0]
