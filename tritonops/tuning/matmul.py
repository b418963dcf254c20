"""Config choice of the matmul kernel (matmul, linear and their backward): the key, the
heuristic default, the search space, the tuning runner, the Tuner and the `autotune` ops."""

import functools
from typing import NamedTuple

import torch
import triton

from autotune import Config, Space, TunableOp, Tuner, bucket, register, register_tuner

from ..kernels.matmul import _matmul_fwd_kernel, _matmul_tma_kernel, _splitk_reduce_kernel
from ..ops._common import DTYPE_NAMES
from .common import ITEMSIZE, SHIPPED_CONFIGS, check_dtype, tuning_device


class MatmulKey(NamedTuple):
    """A problem of the matmul kernel: C (M, N) = A (M, K) @ B (K, N), per batch."""

    M: int  # bucketed: rows vary with batch x sequence
    N: int
    K: int
    dtype: str
    a_kmajor: bool  # A read along K (unit stride on K)
    b_kmajor: bool  # B read along K
    epilogue: bool  # bias and/or activation fused


def matmul_key(a: torch.Tensor, b: torch.Tensor, epilogue: bool) -> MatmulKey:
    """The key of a launch on a (B, M, K) and b (B, K, N), as `launch_matmul` gets them.
    Built on every launch: no more than tensor attribute reads and one tuple."""
    _, M, K = a.shape
    return MatmulKey(bucket(M), b.shape[2], K, DTYPE_NAMES[a.dtype], a.stride(2) == 1, b.stride(1) == 1, epilogue)


# The SMs of the GPUs the heuristic aims at (H100, H200): a decode-shaped problem is split
# until it runs at least twice this many programs. The key does not name the GPU; a tuned
# config replaces the rule where the count differs.
TARGET_SMS = 132
DECODE_M = 64  # problems of at most this many rows take split K
MIN_SPLIT_STEPS = 4  # BLOCK_K steps each split takes at least
SPLITS = [1, 2, 4, 8, 16]
TMA_MIN_MN = 1024  # M and N from which the persistent descriptor kernel is the default (16-bit)


def matmul_heuristic(key: MatmulKey) -> Config:
    """The default config of a matmul problem key.

    - Large 16-bit problems (M and N from TMA_MIN_MN, K and N multiples of 8 so contiguous
      rows are 16-byte aligned): the persistent descriptor kernel, 128 x 256 x 64 tiles,
      8 warps, 3 stages (Triton's own persistent TMA matmul's choice for Hopper); with a fused
      epilogue 128 x 128 x 64 and 4 stages, as the larger tile spills there on sm90.
    - Otherwise the pointer kernel, the tile covering up to 128 x 128 outputs, shrunk to the
      next power of two of a small M or N and never under 16 (the smallest `tl.dot`);
      BLOCK_K 64 for 16-bit types, 32 for float32, 16 for float64, which keeps 3 stages well
      inside Hopper's 227 KB of shared memory; 8 warps for a full 128 x 128 tile, 4 otherwise;
      GROUP_M 8 for L2 reuse.
    - Decode-shaped problems (M up to DECODE_M) take 64-column tiles and split K until the
      grid has 2 x TARGET_SMS programs, each split at least MIN_SPLIT_STEPS steps of BLOCK_K.
    """
    block_k = _block_k(key)
    if (key.dtype in ("float16", "bfloat16") and key.M >= TMA_MIN_MN and key.N >= TMA_MIN_MN
            and tma_rows_aligned(key) and key.K >= block_k):
        # A fused epilogue (erf, the pre-activation's store) spills a 128 x 256 tile's registers.
        block_n, stages = (128, 4) if key.epilogue else (256, 3)
        return Config({"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8,
                      num_stages=stages, host={"TMA": True, "SPLIT_K": 1, "EPILOGUE_SUBTILE": False})
    return matmul_pointer_heuristic(key)


def tma_rows_aligned(key: MatmulKey) -> bool:
    """Whether the rows of a key's operands, laid out contiguously, are 16-byte multiples for
    2-byte types (multiples of 8 elements), as tensor descriptors need: C's (N), A's (K when
    K-major, else M) and B's (K when K-major, else N). M is the key's bucket: a launch
    checks its real strides (`ops.matmul.tma_layout`)."""
    rows = (key.N, key.K if key.a_kmajor else key.M, key.K if key.b_kmajor else key.N)
    return all(n % 8 == 0 for n in rows)


def _block_k(key: MatmulKey) -> int:
    """BLOCK_K of the defaults: 64 for 16-bit types, 32 for float32, 16 for float64, never past
    next_pow2(K) (and never under 16, the smallest `tl.dot`)."""
    block_k = {"float16": 64, "bfloat16": 64, "float32": 32}.get(key.dtype, 16)
    return min(block_k, max(16, triton.next_power_of_2(key.K)))


@functools.lru_cache(maxsize=None)  # a launch the descriptor kernel cannot take asks on every call
def matmul_pointer_heuristic(key: MatmulKey) -> Config:
    """matmul_heuristic's config on the pointer kernel: also what a launch whose operands the
    descriptor kernel cannot take (a batch, unaligned strides) runs instead of a descriptor
    config, whose tile may be too large for the pointer kernel's registers."""
    block_k = _block_k(key)
    block_m = min(128, max(16, triton.next_power_of_2(key.M)))
    block_n = min(128, max(16, triton.next_power_of_2(key.N)))
    split_k = 1
    if key.M <= DECODE_M:
        block_n = min(block_n, 64)
        tiles = triton.cdiv(key.M, block_m) * triton.cdiv(key.N, block_n)
        steps = triton.cdiv(key.K, block_k)
        while split_k < SPLITS[-1] and tiles * split_k < 2 * TARGET_SMS and steps >= 2 * split_k * MIN_SPLIT_STEPS:
            split_k *= 2
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                  num_warps=num_warps, num_stages=3, host={"TMA": False, "SPLIT_K": split_k, "EPILOGUE_SUBTILE": False})


def splitk_reduce_config(M: int) -> Config:
    """Tile of the split-K reduction: at most 32 x 64 outputs, so even a decode problem's
    few rows spread over many programs."""
    return _reduce_config(min(32, max(16, triton.next_power_of_2(M))))


@functools.lru_cache(maxsize=None)  # two tiles in all, asked on every split-K launch
def _reduce_config(block_m: int) -> Config:
    return Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def _smem_bytes(config: Config, problem: dict) -> int:
    """The operand ring, and for the descriptor kernel the staging tile of its C store."""
    ring = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * problem["itemsize"] * config.num_stages
    if config.get("TMA", False):
        ring += config["BLOCK_M"] * config["BLOCK_N"] * problem["itemsize"] // (2 if config["EPILOGUE_SUBTILE"] else 1)
    return ring


def _accumulator_fits(config: Config, problem: dict) -> bool:
    """fp32 accumulator registers per thread; past ~128 the kernel spills."""
    return config["BLOCK_M"] * config["BLOCK_N"] // (32 * config.num_warps) <= 128


def _variant_fits(config: Config, problem: dict) -> bool:
    """The descriptor kernel for 16-bit types whose rows descriptors can take (else a launch
    runs the pointer default and the tuner would time that again), one split and no more;
    its C stored in halves
    only there. K split only for decode-shaped problems, each split at least MIN_SPLIT_STEPS
    steps of BLOCK_K."""
    if config["TMA"]:
        return problem["itemsize"] == 2 and problem["tma_rows"] and config["SPLIT_K"] == 1
    if config["EPILOGUE_SUBTILE"]:
        return False
    split = config["SPLIT_K"]
    return split == 1 or (problem["M"] <= DECODE_M
                          and triton.cdiv(problem["K"], config["BLOCK_K"]) >= split * MIN_SPLIT_STEPS)


MATMUL_SPACE = Space(
    {"BLOCK_M": [16, 32, 64, 128, 256], "BLOCK_N": [16, 32, 64, 128, 256], "BLOCK_K": [16, 32, 64, 128],
     "GROUP_M": [8]},
    num_warps=[4, 8], num_stages=[2, 3, 4, 5],
    host_params={"TMA": [False, True], "SPLIT_K": SPLITS, "EPILOGUE_SUBTILE": [False, True]},
    smem_bytes=_smem_bytes, block_dims={"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"},
    dot_params=["BLOCK_M", "BLOCK_N", "BLOCK_K"], constraints=[_accumulator_fits, _variant_fits], version=2)


def _problem(key: MatmulKey) -> dict:
    return {"M": key.M, "N": key.N, "K": key.K, "itemsize": ITEMSIZE[key.dtype], "tma_rows": tma_rows_aligned(key)}


def _runner(key: MatmulKey):
    """Inputs for `key` on the GPU (or the interpreter's CPU), and a launch into scratch outputs."""
    from ..ops.matmul import launch_matmul  # the ops import this module for the Tuner

    M, N, K = key.M, key.N, key.K
    device = tuning_device()
    dt = getattr(torch, key.dtype)
    a = torch.randn((M, K) if key.a_kmajor else (K, M), device=device, dtype=dt)
    b = torch.randn((N, K) if key.b_kmajor else (K, N), device=device, dtype=dt) / K ** 0.5
    a3 = (a if key.a_kmajor else a.t()).unsqueeze(0)
    b3 = (b.t() if key.b_kmajor else b).unsqueeze(0)
    bias = torch.randn(N, device=device, dtype=dt) if key.epilogue else None
    activation = "gelu" if key.epilogue else None
    out = torch.empty((1, M, N), device=device, dtype=dt)

    def launch(config: Config):
        return launch_matmul(a3, b3, bias, activation, out=out, config=config)[0].clone()

    return launch


MATMUL_TUNER = register_tuner(Tuner(
    "matmul", MATMUL_SPACE, matmul_heuristic, runner=_runner, problem=_problem, key_type=MatmulKey,
    sources=[_matmul_fwd_kernel, _matmul_tma_kernel, _splitk_reduce_kernel], shipped=SHIPPED_CONFIGS))


# --------------------------------------------------------------------------- the `autotune` command
# The keys a call selects, found by running the ops' own key functions on meta tensors laid
# out as the ops lay out their operands: what is tuned ahead of time is what a call looks up.

# largest first: under a time cap (`--op-seconds`) the problems that take the most GPU time are tuned first
LLM_SHAPES = sorted(((m, n, k) for m in (1, 16, 128, 1024, 4096, 8192)
                     for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))),
                    key=lambda s: -s[0] * s[1] * s[2])
TUNE_DTYPES = ("float16", "bfloat16", "float32")


def _meta(*shape, dtype: str) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=getattr(torch, dtype))


def matmul_call_keys(M: int, N: int, K: int, dtype: str) -> list[MatmulKey]:
    """The keys of torch.matmul's forward and backward on row-major A (M, K) and B (K, N)."""
    a, b, g = _meta(M, K, dtype=dtype), _meta(K, N, dtype=dtype), _meta(M, N, dtype=dtype)
    return [matmul_key(a[None], b[None], False),  # C = A @ B
            matmul_key(g[None], b.mT[None], False),  # dA = dC @ B^T
            matmul_key(a.mT[None], g[None], False)]  # dB = A^T @ dC


def linear_call_keys(M: int, N: int, K: int, dtype: str) -> list[MatmulKey]:
    """The keys of F.linear forward and backward on x (M, K) and weight (N, K): the forward
    with a fused epilogue (a bias and/or an activation) and without one (a bias-free
    projection); dX = dZ @ W and dW = dZ^T @ X, the same in both cases."""
    x, w, dz = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype), _meta(M, N, dtype=dtype)
    return [matmul_key(x[None], w.t()[None], True),
            matmul_key(x[None], w.t()[None], False),
            matmul_key(dz[None], w[None], False),
            matmul_key(dz.t()[None], x[None], False)]


def _tune_keys(call_keys):
    def keys(shape: tuple, dtype: str):
        check_dtype(dtype, TUNE_DTYPES)
        return [(MATMUL_TUNER, key) for key in dict.fromkeys(call_keys(*shape, dtype))]
    return keys


register(TunableOp("matmul", "MxNxK", _tune_keys(matmul_call_keys), {"llm": LLM_SHAPES, "smoke": [(33, 17, 40)]},
                   help="C = A @ B, A (M, K) and B (K, N) row-major, forward and backward"))
register(TunableOp("linear", "MxNxK", _tune_keys(linear_call_keys), {"llm": LLM_SHAPES, "smoke": [(33, 17, 40)]},
                   help="F.linear, x (M, K) @ weight (N, K)^T, with and without a fused bias / activation, "
                        "forward and backward"))
