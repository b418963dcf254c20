"""Fused scaled-dot-product attention in the FlashAttention-2 manner.

Forward: one pass per query block over the key blocks, online softmax in base 2
(fp32 running max and sum), the log-sum-exp per row saved for backward; the
L x S score matrix exists only one tile at a time, in registers. Q, K and V are read,
and O written, through tensor descriptors (TMA on Hopper) where the layout allows, else
through pointers. Split-key forward, for a few query rows against many keys (decoding):
programs over (the query rows of a GQA group) x (a slice of the keys) write partial
outputs and log-sum-exps, which a second kernel merges in a fixed order.
Backward: a preprocess kernel (delta0 = rowsum(O * dO)), dQ per query block looping over
key blocks, and dK/dV per key block looping over query blocks (and over the query heads of
a GQA group). Every output element is written by exactly one program, in a fixed order: no
atomics, deterministic by construction.

The scores' gradient is ds = p * (dp - delta), delta = sum_j p_j dp_j (= rowsum(O * dO) in
exact arithmetic). FlashAttention-2 (and so the default here, EXACT_DELTA off) takes delta =
rowsum(O * dO). Where one key takes nearly all of a row's weight, dp_j - delta is a
difference of nearly equal numbers, and delta must agree with the p and dp it is subtracted
from to the last bits. rowsum(O * dO) does not: the stored O is rounded to the inputs' type,
its P @ V product took p rounded to that type, and its sums ran in another order; on large
inputs (values of +-9 at head dim 8) that gives 16-bit gradients of the wrong sign and
float32 errors of 10%. With EXACT_DELTA the dQ kernel first loops over the keys once more
to form delta from its own p and dp, as delta0 + sum_j p_j (dp_j - delta0) / sum_j p_j
(delta0 is only the shift that keeps the sum's terms small; dividing by sum_j p_j rather
than 1 keeps delta right when the rounding of the stored lse scales all of a row's p alike),
and writes it for the dK/dV kernel, which then runs after it. The price: Q K^T and dO V^T
twice in the dQ kernel, +2 S (E + Ev) FLOPs per query row (2/7 more matmul work in the
backward), and K and V read once more.

Layouts: q, o, do (Z, H, L, *), k, v (Z, HK, S, *), mask (Z, H, L, S), each read
through its own strides (broadcast dims have stride 0); query head h reads key
head h // G. lse and the deltas are dense (Z * H, L), in base 2 for lse.
"""

import triton
import triton.language as tl

from .common import acc_type, cast_to, upcast

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mma(x, dtype: tl.constexpr):
    """An fp32 tile as a tl.dot operand of the inputs' type (tensor cores on the GPU).

    Under the interpreter a 16-bit `dtype` tile is rounded the way the GPU rounds it,
    then kept in fp32, where the interpreter's arithmetic is right (common.upcast).
    """
    return upcast(cast_to(x, dtype))


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """base[rows, cols] with rows (R, 1) and cols (1, C), zero outside (n_rows, n_cols),
    through common.upcast (fp32 for 16-bit types under the interpreter only)."""
    x = tl.load(base + rows.to(tl.int64) * stride_r + cols.to(tl.int64) * stride_c,
                mask=(rows < n_rows) & (cols < n_cols), other=0.0)
    return upcast(x)


@triton.jit
def _dropout_keep(seed, zh, i, j, L, S, dropout_p):
    """Whether element (i, j) of head-batch zh is kept: Philox (tl.rand) at the unique
    int64 offset (zh * L + i) * S + j; i and j broadcast to the tile's shape."""
    offs = (zh.to(tl.int64) * L + i) * S + j
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _scores(qk, qk_scale, mask_base, i, j, L, S, stride_mm, stride_mn,
            MASK: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr):
    """Base-2 scores qk * scale * log2(e) with the masks applied (-inf where masked).

    i (query) and j (key) indices broadcast to qk's shape, in either orientation.
    MASK: "none", "bool" (True takes part) or "add" (added before the softmax).
    """
    s = qk * qk_scale
    if MASK == "bool":
        keep = tl.load(mask_base + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn,
                       mask=(i < L) & (j < S), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK == "add":
        bias = tl.load(mask_base + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn,
                       mask=(i < L) & (j < S), other=0.0)
        s = s + bias.to(s.dtype) * LOG2E
    if CAUSAL_MASK:
        s = tl.where(j <= i, s, float("-inf"))
    if BOUND_MASK:
        s = tl.where(j < S, s, float("-inf"))
    return s


@triton.jit
def _query_block(L, H, G, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's (head-batch zh, batch z, query head h, key head hk, first row).

    One flat grid axis (no 65535 limit on Z * H), the row blocks of one head adjacent
    so they share K and V in L2; causal programs take the longest rows first."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // num_m
    pid_m = pid % num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    h = zh % H
    return zh, (zh // H).to(tl.int64), h.to(tl.int64), (h // G).to(tl.int64), pid_m * BLOCK_M


@triton.jit
def _key_stages(start_m, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(free, hi): keys [0, free) are full blocks that need no mask (for causal, wholly at or
    below the diagonal: j < start_m + 1 <= i + 1); [free, hi) holds the diagonal blocks and the
    key tail, where the causal and key-bound masks apply. Keys from hi on are never attended."""
    s_full = (S // BLOCK_N) * BLOCK_N
    if CAUSAL:
        free = min(((start_m + 1) // BLOCK_N) * BLOCK_N, s_full)
        hi = min(start_m + BLOCK_M, S)
    else:
        free = s_full
        hi = S
    return free, hi


# --------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, mask_base, offs_m, zh, lo, hi,
                    qk_scale, dropout_p, seed, L, S, E, EV,
                    stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                    DTYPE: tl.constexpr,  # the inputs' element type (p is rounded to it for P @ V)
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,  # the diagonal / key-tail stage
                    MASK: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    TMA: tl.constexpr):
    """Keys [lo, hi) into the running (acc, l_i, m_i) of the query rows offs_m.

    k_src, v_src: tensor descriptors of one key head's (S, E) and (S, EV) when TMA (keys past S
    and columns past E load as zeros), else that head's base pointers, read through the strides."""
    acc_ty = acc.dtype  # acc_type of q's element type, set where the kernel made the accumulator
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            kT = upcast(k_src.load([start_n, 0])).T
        else:
            kT = _load_tile(k_src, offs_d[:, None], offs_n[None, :], stride_kk, stride_kn, E, S)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        s = _scores(qk, qk_scale, mask_base, offs_m[:, None], offs_n[None, :], L, S, stride_mm, stride_mn,
                    MASK, CAUSAL_MASK, BOUND_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every score masked so far keeps m = -inf; subtract 0 there so no inf - inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # the sum above is of the undropped p: dropout acts after the softmax
            p = tl.where(_dropout_keep(seed, zh, offs_m[:, None], offs_n[None, :], L, S, dropout_p), p, 0.0)
        if TMA:
            v = upcast(v_src.load([start_n, 0]))
        else:
            v = _load_tile(v_src, offs_n[:, None], offs_dv[None, :], stride_vn, stride_vk, S, EV)
        acc = tl.dot(_mma(p, DTYPE), v, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """(out, lse) of rows from their running sums: out = acc / l, lse = m + log2(l) (base 2);
    a row with nothing to attend to (every key masked, or none in range) gives out 0, as
    torch does, and lse +inf."""
    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_mass, m_i + tl.log2(l_safe), float("inf"))
    return out, lse


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (Z, H, L, E)
    k_ptr,  # (Z, HK, S, E)
    v_ptr,  # (Z, HK, S, EV)
    mask_ptr,  # (Z, H, L, S) bool (as uint8) or additive; read when MASK != "none"
    o_ptr,  # (Z, H, L, EV) output
    lse_ptr,  # (Z * H, L) output: base-2 log-sum-exp of each row's scores; +inf for a fully masked row
    qk_scale,  # scale * log2(e)
    dropout_p, dropout_scale,  # drop probability and 1 / (1 - p) (0 when p = 1)
    seed,
    H, G, L, S, E, EV,  # G = H // HK, the GQA group size
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_oz, stride_oh, stride_om, stride_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # head dims padded to max(next_pow2, 16)
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # Q, K, V loaded and O stored through tensor descriptors (TMA on Hopper)
):
    """TMA asks of the launcher: unit head-dim strides (stride_qk, stride_kk, stride_vk,
    stride_ok = 1), row strides and the heads' base addresses 16-byte aligned."""
    in_ty = q_ptr.dtype.element_ty
    acc_ty = acc_type(in_ty)
    zh, z, h, hk, start_m = _query_block(L, H, G, BLOCK_M, CAUSAL)
    q_base = q_ptr + z * stride_qz + h * stride_qh
    k_base = k_ptr + z * stride_kz + hk * stride_kh
    v_base = v_ptr + z * stride_vz + hk * stride_vh
    mask_base = mask_ptr + z * stride_mz + h * stride_mh
    o_base = o_ptr + z * stride_oz + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if TMA:
        # One head's rows per descriptor: rows past L or S and columns past E or EV read as
        # zeros and are not written, so no tile reaches into the next head.
        q_desc = tl.make_tensor_descriptor(q_base, shape=[L, E], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, shape=[S, E], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[S, EV], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[L, EV], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, BLOCK_DV])
        q = upcast(q_desc.load([start_m, 0]))
    else:
        k_src = k_base
        v_src = v_base
        q = _load_tile(q_base, offs_m[:, None], offs_d[None, :], stride_qm, stride_qk, L, E)

    m_i = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    l_i = tl.zeros((BLOCK_M,), acc_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), acc_ty)
    free, hi = _key_stages(start_m, S, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, mask_base, offs_m, zh, 0, free,
        qk_scale, dropout_p, seed, L, S, E, EV,
        stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
        in_ty, BLOCK_N, BLOCK_D, BLOCK_DV, False, False, MASK, DROPOUT, INPUT_PRECISION, TMA)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, mask_base, offs_m, zh, free, hi,
        qk_scale, dropout_p, seed, L, S, E, EV,
        stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
        in_ty, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, True, MASK, DROPOUT, INPUT_PRECISION, TMA)

    out, lse = _finish_rows(acc, l_i, m_i)
    if DROPOUT:
        out = out * dropout_scale
    m_ok = offs_m < L
    tl.store(lse_ptr + zh.to(tl.int64) * L + offs_m, lse, mask=m_ok)
    if TMA:
        o_desc.store([start_m, 0], cast_to(out, o_ptr.dtype.element_ty))
    else:
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_ok,
                 cast_to(out, o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < EV))


# --------------------------------------------------------------------------- forward, split over the keys


@triton.jit
def _attn_fwd_split_kernel(
    q_ptr,  # (Z, H, L, E)
    k_ptr,  # (Z, HK, S, E)
    v_ptr,  # (Z, HK, S, EV)
    part_o_ptr,  # (Z * H * L, num_splits, EV) output, contiguous: each split's normalised output
    part_lse_ptr,  # (Z * H * L, num_splits) output: each split's base-2 lse, -inf where it has no weight
    qk_scale,
    HK, G, L, S, E, EV,
    hi,  # keys [0, hi) take part (causal: min(S, L), the keys some query row sees)
    split_keys,  # keys per split, a multiple of BLOCK_N
    num_splits, num_row_blocks,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Short queries against many keys (decoding): one program per (batch, key head, block of
    query rows, slice of keys). The rows are those of every query head of the key head's GQA
    group (row r = g * L + i: head g of the group, query i), so K and V are read once per
    group; the key slices multiply the programs where batch x key heads alone would leave
    most SMs idle. _attn_split_merge_kernel combines the slices."""
    in_ty = q_ptr.dtype.element_ty
    acc_ty = acc_type(in_ty)
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_block = rest % num_row_blocks
    zhk = rest // num_row_blocks
    z = (zhk // HK).to(tl.int64)
    hk = (zhk % HK).to(tl.int64)
    r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < G * L
    i = r % L  # each row's query index: the causal mask compares keys with it
    h = hk * G + r // L
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + z * stride_qz + h[:, None] * stride_qh + i[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :].to(tl.int64) * stride_qk, mask=r_ok[:, None] & (offs_d[None, :] < E), other=0.0)
    q = upcast(q)
    k_base = k_ptr + z * stride_kz + hk * stride_kh
    v_base = v_ptr + z * stride_vz + hk * stride_vh

    lo = split * split_keys
    end = min(lo + split_keys, hi)
    if CAUSAL:
        free = lo  # at most 16 keys (hi <= L): one masked stage
    else:
        free = min(end, (S // BLOCK_N) * BLOCK_N)  # the key tail, in the last split only
    m_i = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    l_i = tl.zeros((BLOCK_M,), acc_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), acc_ty)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, q_ptr, i, 0, lo, free,
        qk_scale, 0.0, 0, L, S, E, EV,
        stride_kn, stride_kk, stride_vn, stride_vk, 0, 0,
        in_ty, BLOCK_N, BLOCK_D, BLOCK_DV, False, False, "none", False, INPUT_PRECISION, False)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, q_ptr, i, 0, free, end,
        qk_scale, 0.0, 0, L, S, E, EV,
        stride_kn, stride_kk, stride_vn, stride_vk, 0, 0,
        in_ty, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, True, "none", False, INPUT_PRECISION, False)

    out, lse = _finish_rows(acc, l_i, m_i)
    # No weight: the merge gives this split none. A NaN sum (a NaN or +inf score) stays NaN, so
    # the merged lse is NaN as the regular forward's is, not the other splits' finite one.
    lse = tl.where(l_i > 0.0, lse, tl.where(l_i == 0.0, float("-inf"), float("nan")))
    row = (z * (HK * G) + h) * L + i  # the row of lse and O: (batch x query head, query)
    part = row * num_splits + split
    tl.store(part_lse_ptr + part, lse, mask=r_ok)
    tl.store(part_o_ptr + part[:, None] * EV + offs_dv[None, :], out,
             mask=r_ok[:, None] & (offs_dv[None, :] < EV))


@triton.jit
def _attn_split_merge_kernel(
    part_o_ptr,  # (Z * H * L, num_splits, EV), contiguous, from _attn_fwd_split_kernel
    part_lse_ptr,  # (Z * H * L, num_splits)
    o_ptr,  # (Z, H, L, EV) output
    lse_ptr,  # (Z * H, L) output, as _attn_fwd_kernel writes it
    H, L, EV, num_splits,
    stride_oz, stride_oh, stride_om, stride_ok,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One query row per program: lse = log2(sum_s 2^lse_s), O = sum_s 2^(lse_s - lse) O_s over
    the splits in a fixed order (deterministic). A row no split gave weight to gets O = 0 and
    lse = +inf, as from _attn_fwd_kernel."""
    acc_ty = acc_type(part_lse_ptr.dtype.element_ty)
    row = tl.program_id(0).to(tl.int64)  # (z * H + h) * L + i
    zh = row // L
    i = row % L
    z = zh // H
    h = zh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_base = part_lse_ptr + row * num_splits
    o_base = part_o_ptr + row * num_splits * EV
    m = tl.full((BLOCK_S,), float("-inf"), acc_ty)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.maximum(m, tl.load(lse_base + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf")))
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros((BLOCK_DV,), acc_ty)
    weight = tl.zeros((BLOCK_S,), acc_ty)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        w = tl.exp2(tl.load(lse_base + s0 + offs_s, mask=s_ok, other=float("-inf")) - m_use)
        o_s = tl.load(o_base + (s0 + offs_s[:, None]) * EV + offs_dv[None, :],
                      mask=s_ok[:, None] & (offs_dv[None, :] < EV), other=0.0)
        acc += tl.sum(w[:, None] * o_s, 0)
        weight += w
    total = tl.sum(weight, 0)
    has_mass = total > 0.0
    safe_total = tl.where(has_mass, total, 1.0)
    out = acc / safe_total
    lse = tl.where(has_mass, m_use + tl.log2(safe_total), float("inf"))
    tl.store(lse_ptr + row, lse)
    tl.store(o_ptr + z * stride_oz + h * stride_oh + i * stride_om + offs_dv * stride_ok,
             cast_to(out, o_ptr.dtype.element_ty), mask=offs_dv < EV)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr,  # (Z, H, L, EV)
    do_ptr,  # (Z, H, L, EV)
    delta_ptr,  # (Z * H, L) output: rowsum(o * do), the dQ kernel's shift for delta
    H, L, EV,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_dz, stride_dh, stride_dm, stride_dk,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    acc_ty = acc_type(o_ptr.dtype.element_ty)
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    z = (zh // H).to(tl.int64)
    h = (zh % H).to(tl.int64)
    o = _load_tile(o_ptr + z * stride_oz + h * stride_oh, offs_m[:, None], offs_dv[None, :],
                   stride_om, stride_ok, L, EV)
    do = _load_tile(do_ptr + z * stride_dz + h * stride_dh, offs_m[:, None], offs_dv[None, :],
                    stride_dm, stride_dk, L, EV)
    delta = tl.sum(o.to(acc_ty) * do.to(acc_ty), 1)
    tl.store(delta_ptr + zh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, offs_n, zh, lo, hi,
                         qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
                         stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         MASKED: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    # Transposed tiles (keys x queries), computed directly as k @ q^T: never a transpose
    # of a dot result (Triton 3.4-3.6 miscompile that on Hopper).
    # Rows past L need no score mask: their lse loads as +inf (p = 0) and their dO as 0.
    # Keys past S need none either: they only touch their own rows of dK and dV, never stored.
    acc_ty = dk.dtype  # acc_type of q's element type, set where the kernel made the accumulator
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q = _load_tile(q_base, offs_m[:, None], offs_d[None, :], stride_qm, stride_qk, L, E)
        do = _load_tile(do_base, offs_m[:, None], offs_dv[None, :], stride_dom, stride_dok, L, EV)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        sT = _scores(qkT, qk_scale, mask_base, offs_m[None, :], offs_n[:, None], L, S, stride_mm, stride_mn,
                     MASK, MASKED, False)
        pT = tl.exp2(sT - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        if DROPOUT:
            keepT = _dropout_keep(seed, zh, offs_m[None, :], offs_n[:, None], L, S, dropout_p)
            pdT = tl.where(keepT, pT * dropout_scale, 0.0)
            dpT = tl.where(keepT, dpT * dropout_scale, 0.0)
        else:
            pdT = pT
        dv = tl.dot(_mma(pdT, q_base.dtype.element_ty), do, dv,
                    input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(_mma(dsT, q_base.dtype.element_ty), q, dk,
                    input_precision=INPUT_PRECISION, out_dtype=acc_ty)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (Z, H, L, E)
    k_ptr,  # (Z, HK, S, E)
    v_ptr,  # (Z, HK, S, EV)
    mask_ptr,  # (Z, H, L, S), read when MASK != "none"
    do_ptr,  # (Z, H, L, EV)
    lse_ptr,  # (Z * H, L) from the forward
    delta_ptr,  # (Z * H, L) from the dQ kernel
    dk_ptr,  # (Z, HK, S, E) output
    dv_ptr,  # (Z, HK, S, EV) output
    qk_scale, sm_scale, dropout_p, dropout_scale, seed,
    H, HK, G, L, S, E, EV,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_doz, stride_doh, stride_dom, stride_dok,
    stride_dkz, stride_dkh, stride_dkn, stride_dkk,
    stride_dvz, stride_dvh, stride_dvn, stride_dvk,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    acc_ty = acc_type(q_ptr.dtype.element_ty)
    num_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    zhk = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    z = (zhk // HK).to(tl.int64)
    hk = (zhk % HK).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptr + z * stride_kz + hk * stride_kh, offs_n[:, None], offs_d[None, :],
                   stride_kn, stride_kk, S, E)
    v = _load_tile(v_ptr + z * stride_vz + hk * stride_vh, offs_n[:, None], offs_dv[None, :],
                   stride_vn, stride_vk, S, EV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), acc_ty)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), acc_ty)
    if CAUSAL:
        # Rows i < start_n see none of these keys; row blocks from `free` on see all of them
        lo = (start_n // BLOCK_M) * BLOCK_M
        free = min(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, L)
    else:
        lo = 0
        free = 0
    # The query heads of this key head's group, one after the other: a fixed order, no atomics.
    for g in range(0, G):
        h = hk * G + g
        zh = z * H + h
        q_base = q_ptr + z * stride_qz + h * stride_qh
        do_base = do_ptr + z * stride_doz + h * stride_doh
        mask_base = mask_ptr + z * stride_mz + h * stride_mh
        lse_base = lse_ptr + zh * L
        delta_base = delta_ptr + zh * L
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, offs_n, zh, lo, free,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
            BLOCK_M, BLOCK_D, BLOCK_DV, CAUSAL, MASK, DROPOUT, INPUT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, offs_n, zh, max(free, lo), L,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_qm, stride_qk, stride_dom, stride_dok, stride_mm, stride_mn,
            BLOCK_M, BLOCK_D, BLOCK_DV, False, MASK, DROPOUT, INPUT_PRECISION)

    dk = dk * sm_scale
    n_ok = offs_n[:, None] < S
    tl.store(dk_ptr + z * stride_dkz + hk * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn
             + offs_d[None, :] * stride_dkk,
             cast_to(dk, dk_ptr.dtype.element_ty), mask=n_ok & (offs_d[None, :] < E))
    tl.store(dv_ptr + z * stride_dvz + hk * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn
             + offs_dv[None, :] * stride_dvk,
             cast_to(dv, dv_ptr.dtype.element_ty), mask=n_ok & (offs_dv[None, :] < EV))


@triton.jit
def _dq_tile(q, do, lse, k_base, v_base, mask_base, offs_m, offs_n, zh,
             qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
             stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
             MASK: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(k, p, dp) for query rows offs_m and keys offs_n: the key tile (BLOCK_N, BLOCK_D), the
    probabilities p = exp2(s - lse) and dp = dO V^T with dropout applied (BLOCK_M, BLOCK_N)."""
    acc_ty = acc_type(k_base.dtype.element_ty)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_base, offs_n[:, None], offs_d[None, :], stride_kn, stride_kk, S, E)
    vT = _load_tile(v_base, offs_dv[:, None], offs_n[None, :], stride_vk, stride_vn, EV, S)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=acc_ty)
    # Keys past S must be masked: exp2(0 - lse) can overflow, and inf * (k = 0) is NaN
    s = _scores(qk, qk_scale, mask_base, offs_m[:, None], offs_n[None, :], L, S, stride_mm, stride_mn,
                MASK, CAUSAL_MASK, BOUND_MASK)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, vT, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
    if DROPOUT:
        keep = _dropout_keep(seed, zh, offs_m[:, None], offs_n[None, :], L, S, dropout_p)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    return k, p, dp


@triton.jit
def _attn_bwd_delta_inner(corr, mass, q, do, lse, delta0, k_base, v_base, mask_base, offs_m, zh, lo, hi,
                          qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
                          stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,  # the diagonal / key-tail stage
                          MASK: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The row sums corr += sum_j p_j (dp_j - delta0) and mass += sum_j p_j over keys [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        _, p, dp = _dq_tile(q, do, lse, k_base, v_base, mask_base, offs_m, offs_n, zh,
                            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
                            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                            BLOCK_D, BLOCK_DV, CAUSAL_MASK, BOUND_MASK, MASK, DROPOUT, INPUT_PRECISION)
        corr += tl.sum(p * (dp - delta0[:, None]), 1)
        mass += tl.sum(p, 1)
    return corr, mass


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, dmask_base, offs_m, zh, lo, hi,
                       qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
                       stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn, stride_dmm, stride_dmn,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,  # the diagonal / key-tail stage
                       MASK: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    acc_ty = dq.dtype  # acc_type of q's element type, set where the kernel made the accumulator
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, p, dp = _dq_tile(q, do, lse, k_base, v_base, mask_base, offs_m, offs_n, zh,
                            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
                            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
                            BLOCK_D, BLOCK_DV, CAUSAL_MASK, BOUND_MASK, MASK, DROPOUT, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # d loss / d additive mask = ds
            tl.store(dmask_base + offs_m[:, None].to(tl.int64) * stride_dmm + offs_n[None, :].to(tl.int64) * stride_dmn,
                     cast_to(ds, dmask_base.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
        dq = tl.dot(_mma(ds, k_base.dtype.element_ty), k, dq,
                    input_precision=INPUT_PRECISION, out_dtype=acc_ty)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (Z, H, L, E)
    k_ptr,  # (Z, HK, S, E)
    v_ptr,  # (Z, HK, S, EV)
    mask_ptr,  # (Z, H, L, S), read when MASK != "none"
    do_ptr,  # (Z, H, L, EV)
    lse_ptr,  # (Z * H, L)
    delta0_ptr,  # (Z * H, L) from the preprocess kernel: rowsum(O * dO)
    delta_ptr,  # (Z * H, L) output when EXACT_DELTA: delta from this kernel's p and dp, for dK/dV
    dq_ptr,  # (Z, H, L, E) output when DQ
    dmask_ptr,  # (Z, H, L, S) output when MASK_GRAD: the additive mask's gradient, unreduced
    qk_scale, sm_scale, dropout_p, dropout_scale, seed,
    H, G, L, S, E, EV,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_doz, stride_doh, stride_dom, stride_dok,
    stride_dqz, stride_dqh, stride_dqm, stride_dqk,
    stride_dmz, stride_dmh, stride_dmm, stride_dmn,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    DQ: tl.constexpr,  # the second pass (dQ, and the mask's gradient); else delta only
    EXACT_DELTA: tl.constexpr,  # the first pass: delta from this kernel's p and dp; else delta = delta0
    INPUT_PRECISION: tl.constexpr,
):
    acc_ty = acc_type(q_ptr.dtype.element_ty)
    zh, z, h, hk, start_m = _query_block(L, H, G, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    q = _load_tile(q_ptr + z * stride_qz + h * stride_qh, offs_m[:, None], offs_d[None, :],
                   stride_qm, stride_qk, L, E)
    do = _load_tile(do_ptr + z * stride_doz + h * stride_doh, offs_m[:, None], offs_dv[None, :],
                    stride_dom, stride_dok, L, EV)
    lse = tl.load(lse_ptr + zh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("inf"))
    delta0 = tl.load(delta0_ptr + zh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + z * stride_kz + hk * stride_kh
    v_base = v_ptr + z * stride_vz + hk * stride_vh
    mask_base = mask_ptr + z * stride_mz + h * stride_mh
    free, hi = _key_stages(start_m, S, BLOCK_M, BLOCK_N, CAUSAL)

    if EXACT_DELTA:
        # First pass: delta from the p and dp the gradients are made of (see the module's doc).
        # A row with nothing to attend to has mass 0 (p = 0 everywhere) and keeps delta0.
        corr = tl.zeros((BLOCK_M,), acc_ty)
        mass = tl.zeros((BLOCK_M,), acc_ty)
        corr, mass = _attn_bwd_delta_inner(
            corr, mass, q, do, lse, delta0, k_base, v_base, mask_base, offs_m, zh, 0, free,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
            BLOCK_N, BLOCK_D, BLOCK_DV, False, False, MASK, DROPOUT, INPUT_PRECISION)
        corr, mass = _attn_bwd_delta_inner(
            corr, mass, q, do, lse, delta0, k_base, v_base, mask_base, offs_m, zh, free, hi,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn,
            BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, True, MASK, DROPOUT, INPUT_PRECISION)
        has_mass = mass > 0.0
        delta = delta0 + tl.where(has_mass, corr / tl.where(has_mass, mass, 1.0), 0.0)
        tl.store(delta_ptr + zh.to(tl.int64) * L + offs_m, delta, mask=m_ok)
    else:  # FlashAttention-2's delta: rowsum(O * dO) from the stored output
        delta = delta0

    if DQ:
        dmask_base = dmask_ptr + z * stride_dmz + h * stride_dmh
        dq = tl.zeros((BLOCK_M, BLOCK_D), acc_ty)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, mask_base, dmask_base, offs_m, zh, 0, free,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn, stride_dmm, stride_dmn,
            BLOCK_N, BLOCK_D, BLOCK_DV, False, False, MASK, DROPOUT, MASK_GRAD, INPUT_PRECISION)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, mask_base, dmask_base, offs_m, zh, free, hi,
            qk_scale, dropout_p, dropout_scale, seed, L, S, E, EV,
            stride_kn, stride_kk, stride_vn, stride_vk, stride_mm, stride_mn, stride_dmm, stride_dmn,
            BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, True, MASK, DROPOUT, MASK_GRAD, INPUT_PRECISION)
        dq = dq * sm_scale
        tl.store(dq_ptr + z * stride_dqz + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
                 + offs_d[None, :] * stride_dqk,
                 cast_to(dq, dq_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < E))


# --------------------------------------------------------------------------- dropout mask, for tests


@triton.jit
def _attn_dropout_mask_kernel(
    keep_ptr,  # (ZH, L, S) uint8 output: 1 where the attention kernels keep an element
    dropout_p, seed, L, S,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, zh, offs_m[:, None], offs_n[None, :], L, S, dropout_p)
    tl.store(keep_ptr + (zh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
