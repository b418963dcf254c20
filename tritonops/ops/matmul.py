"""matmul and linear (with a fused bias + activation epilogue), forward and backward."""

import math

import torch
import triton

from autotune import Config

from .. import reference, runtime
from ..kernels.matmul import _epilogue_bwd_kernel, _matmul_fwd_kernel, _matmul_tma_kernel, _splitk_reduce_kernel
from ..tuning.matmul import MATMUL_TUNER, matmul_key, matmul_pointer_heuristic, splitk_reduce_config
from ..tuning.rows import epilogue_tile_config
from ._autocast import autocast_inputs
from ._common import check_no_forward_ad, check_same, dot_input_precision, use_reference

ACTIVATIONS = reference.ACTIVATIONS


# --------------------------------------------------------------------------- launchers


def launch_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, store_preact: bool = False,
                  out: torch.Tensor | None = None, config: Config | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """c = activation(a @ b + bias) for a (B, M, K), b (B, K, N), any strides.

    Returns (c, z) with z the pre-activation when `store_preact`, else None.
    `out`, if given, is a (B, M, N) buffer of any strides to write c into.
    `config` overrides the tuner's choice (benchmarks, tuning). Its host parameters pick the
    kernel: TMA (the persistent descriptor kernel, where `tma_layout` accepts the operands;
    otherwise the pointer kernel with the key's pointer default), SPLIT_K (the pointer kernel
    with K split over that many programs per tile, then a reduction).
    """
    B, M, K = a.shape
    N = b.shape[2]
    c = out if out is not None else runtime.new_output((B, M, N), a.dtype, a.device)
    z = runtime.new_output((B, M, N), a.dtype, a.device) if store_preact else None
    if c.numel() == 0:
        return c, z
    key = matmul_key(a, b, bias is not None or activation is not None) if config is None else None
    cfg = config or MATMUL_TUNER.select(key)
    epilogue = dict(HAS_BIAS=bias is not None, ACTIVATION=activation or "none", STORE_PREACT=store_preact,
                    INPUT_PRECISION=dot_input_precision(a.dtype))
    zz = z if z is not None else c
    bias_arg, bias_stride = (bias, bias.stride(0)) if bias is not None else (c, 0)
    tma = cfg.get("TMA", False)
    layout = tma_layout(a, b, c, z) if tma else None
    if tma and layout is None:
        cfg = matmul_pointer_heuristic(key or matmul_key(a, b, bias is not None or activation is not None))
    if layout is not None:
        (a_kmajor, stride_a), (b_kmajor, stride_b) = layout
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        runtime.ensure_descriptor_allocator(a.device)
        _matmul_tma_kernel[(min(tiles, runtime.sm_count(a.device)),)](
            a, b, c, zz, bias_arg, M, N, K, stride_a, stride_b, c.stride(1), bias_stride,
            A_KMAJOR=a_kmajor, B_KMAJOR=b_kmajor, EPILOGUE_SUBTILE=cfg.get("EPILOGUE_SUBTILE", False),
            **epilogue, **cfg.launch_kwargs())
        return c, z
    meta = cfg.meta
    tiles = B * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    # The key has no batch: where the batch's tiles alone fill the GPU twice over, split K
    # would only add the workspace's traffic and a second kernel.
    split_k = cfg.get("SPLIT_K", 1) if tiles < 2 * runtime.sm_count(a.device) else 1
    grid = (split_k * tiles,)
    even_k = K % meta["BLOCK_K"] == 0
    if split_k == 1:
        _matmul_fwd_kernel[grid](
            a, b, c, zz, bias_arg, M, N, K, *a.stride(), *b.stride(), *c.stride(), bias_stride,
            EVEN_K=even_k, **epilogue, **cfg.launch_kwargs())
        return c, z
    # Split K: partial sums into a workspace, then their sum in a fixed order, which applies
    # the epilogue (deterministic, no atomics).
    work = runtime.new_output((split_k, B, M, N), torch.float64 if a.dtype == torch.float64 else torch.float32,
                              a.device)
    _matmul_fwd_kernel[grid](
        a, b, work, work, work, M, N, K, *a.stride(), *b.stride(), *c.stride(), 0,
        EVEN_K=even_k, HAS_BIAS=False, ACTIVATION="none", STORE_PREACT=False,
        INPUT_PRECISION=epilogue["INPUT_PRECISION"], SPLIT_K=split_k, **cfg.launch_kwargs())
    rc = splitk_reduce_config(M)
    _splitk_reduce_kernel[(B * triton.cdiv(M, rc["BLOCK_M"]) * triton.cdiv(N, rc["BLOCK_N"]),)](
        work, c, zz, bias_arg, M, N, *c.stride(), bias_stride, SPLIT_K=split_k,
        HAS_BIAS=epilogue["HAS_BIAS"], ACTIVATION=epilogue["ACTIVATION"], STORE_PREACT=store_preact,
        **rc.launch_kwargs())
    return c, z


def _descriptor_layout(t: torch.Tensor) -> tuple[bool, int] | None:
    """(whether t (rows, cols) has the unit stride on cols, its other stride) for a 2-D
    descriptor, or None: a unit stride on one dim, the other stride 16-byte aligned. The cols
    layout is tried first (a dim of size 1 has either)."""
    rows, cols = t.shape
    itemsize = t.element_size()
    layouts = [(True, t.stride(1) == 1 or cols == 1, t.stride(0)), (False, t.stride(0) == 1 or rows == 1, t.stride(1))]
    for major, unit, other in layouts:
        if unit and other > 0 and other * itemsize % runtime.TMA_ALIGN == 0:
            return major, other
    return None


def tma_layout(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: torch.Tensor | None
               ) -> tuple[tuple[bool, int], tuple[bool, int]] | None:
    """How the descriptor kernel reads a (1, M, K) and b (1, K, N) and writes c (and z):
    ((A K-major, its other stride), (B K-major, its other stride)), or None where it cannot
    (a GPU without TMA, more than one batch, not fp16 / bf16, K = 0, or a layout TMA refuses: c and z need a unit
    column stride, every base address and other stride 16-byte alignment). The pointer kernel
    takes those."""
    if a.shape[0] != 1 or a.dtype not in runtime.TMA_DTYPES or a.shape[2] == 0:  # K = 0: no descriptor of a 0-wide dim
        return None
    if not runtime.supports_tma(a.device):
        return None
    if any(t.data_ptr() % runtime.TMA_ALIGN for t in (a, b, c) + ((z,) if z is not None else ())):
        return None
    if z is not None and z.stride() != c.stride():
        return None
    out = _descriptor_layout(c[0])
    la, lb = _descriptor_layout(a[0]), _descriptor_layout(b[0].t())
    if out is None or not out[0] or la is None or lb is None:
        return None
    return la, lb


def launch_epilogue_bwd(dy: torch.Tensor, z: torch.Tensor | None, activation: str | None,
                        bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From dy (R, N): dz = dy * activation'(z), and the bias gradient sum_r dz (if asked).

    Without an activation dz is dy itself. The bias gradient is reduced in two
    stages (per-program column sums, then their sum), so it is deterministic.
    """
    R, N = dy.shape
    dz = runtime.new_output((R, N), dy.dtype, dy.device) if activation else dy
    if not activation and not bias_grad:
        return dz, None
    cfg = epilogue_tile_config(R, N)
    parts = torch.zeros((triton.cdiv(R, cfg["BLOCK_R"]), N), dtype=torch.float64 if dy.dtype == torch.float64
                        else torch.float32, device=dy.device)
    if dy.numel():
        zz = z if z is not None else dy
        grid = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _epilogue_bwd_kernel[grid](
            dy, zz, dz, parts, R, N,
            *dy.stride(), *zz.stride(), *dz.stride(),
            ACTIVATION=activation or "none", HAS_BIAS=bias_grad, **cfg.launch_kwargs(),
        )
    dbias = parts.sum(0).to(dy.dtype) if bias_grad else None
    return dz, dbias


# --------------------------------------------------------------------------- torch.library ops
# The ops take real tensors and launch kernels; their fake implementations give
# torch.compile the output shapes, and their autograd formulas call the backward
# ops, so a compiled graph holds our kernels, forward and backward, unbroken.


def _as_batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(*batch_dims, r, c) -> (batch, r, c), a view where the strides allow one."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    try:
        return t.view(batch, *t.shape[-2:])
    except RuntimeError:  # broadcast dims that no single stride describes: copy
        return t.reshape(batch, *t.shape[-2:])


def _foldable(a: torch.Tensor) -> bool:
    """Whether (*batch, M, K) views as (batch * M, K) without a copy."""
    stride = a.stride(-2)
    size = a.shape[-2]
    for d in range(a.dim() - 3, -1, -1):
        if a.shape[d] != 1 and a.stride(d) != stride * size:
            return False
        if a.shape[d] != 1:
            stride, size = a.stride(d), a.shape[d]
    return True


def _matmul_shape(input: torch.Tensor, other: torch.Tensor) -> list:
    batch = torch.broadcast_shapes(input.shape[:-2] if input.dim() > 1 else (),
                                   other.shape[:-2] if other.dim() > 1 else ())
    rows = [input.shape[-2]] if input.dim() > 1 else []
    cols = [other.shape[-1]] if other.dim() > 1 else []
    return [*batch, *rows, *cols]


def _matmul_impl(input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a = input.unsqueeze(0) if input.dim() == 1 else input
    b = other.unsqueeze(-1) if other.dim() == 1 else other
    (M, K), N = a.shape[-2:], b.shape[-1]
    batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if b.dim() == 2 and a.dim() > 2 and _foldable(a):
        # b is shared by every batch: fold a's batch into M, one problem instead of many
        # (sizes spelled out: -1 cannot be inferred when K is 0)
        c, _ = launch_matmul(a.reshape(1, math.prod(a.shape[:-1]), K), b.unsqueeze(0))
    else:
        nbatch = batch_shape.numel()
        c, _ = launch_matmul(_as_batched(a.expand(*batch_shape, M, K), nbatch),
                             _as_batched(b.expand(*batch_shape, K, N), nbatch))
    return c.view(_matmul_shape(input, other))


@torch.library.custom_op("tritonops::matmul", mutates_args=())
def matmul_op(input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """torch.matmul on our kernels (validated inputs)."""
    return _matmul_impl(input, other)


@matmul_op.register_fake
def _(input, other):
    return input.new_empty(_matmul_shape(input, other))


@torch.library.custom_op("tritonops::matmul_backward", mutates_args=())
def matmul_backward_op(grad: torch.Tensor, input: torch.Tensor, other: torch.Tensor,
                       need_input: bool, need_other: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d other) of matmul; an empty tensor for a gradient not asked for."""
    a = input.unsqueeze(0) if input.dim() == 1 else input
    b = other.unsqueeze(-1) if other.dim() == 1 else other
    (M, K), N = a.shape[-2:], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    g = grad.reshape(*batch, M, N)
    d_input, d_other = grad.new_empty(0), grad.new_empty(0)  # distinct: op outputs may not alias
    if need_input:  # dA = dC @ B^T, B^T read through its strides; broadcast dims summed
        d_input = _matmul_impl(g, b.mT).sum_to_size(a.shape).reshape(input.shape)
    if need_other:  # dB = A^T @ dC
        if b.dim() == 2 and a.dim() > 2:  # one problem with the batch folded into the reduction
            rows = math.prod(a.shape[:-1])  # not -1: K or N may be 0
            d_other = _matmul_impl(a.reshape(rows, K).mT, g.reshape(rows, N))
        else:
            d_other = _matmul_impl(a.mT, g).sum_to_size(b.shape)
        d_other = d_other.reshape(other.shape)
    return d_input, d_other


@matmul_backward_op.register_fake
def _(grad, input, other, need_input, need_other):
    return (input.new_empty(input.shape if need_input else [0]),
            other.new_empty(other.shape if need_other else [0]))


def _matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_grad(ctx, grad):
    input, other = ctx.saved_tensors
    need_input, need_other = ctx.needs_input_grad
    d_input, d_other = matmul_backward_op(grad, input, other, need_input, need_other)
    return (d_input if need_input else None), (d_other if need_other else None)


matmul_op.register_autograd(_matmul_grad, setup_context=_matmul_setup)


def _linear_shape(input: torch.Tensor, weight: torch.Tensor) -> list:
    return [*input.shape[:-1], weight.shape[0]] if weight.dim() == 2 else list(input.shape[:-1])


@torch.library.custom_op("tritonops::linear", mutates_args=())
def linear_op(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
              save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation(input @ weight^T + bias), the pre-activation if `save_preact` else empty)."""
    w = weight if weight.dim() == 2 else weight.unsqueeze(0)
    N, K = w.shape
    x2 = input.reshape(math.prod(input.shape[:-1]), K)
    b = bias.reshape(N) if bias is not None else None
    c, z = launch_matmul(x2.unsqueeze(0), w.t().unsqueeze(0), b, activation, store_preact=save_preact)
    shape = _linear_shape(input, weight)
    return c.view(shape), (z.view(shape) if z is not None else input.new_empty(0))


@linear_op.register_fake
def _(input, weight, bias, activation, save_preact):
    shape = _linear_shape(input, weight)
    return input.new_empty(shape), input.new_empty(shape if save_preact else [0])


@torch.library.custom_op("tritonops::linear_backward", mutates_args=())
def linear_backward_op(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
                       activation: str | None, need_input: bool, need_weight: bool, need_bias: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d input, d weight, d bias) of linear; an empty tensor for a gradient not asked for."""
    w = weight if weight.dim() == 2 else weight.unsqueeze(0)
    N, K = w.shape
    R = math.prod(input.shape[:-1])
    dz, d_bias = launch_epilogue_bwd(grad.reshape(R, N), preact.reshape(R, N) if activation else None,
                                     activation, need_bias)
    d_input, d_weight = grad.new_empty(0), grad.new_empty(0)  # distinct: op outputs may not alias
    if need_input:  # dX = dZ @ W
        d_input = launch_matmul(dz.unsqueeze(0), w.unsqueeze(0))[0].view(input.shape)
    if need_weight:  # dW = dZ^T @ X, both read through their strides
        x2 = input.reshape(R, K)
        d_weight = launch_matmul(dz.t().unsqueeze(0), x2.unsqueeze(0))[0].view(weight.shape)
    return d_input, d_weight, (d_bias if need_bias else grad.new_empty(0))


@linear_backward_op.register_fake
def _(grad, input, weight, preact, activation, need_input, need_weight, need_bias):
    N = weight.shape[0] if weight.dim() == 2 else 1
    return (input.new_empty(input.shape if need_input else [0]),
            weight.new_empty(weight.shape if need_weight else [0]),
            weight.new_empty([N] if need_bias else [0]))


def _linear_setup(ctx, inputs, output):
    input, weight, bias, activation, _ = inputs
    ctx.save_for_backward(input, weight, output[1])
    ctx.activation = activation
    ctx.bias_shape = bias.shape if bias is not None else None


def _linear_grad(ctx, grad, _grad_preact):
    input, weight, preact = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_input, d_weight, d_bias = linear_backward_op(grad, input, weight, preact, ctx.activation,
                                                   need_input, need_weight, need_bias)
    return (d_input if need_input else None, d_weight if need_weight else None,
            d_bias.reshape(ctx.bias_shape) if need_bias else None, None, None)


linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


# --------------------------------------------------------------------------- public ops


def matmul(input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """torch.matmul on Triton kernels: vectors, matrices and broadcast batches, any strides.
    Under torch.autocast it runs in the autocast dtype, as torch's does."""
    input, other = autocast_inputs("matmul", input, other)
    check_no_forward_ad("matmul", (input, other))
    dtype, device = check_same("matmul", {"input": input, "other": other})
    if input.dim() == 0 or other.dim() == 0:
        raise RuntimeError(
            f"both arguments to matmul need to be at least 1D, but they are {input.dim()}D and {other.dim()}D")
    M, K = (input.shape[-2] if input.dim() > 1 else 1), input.shape[-1]
    K2, N = (other.shape[-2], other.shape[-1]) if other.dim() > 1 else (other.shape[0], 1)
    if K != K2:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({M}x{K} and {K2}x{N})")
    torch.broadcast_shapes(input.shape[:-2], other.shape[:-2])  # raises for batch dims that do not broadcast
    if use_reference("matmul", device):
        return reference.matmul(input, other)
    return matmul_op(input, other)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """F.linear on a Triton kernel, with `activation` (None, "relu", "gelu", "gelu_tanh",
    "silu") and the bias applied in the matmul's epilogue: one kernel, one pass. Under
    torch.autocast it runs in the autocast dtype, as torch's does."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"tritonops.linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    input, weight, bias = autocast_inputs("linear", input, weight, bias)
    check_no_forward_ad("linear", (input, weight, bias))
    dtype, device = check_same("linear", {"input": input, "weight": weight, "bias": bias})
    if input.dim() == 0:
        raise RuntimeError("tritonops.linear: input must be at least 1-D")
    if weight.dim() not in (1, 2):
        raise RuntimeError(f"tritonops.linear: weight must be 1-D or 2-D, got {weight.dim()}-D")
    N, K = weight.shape if weight.dim() == 2 else (1, weight.shape[0])
    if input.shape[-1] != K:
        rows = input.numel() // max(input.shape[-1], 1) if input.dim() > 1 else 1
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and {K}x{N})")
    if bias is not None and weight.dim() == 1:
        # torch takes only a 0-D bias with a vector weight, and not for a 2-D input, which it sends
        # to addmm (that refuses a 1-D weight); other ranks add the bias after a matmul.
        if input.dim() == 2 or bias.dim() != 0:
            raise RuntimeError(f"tritonops.linear: a 1-D weight takes a 0-D bias and an input not 2-D "
                               f"(mat2 must be a matrix), got input {tuple(input.shape)} and bias {tuple(bias.shape)}")
    elif bias is not None and tuple(bias.shape) != (N,):
        raise RuntimeError(f"tritonops.linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if use_reference("linear", device):
        return reference.linear(input, weight, bias, activation)
    save_preact = activation is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    return linear_op(input, weight, bias, activation, save_preact)[0]
