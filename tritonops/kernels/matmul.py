"""Matmul with a fused bias + activation epilogue, and the activation's backward."""

import triton
import triton.language as tl

from .common import acc_type, cast_to, tanh, upcast

# constexpr: jit code may not read plain float globals (Triton 3.6); kept as right-hand operands,
# which the interpreter needs
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_COEF = tl.constexpr(0.044715)
# Past |z| = 1e10, tanh's derivative is exactly 0 in fp32 and fp64 alike, so any cap above 1e20 on
# z * z leaves the gelu_tanh gradient unchanged; 1e30 * 3 * GELU_TANH_COEF stays finite in fp32.
GELU_TANH_ZZ_CAP = tl.constexpr(1e30)


@triton.jit
def _activation_fwd(z, ACTIVATION: tl.constexpr):
    """activation(z), NaN and +-inf as torch's twin: relu(NaN) = NaN; gelu, gelu_tanh and silu
    of -inf are NaN (-inf * 0), as torch computes them."""
    if ACTIVATION == "relu":
        # A select, not tl.maximum, which returns 0 for NaN where torch's relu keeps the NaN.
        z = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == "gelu":
        z = 0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))
    elif ACTIVATION == "gelu_tanh":
        z = 0.5 * z * (1.0 + tanh((z + z * z * z * GELU_TANH_COEF) * SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """d activation(z) / dz, NaN and +-inf as torch's backward: relu'(NaN) = 1 (torch masks by
    z <= 0, which NaN fails); gelu', gelu_tanh' and silu' of +-inf are NaN (inf * 0)."""
    if ACTIVATION == "relu":
        g = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACTIVATION == "gelu":
        g = 0.5 * (1.0 + tl.math.erf(z * SQRT_HALF)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        t = tanh((z + z * z * z * GELU_TANH_COEF) * SQRT_2_OVER_PI)
        # z * z is capped so it cannot overflow to inf for a large finite z (|z| > 1.8e19 in fp32),
        # where 1 - t * t is exactly 0 and 0 * inf would make the gradient NaN instead of 1 or 0;
        # an infinite or NaN z still gives NaN through z * (1 - t * t), as in torch.
        zz = tl.minimum(z * z, GELU_TANH_ZZ_CAP)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + zz * 3.0 * GELU_TANH_COEF)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        g = tl.full(z.shape, 1.0, z.dtype)
    return g


@triton.jit
def _matmul_fwd_kernel(
    a_ptr,  # (B, M, K)
    b_ptr,  # (B, K, N)
    c_ptr,  # (B, M, N) output: activation(a @ b + bias)
    z_ptr,  # (B, M, N) pre-activation a @ b + bias, written when STORE_PREACT; strides of c
    bias_ptr,  # (N,)
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the K loop
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 inputs
):
    acc_ty = acc_type(a_ptr.dtype.element_ty)  # float32, or float64 for float64 inputs
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    batch = pid // tiles
    tile = pid % tiles
    # Grouped order: GROUP_M row-tiles sweep the columns together, so their A and B tiles stay in L2.
    tiles_in_group = GROUP_M * tiles_n
    first_m = (tile // tiles_in_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_in_group) % group_rows
    pid_n = (tile % tiles_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around, so loads need no M/N mask; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    batch = batch.to(tl.int64)
    a_ptrs = a_ptr + batch * stride_ab + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(upcast(a), upcast(b), acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(acc_ty)[None, :]
    c_offs = batch * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PREACT:
        tl.store(z_ptr + c_offs, cast_to(acc, z_ptr.dtype.element_ty), mask=c_mask)
    out = _activation_fwd(acc, ACTIVATION)
    tl.store(c_ptr + c_offs, cast_to(out, c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _epilogue_bwd_kernel(
    dy_ptr,  # (R, N) gradient of the activation's output
    z_ptr,  # (R, N) saved pre-activation; read when ACTIVATION is set
    dz_ptr,  # (R, N) gradient of the pre-activation, written when ACTIVATION is set
    dbias_part_ptr,  # (cdiv(R, BLOCK_R), N) per-program column sums of dz, written when HAS_BIAS
    R, N,
    stride_dyr, stride_dyn,
    stride_zr, stride_zn,
    stride_dzr, stride_dzn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    acc_ty = acc_type(dy_ptr.dtype.element_ty)
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
    dz = tl.load(dy_ptr + offs_r[:, None] * stride_dyr + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    dz = dz.to(acc_ty)
    if ACTIVATION != "none":
        z = tl.load(z_ptr + offs_r[:, None] * stride_zr + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
        dz = dz * _activation_grad(z.to(acc_ty), ACTIVATION)
        dz = cast_to(dz, dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + offs_r[:, None] * stride_dzr + offs_n[None, :] * stride_dzn, dz, mask=mask)
    if HAS_BIAS:
        # The bias gradient sums the (rounded) dz the weight gradient sees.
        dz = dz.to(acc_ty)
        tl.store(dbias_part_ptr + pid_r * N + offs_n, tl.sum(dz, axis=0), mask=offs_n < N)
