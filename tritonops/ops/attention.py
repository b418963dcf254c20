"""attention: fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

A drop-in for torch.nn.functional.scaled_dot_product_attention. Semantics kept from torch
(2.13, checked on its CPU backends):
- causal is top-left aligned: query i attends keys j <= i, also when L != S;
- a row whose keys are all masked (bool mask all False, or additive mask all -inf) gives an
  output of 0 and zero gradients, as torch's math / CPU flash backends do (not NaN);
- dropout_p <= 0 means no dropout, dropout_p > 1 raises, dropout_p == 1 gives zeros;
- the mask is bool (True takes part) or additive float (float32 or the query's dtype),
  broadcast to (..., L, S) and read through stride-0 strides, never expanded in memory;
- an additive mask that requires grad gets its gradient (d loss / d scores);
- zero-size inputs: with no query rows or an empty value (S = 0 included), torch's early
  answer (zeros shaped by the query, see `_nothing_to_attend`); with E = 0 every score is 0,
  so each row averages the values it may attend.

The backward is deterministic: every gradient element is written by one program that sums
its terms in a fixed order (dK/dV of a GQA key head loop over the group's query heads). Its
delta = sum_j p_j dp_j is FlashAttention-2's rowsum(O * dO) by default; with
TRITONOPS_ATTENTION_EXACT_DELTA=1 it is formed from the backward's own p and dp (a first
pass of the dQ kernel over the keys, 2/7 more matmul work in the backward), which keeps the
gradients right where one key takes nearly all of a row's weight: see kernels/attention.py.

The forward runs one of three ways (`attention_fwd_plan`): the regular kernel on tensor
descriptors (TMA on Hopper) for unit-stride head dims with 16-byte aligned rows and heads and
no mask or dropout; the same kernel on pointer loads otherwise; and, for up to
16 query rows without mask or dropout, the split-key kernel (the keys in slices over more
programs, merged by log-sum-exp), whose lse is the regular kernel's, so the backward is
the same for all three.

Configs come from four Tuners (forward, backward dK/dV, backward dQ, backward preprocess)
and, for the split-key forward, a heuristic whose split count fills the GPU;
the op is the custom op tritonops::attention, its backward tritonops::attention_backward,
so torch.compile keeps both in one graph.
"""

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from autotune import Config

from .. import runtime
from ..kernels.attention import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_dropout_mask_kernel,
    _attn_fwd_kernel,
    _attn_fwd_split_kernel,
    _attn_split_merge_kernel,
)
from ..tuning.attention import (ATTENTION_BWD_DKDV_TUNER, ATTENTION_BWD_DQ_TUNER, ATTENTION_BWD_PREPROCESS_TUNER,
                                ATTENTION_TUNER, MAX_HEAD_DIM, SPLIT_MAX_L, attention_dq_key, attention_key,
                                attention_preprocess_key, attention_split_config, attention_split_key,
                                split_count)
from ._autocast import autocast_inputs
from ._common import check_no_forward_ad, check_same, dot_input_precision, padded_dim, use_reference

LOG2E = 1.4426950408889634

EXACT_DELTA_VARIABLE = "TRITONOPS_ATTENTION_EXACT_DELTA"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")


def exact_delta_enabled() -> bool:
    """Whether the backward forms delta from its own p and dp ($TRITONOPS_ATTENTION_EXACT_DELTA,
    read at each backward; off by default: it costs 2/7 more matmul work in the backward)."""
    value = os.environ.get(EXACT_DELTA_VARIABLE, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"{EXACT_DELTA_VARIABLE}={os.environ[EXACT_DELTA_VARIABLE]!r}; expected 1 or 0")


# --------------------------------------------------------------------------- launchers


def _mask_kind(mask: torch.Tensor | None) -> str:
    """The kernels' MASK: "none", "bool" or "add" (an additive float mask)."""
    return "none" if mask is None else "bool" if mask.dtype == torch.bool else "add"


def _mask_args(mask: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, strides, kind) for the kernels; bool masks are read as uint8."""
    kind = _mask_kind(mask)
    if kind == "none":
        return fallback, (0, 0, 0, 0), kind
    return (mask.view(torch.uint8) if kind == "bool" else mask), mask.stride(), kind


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scales(scale: float | None, E: int) -> tuple[float, float]:
    """(qk_scale, sm_scale): scale * log2(e) for the kernels' base-2 scores, and scale itself
    (default 1 / sqrt(E)). With E = 0 every score is an empty sum, 0 whatever the scale, as in
    torch (it scales q and k before their product): qk_scale 0, never 0 * inf; sm_scale only
    scales dq and dk, which are empty then."""
    if E == 0:
        return 0.0, 0.0
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    return scale * LOG2E, scale


def _descriptor_layout(t: torch.Tensor) -> bool:
    """A (Z, heads, n, d) operand a tensor descriptor can read one head of: unit stride along d,
    a 16-byte aligned row stride and base address of every head (data pointer and batch and
    head strides), d and n at least 1."""
    itemsize = t.element_size()
    if t.dtype not in runtime.TMA_DTYPES or min(t.shape[2:]) < 1 or t.stride(3) != 1:
        return False
    if t.stride(2) <= 0 or (t.stride(2) * itemsize) % runtime.TMA_ALIGN:
        return False
    heads = [t.stride(d) for d in (0, 1) if t.shape[d] > 1]
    return t.data_ptr() % runtime.TMA_ALIGN == 0 and all((st * itemsize) % runtime.TMA_ALIGN == 0 for st in heads)


class ForwardPlan(NamedTuple):
    """How `launch_attention_fwd` runs a problem: `kernel` is "split" (split-key forward and
    merge, `splits` key slices), "tma" (the regular forward on tensor descriptors) or "pointer"
    (the regular forward on pointer loads); `config` that kernel's config."""

    kernel: str
    config: Config
    splits: int


def _split_layout(q: torch.Tensor, k: torch.Tensor, causal: bool, config: Config,
                  num_splits: int | None = None) -> tuple[int, int, int, int]:
    """(splits, keys per split, row blocks, attended keys) of the split-key forward: the keys
    [0, attended) (causal: min(S, L), top-left aligned) in slices of whole BLOCK_N blocks,
    at most `num_splits` of them (each slice takes cdiv(blocks, num_splits) blocks, so fewer
    where that divides unevenly) or, if None, as many as `split_count` gives for the config's
    PROGRAMS_PER_SM and the device's SMs."""
    Z, H, L, _ = q.shape
    HK, S = k.shape[1], k.shape[2]
    keys = min(S, L) if causal else S
    row_blocks = triton.cdiv((H // max(HK, 1)) * L, config["BLOCK_M"])
    bn = config["BLOCK_N"]
    if num_splits is None:
        target = config["PROGRAMS_PER_SM"] * runtime.sm_count(q.device)
        splits, split_keys = split_count(keys, bn, Z * HK * row_blocks, target)
    else:
        split_keys = triton.cdiv(triton.cdiv(keys, bn), max(num_splits, 1)) * bn
        splits = triton.cdiv(keys, split_keys)
    return splits, split_keys, row_blocks, keys


def attention_fwd_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       causal: bool = False, dropout_p: float = 0.0, config: Config | None = None) -> ForwardPlan:
    """The kernel and config `launch_attention_fwd` uses for these operands.

    Up to SPLIT_MAX_L query rows, not causal, no mask, no dropout and no `config`: the split-key forward,
    where the keys split into two slices or more (else there is nothing to gain over one
    program per row block). Otherwise the regular forward with `config` (or the tuner's),
    on tensor descriptors where there is no mask and no dropout and q, k, v and the output
    allow them (`_descriptor_layout`, a GPU with TMA), else on pointer loads. (Compiled for
    sm90, dropout's Philox bits on top of descriptor loads spilled registers where the
    pointer loads did not.)
    """
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    # causal rows attend to at most L <= SPLIT_MAX_L keys: one BLOCK_N block, nothing to split
    if config is None and mask is None and not dropout_p > 0 and L <= SPLIT_MAX_L and HK > 0 and not causal:
        split_cfg = attention_split_config(attention_split_key(E, EV, (H // HK) * L, S, q.dtype, causal))
        splits = _split_layout(q, k, causal, split_cfg)[0]
        if splits > 1:
            return ForwardPlan("split", split_cfg, splits)
    cfg = config or ATTENTION_TUNER.select(attention_key(E, EV, L, S, q.dtype, causal, _mask_kind(mask),
                                                         dropout_p > 0))
    # the output is new and contiguous: its rows are aligned where Ev's bytes are
    tma = (mask is None and not dropout_p > 0 and runtime.supports_tma(q.device)
           and all(_descriptor_layout(t) for t in (q, k, v)) and (EV * q.element_size()) % runtime.TMA_ALIGN == 0)
    return ForwardPlan("tma" if tma else "pointer", cfg, 1)


def launch_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(q k^T * scale + mask) @ v and the base-2 log-sum-exp of each row.

    q (Z, H, L, E), k (Z, HK, S, E), v (Z, HK, S, Ev), mask (Z, H, L, S) or None, any strides
    (stride 0 for broadcast dims); H a multiple of HK (query head h reads key head h // (H // HK)).
    Returns o (Z, H, L, Ev) and lse (Z * H, L), float32 (float64 for float64 inputs), in base 2
    (logsumexp / ln 2), +inf for a row with nothing to attend to.
    `config` overrides the tuner's choice of the regular forward's tile (benchmarks, tuning);
    `attention_fwd_plan` says which kernel runs.
    """
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    if Z * H * L == 0:  # no query rows (with Ev = 0 there are: the backward needs their lse)
        return (runtime.new_output((Z, H, L, EV), q.dtype, q.device),
                runtime.new_output((Z * H, L), _lse_dtype(q.dtype), q.device))
    plan = attention_fwd_plan(q, k, v, mask, causal, dropout_p, config)
    if plan.kernel == "split":
        return launch_attention_fwd_split(q, k, v, causal, scale, config=plan.config)
    qk_scale, _ = _scales(scale, E)
    o = runtime.new_output((Z, H, L, EV), q.dtype, q.device)
    lse = runtime.new_output((Z * H, L), _lse_dtype(q.dtype), q.device)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    cfg = plan.config
    tma = plan.kernel == "tma"
    if tma:
        runtime.ensure_descriptor_allocator(q.device)
    grid = (Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)
    _attn_fwd_kernel[grid](
        q, k, v, mask_t, o, lse,
        qk_scale, dropout_p, _dropout_scale(dropout_p), seed,
        H, H // HK, L, S, E, EV,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *o.stride(),
        BLOCK_D=padded_dim(E), BLOCK_DV=padded_dim(EV),
        CAUSAL=causal, MASK=mask_kind, DROPOUT=dropout_p > 0,
        INPUT_PRECISION=dot_input_precision(q.dtype), TMA=tma, **cfg.launch_kwargs(),
    )
    return o, lse


SPLIT_MERGE_BLOCK = 16  # key splits the merge reads per step


def launch_attention_fwd_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                               scale: float | None = None, config: Config | None = None,
                               num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch_attention_fwd` without mask or dropout, on the split-key forward: each program
    takes the query rows of a GQA group (up to BLOCK_M of them) against one slice of the keys
    and writes its partial output and base-2 lse (float32; float64 for float64 inputs); a
    second kernel merges the slices by their lse in a fixed order. Returns (o, lse) as
    `launch_attention_fwd` does. `config` (default: `attention_split_config`) has BLOCK_M,
    BLOCK_N and the host parameter PROGRAMS_PER_SM; `num_splits` caps the split count
    the config's rule gives (`_split_layout`)."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    qk_scale, _ = _scales(scale, E)
    part_dtype = _lse_dtype(q.dtype)
    o = runtime.new_output((Z, H, L, EV), q.dtype, q.device)
    lse = runtime.new_output((Z * H, L), part_dtype, q.device)
    if lse.numel() == 0:
        return o, lse
    cfg = config or attention_split_config(attention_split_key(E, EV, (H // HK) * L, S, q.dtype, causal))
    splits, split_keys, row_blocks, keys = _split_layout(q, k, causal, cfg, num_splits)
    part_o = runtime.new_output((Z * H * L, splits, EV), part_dtype, q.device)
    part_lse = runtime.new_output((Z * H * L, splits), part_dtype, q.device)
    if splits:
        _attn_fwd_split_kernel[(Z * HK * row_blocks * splits,)](
            q, k, v, part_o, part_lse, qk_scale,
            HK, H // HK, L, S, E, EV, keys, split_keys, splits, row_blocks,
            *q.stride(), *k.stride(), *v.stride(),
            BLOCK_D=padded_dim(E), BLOCK_DV=padded_dim(EV), CAUSAL=causal,
            INPUT_PRECISION=dot_input_precision(q.dtype), **cfg.launch_kwargs())
    _attn_split_merge_kernel[(Z * H * L,)](
        part_o, part_lse, o, lse, H, L, EV, splits, *o.stride(),
        BLOCK_S=SPLIT_MERGE_BLOCK, BLOCK_DV=padded_dim(EV), num_warps=4, num_stages=1)
    return o, lse


def launch_attention_bwd_preprocess(o: torch.Tensor, do: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """delta0 = rowsum(o * do), (Z * H, L) in the lse's dtype, for o and do (Z, H, L, Ev), any
    strides: the shift the dQ kernel forms delta around (`launch_attention_bwd_dq`)."""
    Z, H, L, EV = o.shape
    delta = runtime.new_output((Z * H, L), _lse_dtype(o.dtype), o.device)
    if delta.numel() == 0:
        return delta
    cfg = config or ATTENTION_BWD_PREPROCESS_TUNER.select(attention_preprocess_key(EV, L, o.dtype))
    _attn_bwd_preprocess_kernel[(Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
        o, do, delta, H, L, EV, *o.stride(), *do.stride(),
        BLOCK_DV=padded_dim(EV), **cfg.launch_kwargs())
    return delta


def _bwd_launch_args(q, k, v, mask, causal, scale, dropout_p, seed):
    """(mask pointer, mask strides, mask kind, scalar args, constexpr kwargs) the backward kernels share."""
    E, EV = q.shape[3], v.shape[3]
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    scalars = (*_scales(scale, E), dropout_p, _dropout_scale(dropout_p), seed)
    constexprs = dict(BLOCK_D=padded_dim(E), BLOCK_DV=padded_dim(EV), CAUSAL=causal, MASK=mask_kind,
                      DROPOUT=dropout_p > 0, INPUT_PRECISION=dot_input_precision(q.dtype))
    return mask_t, mask_strides, mask_kind, scalars, constexprs


def launch_attention_bwd_dkdv(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor, causal: bool = False,
                              scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                              config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv): one program per BLOCK_N keys of a key head, looping over query rows (and the
    query heads of its GQA group). Shapes as in `launch_attention_fwd`; `delta` as
    `launch_attention_bwd_dq` returns it."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    dk = runtime.new_output(k.shape, k.dtype, k.device)
    dv = runtime.new_output(v.shape, v.dtype, v.device)
    if dk.numel() == 0 and dv.numel() == 0:
        return dk, dv
    mask_t, mask_strides, mask_kind, scalars, constexprs = _bwd_launch_args(q, k, v, mask, causal, scale,
                                                                            dropout_p, seed)
    cfg = config or ATTENTION_BWD_DKDV_TUNER.select(
        attention_key(E, EV, L, S, q.dtype, causal, mask_kind, dropout_p > 0))
    _attn_bwd_dkdv_kernel[(Z * HK * triton.cdiv(S, cfg["BLOCK_N"]),)](
        q, k, v, mask_t, do, lse, delta, dk, dv, *scalars,
        H, HK, H // HK, L, S, E, EV,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride(), *dk.stride(), *dv.stride(),
        **constexprs, **cfg.launch_kwargs())
    return dk, dv


def launch_attention_bwd_dq(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None, lse: torch.Tensor, delta0: torch.Tensor, causal: bool = False,
                            scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                            mask_grad: bool = False, config: Config | None = None, need_dq: bool = True,
                            exact_delta: bool | None = None,
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(dq, dmask, delta): one program per BLOCK_M query rows, looping over keys.

    With `exact_delta` (None: `exact_delta_enabled()`), a first pass forms delta = sum_j p_j dp_j / sum_j p_j (Z * H, L)
    around `delta0` (the preprocess's rowsum(o * do)), for the dK/dV kernel; else delta is
    `delta0`. The second pass computes dq (None unless `need_dq` or `mask_grad`) and dmask,
    the additive mask's gradient (Z, H, L, S) unreduced, when `mask_grad` (else None)."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    exact_delta = exact_delta_enabled() if exact_delta is None else exact_delta
    second_pass = need_dq or mask_grad
    dq = runtime.new_output(q.shape, q.dtype, q.device) if second_pass else None
    dmask = runtime.new_output((Z, H, L, S), mask.dtype, q.device) if mask_grad else None
    delta = runtime.new_output((Z * H, L), _lse_dtype(q.dtype), q.device) if exact_delta else delta0
    if delta.numel() == 0 or not (exact_delta or second_pass):  # no query rows, or nothing to compute
        return dq, dmask, delta
    mask_t, mask_strides, mask_kind, scalars, constexprs = _bwd_launch_args(q, k, v, mask, causal, scale,
                                                                            dropout_p, seed)
    cfg = config or ATTENTION_BWD_DQ_TUNER.select(
        attention_dq_key(E, EV, L, S, q.dtype, causal, mask_kind, dropout_p > 0, mask_grad))
    _attn_bwd_dq_kernel[(Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
        q, k, v, mask_t, do, lse, delta0, delta, dq if dq is not None else delta,
        dmask if dmask is not None else delta, *scalars,
        H, H // HK, L, S, E, EV,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride(),
        *(dq.stride() if dq is not None else (0, 0, 0, 0)),
        *(dmask.stride() if dmask is not None else (0, 0, 0, 0)),
        MASK_GRAD=dmask is not None, DQ=second_pass, EXACT_DELTA=exact_delta, **constexprs, **cfg.launch_kwargs())
    return dq, dmask, delta


def launch_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         mask_grad: bool = False, dkdv_config: Config | None = None,
                         dq_config: Config | None = None, need_dq: bool = True, need_dkdv: bool = True,
                         exact_delta: bool | None = None):
    """dq, dk, dv (and the additive mask's gradient, (Z, H, L, S) unreduced, when `mask_grad`)
    from do (Z, H, L, Ev) and the forward's o and lse; shapes as in `launch_attention_fwd`.

    Three launches: delta0 = rowsum(o * do); dQ per query block (skipped unless `need_dq` or
    `mask_grad`: dq None), which with `exact_delta` (None: `exact_delta_enabled()`) first forms the
    delta the dK/dV kernel reads (then it runs for that alone); dK/dV per key block (skipped
    unless `need_dkdv`: dk, dv None).
    """
    exact = exact_delta_enabled() if exact_delta is None else exact_delta
    delta0 = launch_attention_bwd_preprocess(o, do)
    dq, dmask, delta = launch_attention_bwd_dq(do, q, k, v, mask, lse, delta0, causal, scale, dropout_p, seed,
                                               mask_grad=mask_grad, config=dq_config, need_dq=need_dq,
                                               exact_delta=exact)
    dk = dv = None
    if need_dkdv:
        dk, dv = launch_attention_bwd_dkdv(do, q, k, v, mask, lse, delta, causal, scale, dropout_p, seed,
                                           config=dkdv_config)
    return (dq if need_dq else None), dk, dv, dmask


def draw_dropout_seed() -> int:
    """The Philox seed of one attention call, from torch's default (CPU) generator:
    torch.manual_seed makes dropout reproducible. torch.compile traces the draw into the graph."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def dropout_keep_mask(seed: int, batch_heads: int, L: int, S: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The (batch_heads, L, S) bool keep-mask the attention kernels use for `seed`: for tests
    and debugging only (it materialises L x S). batch_heads counts the flattened (Z, H) heads."""
    keep = torch.zeros((batch_heads, L, S), dtype=torch.uint8, device=device)
    if keep.numel():
        grid = (triton.cdiv(L, 32), triton.cdiv(S, 32), batch_heads)
        _attn_dropout_mask_kernel[grid](keep, dropout_p, seed, L, S, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()


# --------------------------------------------------------------------------- torch.library ops
# tritonops::attention takes the caller's (validated) tensors, broadcast batch dims and GQA
# heads included, and returns (out, lse); lse (Z * H, L) is for the backward only. Its
# autograd formula calls tritonops::attention_backward, which sums the gradients of broadcast
# (and repeated GQA) dims back to each input's shape. The dropout seed is an argument, drawn
# by the caller (`attention`), so forward and backward drop the same elements and a given
# seed makes the op deterministic (opcheck, torch.compile).


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(*batch, H, n, d) -> (Z, H, n, d): a view when the leading strides allow, else a copy."""
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def _batch_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> tuple:
    """The broadcast batch dims of the output (with GQA: the outer dims and the query heads)."""
    if enable_gqa:
        outer = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        return (*outer, query.shape[-3])
    return tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))


def _canonical(query, key, value, attn_mask, enable_gqa):
    """q (Z, H, L, E), k (Z, HK, S, E), v (Z, HK, S, Ev), mask (Z, H, L, S) or None as the
    kernels read them (broadcast dims as stride 0, views where strides allow), the batch
    shape, the key/value batch shape, and the GQA repeat of key and value heads (1: none)."""
    L, E = query.shape[-2:]
    S, EV = value.shape[-2:]
    k, v = key, value
    k_rep = v_rep = 1
    if enable_gqa:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv:  # distinct key and value groups: give both one head per query head
            k_rep, v_rep = hq // hk, hq // hv
            k, v = k.repeat_interleave(k_rep, dim=-3), v.repeat_interleave(v_rep, dim=-3)
            hk = hq
        outer = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        batch, kv_batch = (*outer, hq), (*outer, hk)
    else:
        batch = kv_batch = _batch_shape(query, key, value, False)
    q = _as_4d(query.expand(*batch, L, E))
    k, v = _as_4d(k.expand(*kv_batch, S, E)), _as_4d(v.expand(*kv_batch, S, EV))
    mask = _as_4d(attn_mask.expand(*batch, L, S)) if attn_mask is not None else None
    return q, k, v, mask, batch, kv_batch, k_rep, v_rep


def _attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, enable_gqa):
    """The body of tritonops::attention."""
    q, k, v, mask, batch, _, _, _ = _canonical(query, key, value, attn_mask, enable_gqa)
    o, lse = launch_attention_fwd(q, k, v, mask, is_causal, scale, dropout_p, seed)
    return o.view(*batch, *o.shape[-2:]), lse


@torch.library.custom_op("tritonops::attention", mutates_args=())
def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                 dropout_p: float, is_causal: bool, scale: float, seed: int, enable_gqa: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled_dot_product_attention(...), lse (Z * H, L)) on our kernels (validated inputs,
    scale resolved, dropout_p >= 0, `seed` drawn by the caller)."""
    return _attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, enable_gqa)


@attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, enable_gqa):
    batch = _batch_shape(query, key, value, enable_gqa)
    out = query.new_empty((*batch, query.shape[-2], value.shape[-1]))
    return out, query.new_empty((math.prod(batch), query.shape[-2]), dtype=_lse_dtype(query.dtype))


def _sum_to(grad: torch.Tensor, batch: tuple, rep: int, like: torch.Tensor) -> torch.Tensor:
    """A (Z, H, n, d) gradient of the canonical operand summed back to the input `like`:
    over the GQA repeat of its heads (rep > 1), then over its broadcast dims."""
    if rep == 0:  # no query heads (GQA with H = 0): nothing reached key or value
        return grad.new_zeros(like.shape)
    g = grad.view(*batch, *grad.shape[-2:])
    if rep > 1:
        g = g.view(*batch[:-1], batch[-1] // rep, rep, *g.shape[-2:]).sum(-3)
    return g if g.shape == like.shape else g.sum_to_size(like.shape)


def _attention_backward(grad, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, enable_gqa,
                        need_query, need_key, need_value, need_mask):
    """The body of tritonops::attention_backward."""
    q, k, v, mask, batch, kv_batch, k_rep, v_rep = _canonical(query, key, value, attn_mask, enable_gqa)
    dq, dk, dv, dmask = launch_attention_bwd(_as_4d(grad), q, k, v, mask, _as_4d(out), lse, is_causal, scale,
                                             dropout_p, seed, mask_grad=need_mask, need_dq=need_query,
                                             need_dkdv=need_key or need_value)
    empty = grad.new_empty  # a fresh one for each: outputs of a custom op may not alias each other
    return (_sum_to(dq, batch, 1, query) if need_query else empty(0),
            _sum_to(dk, kv_batch, k_rep, key) if need_key else empty(0),
            _sum_to(dv, kv_batch, v_rep, value) if need_value else empty(0),
            _sum_to(dmask, batch, 1, attn_mask) if need_mask else empty(0))


@torch.library.custom_op("tritonops::attention_backward", mutates_args=())
def attention_backward_op(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, dropout_p: float,
                          is_causal: bool, scale: float, seed: int, enable_gqa: bool, need_query: bool,
                          need_key: bool, need_value: bool, need_mask: bool,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d query, d key, d value, d attn_mask) of attention, each in its input's shape; an empty
    tensor for a gradient not asked for (need_mask: an additive mask that requires grad)."""
    return _attention_backward(grad, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
                               enable_gqa, need_query, need_key, need_value, need_mask)


@attention_backward_op.register_fake
def _(grad, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, enable_gqa,
      need_query, need_key, need_value, need_mask):
    empty = grad.new_empty
    return (query.new_empty(query.shape) if need_query else empty(0),
            key.new_empty(key.shape) if need_key else empty(0),
            value.new_empty(value.shape) if need_value else empty(0),
            attn_mask.new_empty(attn_mask.shape) if need_mask else empty(0))


def _attention_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed, enable_gqa = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient stays None: no zeros allocated for it
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)
    ctx.args = (dropout_p, is_causal, scale, seed, enable_gqa)


def _attention_grad(ctx, grad, _grad_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    if grad is None:  # grads are not materialised (see _attention_setup): none reached out
        return None, None, None, None, None, None, None, None, None
    need_query, need_key, need_value, need_mask = ctx.needs_input_grad[:4]
    need_mask = need_mask and attn_mask is not None
    dq, dk, dv, dmask = attention_backward_op(grad, query, key, value, attn_mask, out, lse, *ctx.args,
                                              need_query, need_key, need_value, need_mask)
    return (dq if need_query else None, dk if need_key else None, dv if need_value else None,
            dmask if need_mask else None, None, None, None, None, None)


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


# --------------------------------------------------------------------------- public op


def _nothing_to_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's answer when there are no query rows or value is empty (torch 2.13 returns it
    after the dtype, device and rank checks, before any shape check): zeros of query's shape
    with value's last dim, key's and value's batch dims not broadcast in, plus
    (sum(query) + sum(key) + sum(value)) * 0, so query, key and value get zero gradients, the
    mask none, and a NaN or inf anywhere in them makes every element NaN."""
    zero = (query.sum() + key.sum() + value.sum()) * 0
    return torch.zeros((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device) + zero


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on fused Triton kernels.

    query (..., L, E), key (..., S, E), value (..., S, Ev), leading dims broadcast; with
    enable_gqa, dim -3 holds the heads and key/value may have fewer (dividing query's).
    Head dims up to 256; float16, bfloat16, float32 (float64 under the interpreter). Under
    torch.autocast it runs in the autocast dtype (a float mask cast too), as torch's does.
    """
    query, key, value, attn_mask = autocast_inputs("attention", query, key, value, attn_mask)
    check_no_forward_ad("attention", (query, key, value, attn_mask))
    dtype, device = check_same("attention", {"query": query, "key": key, "value": value})
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if attn_mask is not None:
        if attn_mask.device != device:
            raise RuntimeError(f"tritonops.attention: attn_mask is on {attn_mask.device}, query on {device}")
        if attn_mask.dtype not in (torch.bool, torch.float32, dtype):
            raise RuntimeError(
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
                f"{attn_mask.dtype} and query.dtype: {dtype} instead.")
    if query.shape[-2] == 0 or value.numel() == 0:
        return _nothing_to_attend(query, key, value)
    if attn_mask is not None and is_causal:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if dropout_p > 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    L, E = query.shape[-2:]
    S, EV = value.shape[-2:]
    if key.shape[-1] != E:
        raise RuntimeError(f"tritonops.attention: key's last dim {key.shape[-1]} != query's {E}")
    if key.shape[-2] != S:
        raise RuntimeError(f"tritonops.attention: key has {key.shape[-2]} positions, value {S}")
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexError("tritonops.attention: enable_gqa needs a head dim (-3) on query, key and value")
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hq % hk or hq % hv:  # hk = 0 (hv = 0 returned above): torch 2.13 dies of SIGFPE
            raise RuntimeError("Number of heads in key and value must divide the number of heads in query "
                               f"(query {hq}, key {hk}, value {hv})")
    batch = _batch_shape(query, key, value, enable_gqa)  # raises for batch dims that do not broadcast
    if attn_mask is not None and tuple(torch.broadcast_shapes(attn_mask.shape, (*batch, L, S))) != (*batch, L, S):
        raise RuntimeError(f"tritonops.attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                           f"to {(*batch, L, S)}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(E) if E else 0.0  # E = 0: unused (_scales)
    dropout_p = float(dropout_p) if dropout_p > 0 else 0.0
    if use_reference("attention", device):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if max(E, EV) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"tritonops.attention: head dims up to {MAX_HEAD_DIM} are supported, got E={E}, Ev={EV}")
    seed = draw_dropout_seed() if dropout_p > 0 else 0
    return attention_op(query, key, value, attn_mask, dropout_p, bool(is_causal), scale, seed, bool(enable_gqa))[0]
