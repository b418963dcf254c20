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
    SPLIT_K: tl.constexpr = 1,  # > 1: programs share a tile's K; c_ptr is the fp32 (SPLIT_K, B, M, N) workspace
):
    acc_ty = acc_type(a_ptr.dtype.element_ty)  # float32, or float64 for float64 inputs
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    batch = pid // tiles
    tile = pid % tiles
    pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around, so loads need no M/N mask; the store is masked.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    batch = batch.to(tl.int64)
    k_steps = tl.cdiv(K, BLOCK_K)
    if SPLIT_K == 1:
        first_step = 0
        last_step = k_steps
    else:
        # Program ids run over (batch, split, tile): one split's programs sweep the tiles
        # together, sharing that split's slice of A in L2. A split takes whole BLOCK_K steps.
        split = batch % SPLIT_K
        batch = batch // SPLIT_K
        steps_per_split = tl.cdiv(k_steps, SPLIT_K)
        first_step = split * steps_per_split
        last_step = min(first_step + steps_per_split, k_steps)
    k0 = first_step * BLOCK_K
    a_ptrs = (a_ptr + batch * stride_ab + rows[:, None] * stride_am
              + (k0 + offs_k[None, :]).to(tl.int64) * stride_ak)
    b_ptrs = (b_ptr + batch * stride_bb + (k0 + offs_k[:, None]).to(tl.int64) * stride_bk
              + cols[None, :] * stride_bn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    for k in range(first_step, last_step):
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

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # The partial sum as it is; _splitk_reduce_kernel adds the splits in order (deterministic)
        # and applies the epilogue. Workspace (SPLIT_K, B, M, N), contiguous.
        B = tl.num_programs(0) // (tiles * SPLIT_K)
        w_offs = (((split * B + batch) * M + offs_m[:, None].to(tl.int64)) * N + offs_n[None, :])
        tl.store(c_ptr + w_offs, acc, mask=c_mask)
    else:
        c_offs = (batch * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm
                  + offs_n[None, :].to(tl.int64) * stride_cn)
        _store_epilogue(acc, c_ptr + c_offs, z_ptr + c_offs, bias_ptr + cols * stride_bias, c_mask,
                        HAS_BIAS, ACTIVATION, STORE_PREACT)


@triton.jit
def _matmul_tma_kernel(
    a_ptr,  # (M, K): K-major (stride_a = row stride) when A_KMAJOR, else M-major (stride_a = stride along K)
    b_ptr,  # (K, N): K-major (stride_b = stride along N) when B_KMAJOR, else N-major (stride_b = stride along K)
    c_ptr,  # (M, N) output, row stride stride_c, unit column stride
    z_ptr,  # (M, N) pre-activation, strides of c, written when STORE_PREACT
    bias_ptr,  # (N,)
    M, N, K,
    stride_a, stride_b, stride_c, stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_KMAJOR: tl.constexpr, B_KMAJOR: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,  # store C in two (BLOCK_M, BLOCK_N / 2) halves: half the staging buffer
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """activation(A @ B + bias) on tensor descriptors (TMA on Hopper), with a persistent grid:
    each program takes tiles pid, pid + programs, ... in grouped order. Operands need a unit
    stride on one dim and 16-byte aligned base and other stride; loads past the edges read
    zeros and stores past them are dropped, so nothing is masked."""
    acc_ty = acc_type(a_ptr.dtype.element_ty)
    if A_KMAJOR:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_a, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_a, 1], block_shape=[BLOCK_K, BLOCK_M])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    C_BLOCK_N: tl.constexpr = BLOCK_N // 2 if EPILOGUE_SUBTILE else BLOCK_N
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_c, 1], block_shape=[BLOCK_M, C_BLOCK_N])
    if STORE_PREACT:
        z_desc = tl.make_tensor_descriptor(z_ptr, shape=[M, N], strides=[stride_c, 1],
                                           block_shape=[BLOCK_M, C_BLOCK_N])
    else:
        z_desc = c_desc

    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
        for k in range(k_steps):
            off_k = k * BLOCK_K
            if A_KMAJOR:
                a = a_desc.load([off_m, off_k])
            else:
                a = a_desc.load([off_k, off_m]).T
            if B_KMAJOR:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(upcast(a), upcast(b), acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)

        cols = off_n + tl.arange(0, BLOCK_N)
        acc = _add_bias(acc, bias_ptr + (cols % N) * stride_bias, HAS_BIAS)
        if EPILOGUE_SUBTILE:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _store_tile(acc0, c_desc, z_desc, off_m, off_n, ACTIVATION, STORE_PREACT)
            _store_tile(acc1, c_desc, z_desc, off_m, off_n + BLOCK_N // 2, ACTIVATION, STORE_PREACT)
        else:
            _store_tile(acc, c_desc, z_desc, off_m, off_n, ACTIVATION, STORE_PREACT)


@triton.jit
def _store_tile(acc, c_desc, z_desc, off_m, off_n, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr):
    """c = activation(acc) and z = acc (when STORE_PREACT) through descriptors."""
    if STORE_PREACT:
        z_desc.store([off_m, off_n], cast_to(acc, z_desc.dtype))
    c_desc.store([off_m, off_n], cast_to(_activation_fwd(acc, ACTIVATION), c_desc.dtype))


@triton.jit
def _grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a tile index in grouped order: GROUP_M row-tiles sweep the
    columns together, so their A and B tiles stay in L2."""
    tiles_in_group = GROUP_M * tiles_n
    first_m = (tile // tiles_in_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_in_group) % group_rows
    pid_n = (tile % tiles_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _add_bias(acc, bias_ptrs, HAS_BIAS: tl.constexpr):
    """The pre-activation acc + bias, in acc's type; bias_ptrs (BLOCK_N,) all in bounds
    (columns past N wrap around)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptrs).to(acc.dtype)[None, :]
    return acc


@triton.jit
def _store_epilogue(acc, c_ptrs, z_ptrs, bias_ptrs, mask, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    STORE_PREACT: tl.constexpr):
    """c = activation(acc + bias), and z = acc + bias when STORE_PREACT, through pointers."""
    acc = _add_bias(acc, bias_ptrs, HAS_BIAS)
    if STORE_PREACT:
        tl.store(z_ptrs, cast_to(acc, z_ptrs.dtype.element_ty), mask=mask)
    tl.store(c_ptrs, cast_to(_activation_fwd(acc, ACTIVATION), c_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    w_ptr,  # (SPLIT_K, B, M, N) fp32 partial sums, contiguous
    c_ptr, z_ptr, bias_ptr,
    M, N,
    stride_cb, stride_cm, stride_cn,
    stride_bias,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
):
    """c = activation(sum of the splits + bias), the splits added in order. One program per
    BLOCK_M x BLOCK_N tile of each batch, on a 1-D grid (batch-major)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    batch = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    plane = (tl.num_programs(0) // tiles).to(tl.int64) * M * N  # one split's B x M x N partials
    offs_m = ((tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    w_ptrs = w_ptr + (batch * M + offs_m[:, None]) * N + offs_n[None, :]
    acc = tl.load(w_ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        w_ptrs += plane
        acc += tl.load(w_ptrs, mask=mask, other=0.0)
    c_offs = batch * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    _store_epilogue(acc, c_ptr + c_offs, z_ptr + c_offs, bias_ptr + (offs_n % N) * stride_bias, mask,
                    HAS_BIAS, ACTIVATION, STORE_PREACT)


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
