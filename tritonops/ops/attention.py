"""attention: fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

A drop-in for torch.nn.functional.scaled_dot_product_attention. Semantics kept from torch
(2.13, checked on its CPU backends):
- causal is top-left aligned: query i attends keys j <= i, also when L != S;
- a row whose keys are all masked (bool mask all False, or additive mask all -inf) gives an
  output of 0 and zero gradients, as torch's math / CPU flash backends do (not NaN);
- dropout_p <= 0 means no dropout, dropout_p > 1 raises, dropout_p == 1 gives zeros;
- the mask is bool (True takes part) or additive float (float32 or the query's dtype),
  broadcast to (..., L, S) and read through stride-0 strides, never expanded in memory;
- an additive mask that requires grad gets its gradient (d loss / d scores).

The backward is deterministic: every gradient element is written by one program that sums
its terms in a fixed order (dK/dV of a GQA key head loop over the group's query heads).
"""

from __future__ import annotations

import functools
import math

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
)
from ._common import acc_dtype, check_same, dot_input_precision, interpreter_upcast, use_reference

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------- config choice
#
# One function per kernel. Keys: the padded head dim (max over E and Ev), causal, dtype,
# and L, S bucketed to powers of two by the caller (blocks only depend on next_pow2(L/S)).
# The numbers are leads for Hopper (Inductor's H100 defaults, the Triton FA2 tutorial),
# to be replaced by tuned winners; the interpreter cannot judge them.

SMEM_BUDGET = 200 * 1024  # bytes, under Hopper's 227 KB per block with room for the compiler's own


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _prune(block: int, n: int) -> int:
    """No block beyond the next power of two of the extent, none under 16 (the smallest tl.dot)."""
    return min(block, max(16, triton.next_power_of_2(max(n, 1))))


def _by_head_dim(head_dim: int, d64, d128, d256):
    """The entry for a (padded) head dim of at most 64, 128 or 256."""
    return d64 if head_dim <= 64 else d128 if head_dim <= 128 else d256


def _narrow(block: int, itemsize: int) -> int:
    """A block tuned for 2-byte types, halved for each doubling of the element size (never under 16)."""
    return max(16, block // max(1, itemsize // 2))


def _fit_smem(block_m: int, block_n: int, head_dim: int, itemsize: int, stages: int) -> int:
    """Halve BLOCK_N until the pipelined K and V tiles plus the Q tile fit shared memory."""
    while block_n > 16 and (stages * 2 * block_n + block_m) * head_dim * itemsize > SMEM_BUDGET:
        block_n //= 2
    return block_n


@functools.lru_cache(maxsize=1024)
def attention_config(head_dim: int, causal: bool, dtype: torch.dtype, L: int, S: int) -> Config:
    """Forward config: BLOCK_M query rows per program, stepping BLOCK_N keys.

    Inductor's H100 bf16 defaults (BM, BN, stages, warps): head dim <= 64 (128, 128, 3, 4),
    <= 128 (128, 64, 3, 8), <= 256 (64, 32, 3, 4). 4-byte types halve BLOCK_N (twice the
    bytes per tile), 8-byte ones (interpreter only) halve it again. BLOCK_N then shrinks
    until 3 stages of K and V fit in shared memory; BLOCK_M and BLOCK_N are pruned to
    next_pow2(L) and next_pow2(S) (at least 16), and a pruned BLOCK_M < 128 uses 4 warps.
    """
    bm, bn, stages, warps = _by_head_dim(head_dim, (128, 128, 3, 4), (128, 64, 3, 8), (64, 32, 3, 4))
    bm, bn = _prune(bm, L), _prune(_narrow(bn, dtype.itemsize), S)
    bn = _fit_smem(bm, bn, head_dim, dtype.itemsize, stages)
    if bm < 128:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=1024)
def attention_bwd_dkdv_config(head_dim: int, causal: bool, dtype: torch.dtype, L: int, S: int) -> Config:
    """dK/dV config: BLOCK_N keys per program (their dK, dV accumulators stay in registers),
    stepping BLOCK_M query rows.

    From the Triton FA2 tutorial on H100 (BLOCK_N1 = 128, BLOCK_M1 = 32): head dim <= 64
    (32, 128, 4 warps, 3 stages), <= 128 (32, 128, 8 warps, 2 stages: the accumulators
    double), <= 256 (16, 64, 8 warps, 2 stages). 4- and 8-byte types halve BLOCK_N for each
    doubling of the element size; blocks pruned to the extents as in `attention_config`.
    """
    bm, bn, warps, stages = _by_head_dim(head_dim, (32, 128, 4, 3), (32, 128, 8, 2), (16, 64, 8, 2))
    bm, bn = _prune(bm, L), _prune(_narrow(bn, dtype.itemsize), S)
    if bn < 64:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=1024)
def attention_bwd_dq_config(head_dim: int, causal: bool, dtype: torch.dtype, L: int, S: int) -> Config:
    """dQ config: BLOCK_M query rows per program (dQ accumulator in registers), stepping BLOCK_N keys.

    The mirror of the dK/dV tiles (Triton FA2 tutorial: BLOCK_M2 = 128, BLOCK_N2 = 32):
    head dim <= 64 (128, 32, 4 warps, 3 stages), <= 128 (128, 32, 8 warps, 2 stages),
    <= 256 (64, 16, 8 warps, 2 stages); 4- and 8-byte types halve BLOCK_M for each doubling;
    blocks pruned to the extents.
    """
    bm, bn, warps, stages = _by_head_dim(head_dim, (128, 32, 4, 3), (128, 32, 8, 2), (64, 16, 8, 2))
    bm, bn = _prune(_narrow(bm, dtype.itemsize), L), _prune(bn, S)
    if bm < 64:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=1024)
def attention_bwd_preprocess_config(head_dim: int, L: int) -> Config:
    """delta = rowsum(O * dO): memory-bound; 64 rows (fewer for a short L, 16 for a wide head)."""
    bm = 16 if head_dim > 128 else 64
    return Config({"BLOCK_M": _prune(bm, L)}, num_warps=4, num_stages=1)


def _head_block(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(d))


def _config_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    head_dim = max(_head_block(q.shape[-1]), _head_block(v.shape[-1]))
    return head_dim, bool(causal), q.dtype, _bucket(q.shape[-2]), _bucket(k.shape[-2])


# --------------------------------------------------------------------------- launchers


def _mask_args(mask: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, strides, kind) for the kernels; bool masks are read as uint8."""
    if mask is None:
        return fallback, (0, 0, 0, 0), "none"
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), "bool"
    return mask, mask.stride(), "add"


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def launch_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(q k^T * scale + mask) @ v and the base-2 log-sum-exp of each row.

    q (Z, H, L, E), k (Z, HK, S, E), v (Z, HK, S, Ev), mask (Z, H, L, S) or None, any strides
    (stride 0 for broadcast dims); H a multiple of HK (query head h reads key head h // (H // HK)).
    Returns o (Z, H, L, Ev) and lse (Z * H, L), float32 (float64 for float64 inputs), in base 2
    (logsumexp / ln 2), +inf for a row with nothing to attend to.
    `config` overrides `attention_config` (e.g. for a benchmark of a given config).
    """
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    o = runtime.new_output((Z, H, L, EV), q.dtype, q.device)
    lse = runtime.new_output((Z * H, L), torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    cfg = config or attention_config(*_config_key(q, k, v, causal))
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    grid = (Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)
    _attn_fwd_kernel[grid](
        q, k, v, mask_t, o, lse,
        scale * LOG2E, dropout_p, _dropout_scale(dropout_p), seed,
        H, H // HK, L, S, E, EV,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *o.stride(),
        BLOCK_D=_head_block(E), BLOCK_DV=_head_block(EV),
        CAUSAL=causal, MASK=mask_kind, DROPOUT=dropout_p > 0,
        ACC_DTYPE=acc_dtype(q.dtype), INPUT_PRECISION=dot_input_precision(q.dtype),
        UPCAST=interpreter_upcast(q.dtype),
        **cfg.launch_kwargs(),
    )
    return o, lse


def launch_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         mask_grad: bool = False, dkdv_config: Config | None = None,
                         dq_config: Config | None = None):
    """dq, dk, dv (and the additive mask's gradient, (Z, H, L, S) unreduced, when `mask_grad`)
    from do (Z, H, L, Ev) and the forward's o and lse; shapes as in `launch_attention_fwd`.

    Three launches: delta = rowsum(o * do); dK/dV per key block; dQ per query block.
    """
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    dq = runtime.new_output(q.shape, q.dtype, q.device)
    dk = runtime.new_output(k.shape, k.dtype, k.device)
    dv = runtime.new_output(v.shape, v.dtype, v.device)
    dmask = runtime.new_output((Z, H, L, S), mask.dtype, q.device) if mask_grad else None
    key = _config_key(q, k, v, causal)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    common = dict(BLOCK_D=_head_block(E), BLOCK_DV=_head_block(EV), CAUSAL=causal, MASK=mask_kind,
                  DROPOUT=dropout_p > 0, ACC_DTYPE=acc_dtype(q.dtype),
                  INPUT_PRECISION=dot_input_precision(q.dtype), UPCAST=interpreter_upcast(q.dtype))
    scalars = (scale * LOG2E, scale, dropout_p, _dropout_scale(dropout_p), seed)

    delta = runtime.new_output((Z * H, L), lse.dtype, q.device)  # rowsum(o * do)
    if delta.numel():
        pcfg = attention_bwd_preprocess_config(_head_block(EV), _bucket(L))
        _attn_bwd_preprocess_kernel[(Z * H * triton.cdiv(L, pcfg["BLOCK_M"]),)](
            o, do, delta, H, L, EV, *o.stride(), *do.stride(),
            BLOCK_DV=_head_block(EV), ACC_DTYPE=acc_dtype(q.dtype), **pcfg.launch_kwargs())
    if dk.numel() or dv.numel():
        cfg = dkdv_config or attention_bwd_dkdv_config(*key)
        _attn_bwd_dkdv_kernel[(Z * HK * triton.cdiv(S, cfg["BLOCK_N"]),)](
            q, k, v, mask_t, do, lse, delta, dk, dv, *scalars,
            H, HK, H // HK, L, S, E, EV,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride(), *dk.stride(), *dv.stride(),
            **common, **cfg.launch_kwargs())
    if dq.numel() or (dmask is not None and dmask.numel()):
        cfg = dq_config or attention_bwd_dq_config(*key)
        dm = dmask if dmask is not None else dq
        _attn_bwd_dq_kernel[(Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
            q, k, v, mask_t, do, lse, delta, dq, dm, *scalars,
            H, H // HK, L, S, E, EV,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride(), *dq.stride(),
            *(dmask.stride() if dmask is not None else (0, 0, 0, 0)),
            MASK_GRAD=dmask is not None, **common, **cfg.launch_kwargs())
    return dq, dk, dv, dmask


def draw_dropout_seed() -> int:
    """The Philox seed of one attention call, from torch's default (CPU) generator:
    torch.manual_seed makes dropout reproducible."""
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


# --------------------------------------------------------------------------- autograd


class AttentionFunction(torch.autograd.Function):
    """Attention on canonical operands: q (Z, H, L, E), k (Z, HK, S, E), v (Z, HK, S, Ev),
    mask (Z, H, L, S) or None; output (Z, H, L, Ev)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, dropout_p):
        seed = draw_dropout_seed() if dropout_p > 0 else 0
        o, lse = launch_attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, mask, o, lse = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = launch_attention_bwd(do, q, k, v, mask, o, lse, ctx.causal, ctx.scale,
                                                 ctx.dropout_p, ctx.seed, mask_grad=mask_grad)
        return dq, dk, dv, dmask, None, None, None


# --------------------------------------------------------------------------- public op


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(*batch, H, n, d) -> (Z, H, n, d): a view when the leading strides allow, else a copy."""
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    try:
        return t.view(-1, *t.shape[-3:])
    except RuntimeError:  # broadcast (stride 0) and real dims that no single stride describes
        return t.reshape(-1, *t.shape[-3:])


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on fused Triton kernels.

    query (..., L, E), key (..., S, E), value (..., S, Ev), leading dims broadcast; with
    enable_gqa, dim -3 holds the heads and key/value may have fewer (dividing query's).
    Head dims up to 256; float16, bfloat16, float32 (float64 under the interpreter).
    """
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
        if is_causal:
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
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError("Number of heads in key and value must divide the number of heads in query "
                               f"(query {hq}, key {hk}, value {hv})")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    dropout_p = float(dropout_p) if dropout_p > 0 else 0.0
    if use_reference("attention", device) or E == 0 or EV == 0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if max(E, EV) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"tritonops.attention: head dims up to {MAX_HEAD_DIM} are supported, got E={E}, Ev={EV}")

    q, k, v = query, key, value
    if enable_gqa:
        if hk != hv:  # distinct key and value groups: give both one head per query head
            k = k.repeat_interleave(hq // hk, dim=-3)
            v = v.repeat_interleave(hq // hv, dim=-3)
            hk = hq
        outer = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        batch = (*outer, hq)
        q = q.expand(*batch, L, E)
        k = k.expand(*outer, hk, S, E)
        v = v.expand(*outer, hk, S, EV)
    else:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = q.expand(*batch, L, E), k.expand(*batch, S, E), v.expand(*batch, S, EV)
    mask = None
    if attn_mask is not None:
        mask = _as_4d(attn_mask.expand(*batch, L, S))
    out = AttentionFunction.apply(_as_4d(q), _as_4d(k), _as_4d(v), mask, bool(is_causal), scale, dropout_p)
    return out.view(*batch, L, EV)
