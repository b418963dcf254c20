"""layer_norm and rms_norm (one forward and one backward kernel, flag RMS).

Rows are the flattened leading dims (M), columns the flattened normalized dims (N).
A program owns BLOCK_R rows; the row is one tile (ONE_PASS, N <= BLOCK_N) or is
swept in BLOCK_N chunks. Statistics are kept in acc_type(x) (fp32, or fp64 for fp64).
"""

import triton
import triton.language as tl

from .common import acc_type, cast_to


@triton.jit
def _rstd(var, eps, eps_lo):
    # eps arrives as two fp32 scalars (eps + eps_lo is exact enough for fp64); an IEEE-rounded sqrt.
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps + eps_lo)
    else:
        return 1.0 / tl.sqrt_rn(var + eps + eps_lo)


@triton.jit
def _norm_fwd_kernel(
    x_ptr,  # (M, N) through its strides
    y_ptr,  # (M, N) through its strides
    w_ptr,  # (N,) read when HAS_WEIGHT
    b_ptr,  # (N,) read when HAS_BIAS
    mean_ptr,  # (M,) acc_type(x), written unless RMS
    rstd_ptr,  # (M,) acc_type(x)
    M, N, eps, eps_lo,
    stride_xm, stride_xn, stride_ym, stride_yn, stride_w, stride_b,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: the whole row is one tile
    RMS: tl.constexpr,  # rms_norm: no mean, no bias
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    acc_ty = acc_type(x_ptr.dtype.element_ty)
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    x_row = x_ptr + rows[:, None] * stride_xm
    y_row = y_ptr + rows[:, None] * stride_ym
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row + cols[None, :] * stride_xn, mask=mask, other=0.0).to(acc_ty)
        if RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(xc * xc, axis=1) / N, eps, eps_lo)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(acc_ty)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0).to(acc_ty)[None, :]
        tl.store(y_row + cols[None, :] * stride_yn, cast_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1, statistics. LayerNorm merges per-chunk (count, mean, M2) with Chan's
        # formula, so a large mean does not cancel the variance as sum(x^2) - N mean^2 would.
        mean = tl.zeros((BLOCK_R,), acc_ty)
        m2 = tl.zeros((BLOCK_R,), acc_ty)
        for start in tl.range(0, N, BLOCK_N):
            col_mask = start + cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_row + (start + cols[None, :]) * stride_xn, mask=mask, other=0.0).to(acc_ty)
            if RMS:
                m2 += tl.sum(x * x, axis=1)
            else:
                n_b = tl.sum(col_mask.to(acc_ty), axis=0)  # columns in this chunk
                n = n_b + start  # columns seen so far, this chunk included
                mean_b = tl.sum(x, axis=1) / n_b
                d = tl.where(mask, x - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / n)
                m2 += tl.sum(d * d, axis=1) + delta * delta * ((n - n_b) * (n_b / n))
        rstd = _rstd(m2 / N, eps, eps_lo)
        # Pass 2, write.
        for start in tl.range(0, N, BLOCK_N):
            col_mask = start + cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_row + (start + cols[None, :]) * stride_xn, mask=mask, other=0.0).to(acc_ty)
            if RMS:
                y = x * rstd[:, None]
            else:
                y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                w = tl.load(w_ptr + (start + cols) * stride_w, mask=col_mask, other=0.0).to(acc_ty)
                y = y * w[None, :]
            if HAS_BIAS:
                b = tl.load(b_ptr + (start + cols) * stride_b, mask=col_mask, other=0.0).to(acc_ty)
                y = y + b[None, :]
            tl.store(y_row + (start + cols[None, :]) * stride_yn, cast_to(y, y_ptr.dtype.element_ty),
                     mask=mask)
    if not RMS:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_chunk(x_ptr, dy_ptr, w_ptr, rows, row_mask, cols, start, N, mean, rstd,
               stride_xm, stride_xn, stride_dym, stride_dyn, stride_w, HAS_WEIGHT: tl.constexpr):
    """Columns start + cols of a block of rows, as both passes of the chunked backward read
    them: (xhat, dy, g = dy * w, the 2-D column offsets, the mask, the column mask), in the
    accumulator type; masked elements load as 0."""
    acc_ty = acc_type(x_ptr.dtype.element_ty)
    col_mask = start + cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    c = start + cols[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + c * stride_xn, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + c * stride_dyn, mask=mask, other=0.0)
    xhat = (x.to(acc_ty) - mean[:, None]) * rstd[:, None]
    dy = dy.to(acc_ty)
    g = dy
    if HAS_WEIGHT:
        g = g * tl.load(w_ptr + (start + cols) * stride_w, mask=col_mask, other=0.0).to(acc_ty)[None, :]
    return xhat, dy, g, c, mask, col_mask


@triton.jit
def _norm_bwd_kernel(
    x_ptr,  # (M, N) forward input, through its strides
    dy_ptr,  # (M, N) gradient of the output, through its strides
    dx_ptr,  # (M, N) gradient of the input, through its strides
    w_ptr,  # (N,) read when HAS_WEIGHT
    mean_ptr,  # (M,) acc_type(x), read unless RMS
    rstd_ptr,  # (M,) acc_type(x)
    dw_part_ptr,  # (num_programs, N) acc_type(x), contiguous: this program's column sums of dy * xhat
    db_part_ptr,  # (num_programs, N) acc_type(x), contiguous: this program's column sums of dy
    M, N,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dxm, stride_dxn, stride_w,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr, RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,  # write dw_part / db_part
):
    """xhat = (x - mean) * rstd (x * rstd for RMS), g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)), the last term absent for RMS.

    Persistent over row blocks: program p takes blocks p, p + P, ...; its weight and
    bias partial sums stay in one row of the part buffers (no atomics: deterministic).
    """
    acc_ty = acc_type(x_ptr.dtype.element_ty)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    part_row = pid.to(tl.int64) * N
    if ONE_PASS:
        col_mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(acc_ty)
        dw = tl.zeros((BLOCK_N,), acc_ty)
        db = tl.zeros((BLOCK_N,), acc_ty)
        for blk in tl.range(pid, tl.cdiv(M, BLOCK_R), num_programs):
            rows = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # blk * BLOCK_R < M + BLOCK_R: no overflow
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
            x = x.to(acc_ty)
            dy = dy.to(acc_ty)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
                xhat = (x - mean[:, None]) * rstd[:, None]
            # Masked elements have dy = 0, so they add nothing to any sum below.
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            if RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxn,
                     cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:
                dw += tl.sum(dy * xhat, axis=0)
            if BIAS_GRAD:
                db += tl.sum(dy, axis=0)
        if WEIGHT_GRAD:
            tl.store(dw_part_ptr + part_row + cols, dw, mask=col_mask)
        if BIAS_GRAD:
            tl.store(db_part_ptr + part_row + cols, db, mask=col_mask)
    else:
        # Chunked rows: pass 1 reduces the two row sums, pass 2 writes dx and adds this
        # block's column sums into the program's own (zero-initialised) part rows.
        for blk in tl.range(pid, tl.cdiv(M, BLOCK_R), num_programs):
            rows = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # blk * BLOCK_R < M + BLOCK_R: no overflow
            row_mask = rows < M
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            if RMS:
                mean = tl.zeros((BLOCK_R,), acc_ty)
            else:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            c1 = tl.zeros((BLOCK_R,), acc_ty)
            c2 = tl.zeros((BLOCK_R,), acc_ty)
            for start in tl.range(0, N, BLOCK_N):
                xhat, dy, g, c, mask, col_mask = _bwd_chunk(
                    x_ptr, dy_ptr, w_ptr, rows, row_mask, cols, start, N, mean, rstd,
                    stride_xm, stride_xn, stride_dym, stride_dyn, stride_w, HAS_WEIGHT)
                c1 += tl.sum(g * xhat, axis=1)
                if not RMS:
                    c2 += tl.sum(g, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            for start in tl.range(0, N, BLOCK_N):
                xhat, dy, g, c, mask, col_mask = _bwd_chunk(
                    x_ptr, dy_ptr, w_ptr, rows, row_mask, cols, start, N, mean, rstd,
                    stride_xm, stride_xn, stride_dym, stride_dyn, stride_w, HAS_WEIGHT)
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(dx_ptr + rows[:, None] * stride_dxm + c * stride_dxn,
                         cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
                if WEIGHT_GRAD:
                    dw_ptrs = dw_part_ptr + part_row + start + cols
                    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=col_mask, other=0.0) + tl.sum(dy * xhat, axis=0),
                             mask=col_mask)
                if BIAS_GRAD:
                    db_ptrs = db_part_ptr + part_row + start + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=col_mask, other=0.0) + tl.sum(dy, axis=0),
                             mask=col_mask)
