"""softmax and log_softmax (one kernel, flag LOG), forward and backward.

Layout: the input is read as a strided (outer, N, inner) tensor reduced over N.
A "row" is one (outer, inner) position, numbered r = o * inner + i; a program
owns BLOCK_R rows and sweeps N in one tile (ONE_PASS, N <= BLOCK_N) or in
BLOCK_N chunks. For the common last-dim case inner == 1 (Triton specialises
an argument equal to 1, so the `// inner` folds away) and the tile is
BLOCK_R whole rows; for dim != -1 the rows are neighbouring inner positions,
contiguous in memory, so the loads stay coalesced without a transpose copy.
"""

import triton
import triton.language as tl

from .common import acc_type, cast_to


@triton.jit
def _row_offsets(pid, n_rows, inner, stride_o, stride_i, BLOCK_R: tl.constexpr):
    """Offsets (int64) of the first element of this program's BLOCK_R rows, and their mask.

    Rows past the end wrap around to real ones (as matmul does), so they compute on real
    data instead of an all -inf row's NaNs; only the stores are masked by row.
    """
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    real = rows % n_rows
    return (real // inner) * stride_o + (real % inner) * stride_i, rows < n_rows


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # (outer, N, inner) through the x strides
    y_ptr,  # (outer, N, inner) through the y strides; may have another dtype than x
    n_rows, N, inner,  # n_rows = outer * inner
    stride_xo, stride_xn, stride_xi,
    stride_yo, stride_yn, stride_yi,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: the whole row is one tile
    LOG: tl.constexpr,  # log_softmax instead of softmax
):
    acc_ty = acc_type(y_ptr.dtype.element_ty)  # float32, or float64 for float64 outputs
    pid = tl.program_id(0)
    x_row, row_mask = _row_offsets(pid, n_rows, inner, stride_xo, stride_xi, BLOCK_R)
    y_row, _ = _row_offsets(pid, n_rows, inner, stride_yo, stride_yi, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < N)
        c = cols[None, :].to(tl.int64)
        x = tl.load(x_ptr + x_row[:, None] + c * stride_xn, mask=c < N, other=float("-inf")).to(acc_ty)
        # As torch: x - max is NaN on rows of all -inf or holding +inf / NaN, and so is the result.
        z = x - tl.max(x, axis=1)[:, None]
        e = tl.exp(z)
        s = tl.sum(e, axis=1)
        if LOG:
            y = z - tl.log(s)[:, None]
        else:
            y = e * (1.0 / s)[:, None]
        tl.store(y_ptr + y_row[:, None] + c * stride_yn, cast_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        # Online softmax: one pass for the running max m and the sum s of exp(x - m), one to write.
        m = tl.full((BLOCK_R,), float("-inf"), acc_ty)
        s = tl.zeros((BLOCK_R,), acc_ty)
        for start in tl.range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols[None, :] < N)
            c = (start + cols[None, :]).to(tl.int64)
            x = tl.load(x_ptr + x_row[:, None] + c * stride_xn, mask=c < N, other=float("-inf")).to(acc_ty)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            # While a row has seen only -inf, rescale by 0 instead of exp(-inf - -inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m = m_new
        if LOG:
            log_s = tl.log(s)
        else:
            inv_s = 1.0 / s
        for start in tl.range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols[None, :] < N)
            c = (start + cols[None, :]).to(tl.int64)
            x = tl.load(x_ptr + x_row[:, None] + c * stride_xn, mask=c < N, other=float("-inf")).to(acc_ty)
            if LOG:
                y = (x - m[:, None]) - log_s[:, None]
            else:
                y = tl.exp(x - m[:, None]) * inv_s[:, None]
            tl.store(y_ptr + y_row[:, None] + c * stride_yn, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,  # (outer, N, inner) forward output, through the y strides
    dy_ptr,  # (outer, N, inner) its gradient, through the dy strides
    dx_ptr,  # (outer, N, inner) input gradient, through the dx strides; dtype of the input
    n_rows, N, inner,
    stride_yo, stride_yn, stride_yi,
    stride_dyo, stride_dyn, stride_dyi,
    stride_dxo, stride_dxn, stride_dxi,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr, LOG: tl.constexpr,
):
    """softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy)."""
    acc_ty = acc_type(y_ptr.dtype.element_ty)  # float32, or float64 for a float64 forward output
    pid = tl.program_id(0)
    y_row, row_mask = _row_offsets(pid, n_rows, inner, stride_yo, stride_yi, BLOCK_R)
    dy_row, _ = _row_offsets(pid, n_rows, inner, stride_dyo, stride_dyi, BLOCK_R)
    dx_row, _ = _row_offsets(pid, n_rows, inner, stride_dxo, stride_dxi, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < N)
        c = cols[None, :].to(tl.int64)
        y = tl.load(y_ptr + y_row[:, None] + c * stride_yn, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + dy_row[:, None] + c * stride_dyn, mask=mask, other=0.0).to(acc_ty)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        tl.store(dx_ptr + dx_row[:, None] + c * stride_dxn, cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R,), acc_ty)
        for start in tl.range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols[None, :] < N)
            c = (start + cols[None, :]).to(tl.int64)
            dy = tl.load(dy_ptr + dy_row[:, None] + c * stride_dyn, mask=mask, other=0.0).to(acc_ty)
            if LOG:
                acc += tl.sum(dy, axis=1)
            else:
                y = tl.load(y_ptr + y_row[:, None] + c * stride_yn, mask=mask, other=0.0).to(acc_ty)
                acc += tl.sum(dy * y, axis=1)
        for start in tl.range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols[None, :] < N)
            c = (start + cols[None, :]).to(tl.int64)
            y = tl.load(y_ptr + y_row[:, None] + c * stride_yn, mask=mask, other=0.0).to(acc_ty)
            dy = tl.load(dy_ptr + dy_row[:, None] + c * stride_dyn, mask=mask, other=0.0).to(acc_ty)
            if LOG:
                dx = dy - tl.exp(y) * acc[:, None]
            else:
                dx = y * (dy - acc[:, None])
            tl.store(dx_ptr + dx_row[:, None] + c * stride_dxn, cast_to(dx, dx_ptr.dtype.element_ty),
                     mask=mask)
