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

Configs come from four Tuners (forward, backward dK/dV, backward dQ, backward preprocess);
the op is the custom op tritonops::attention, its backward tritonops::attention_backward,
so torch.compile keeps both in one graph.
"""

import math

import torch
import torch.nn.functional as F
import triton

from autotune import Config, Space, TunableOp, Tuner, bucket, register, register_tuner

from .. import reference, runtime
from ..kernels import attention as attention_kernels
from ..kernels import common as common_kernels
from ..kernels.attention import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_dropout_mask_kernel,
    _attn_fwd_kernel,
)
from ._common import (DTYPE_NAMES, SHIPPED_CONFIGS, acc_dtype, check_same, dot_input_precision, interpreter_upcast,
                      tuning_device, use_reference)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
ITEMSIZE = {name: getattr(torch, name).itemsize for name in DTYPE_NAMES.values()}

# --------------------------------------------------------------------------- config choice
#
# Keys (small tuples, built per launch without string formatting):
#   attention_key: (padded head dim (max over E and Ev), causal, dtype name, bucket(L),
#                   bucket(S), mask kind ("none" | "bool" | "add"), dropout): forward and dK/dV.
#                   L and S are bucketed to powers of two: blocks depend only on next_pow2(L/S).
#                   The mask (an L x S read per tile) and dropout (Philox per score) change the
#                   work per tile, so the best tile; GQA is left out: it only shrinks the dK/dV
#                   grid, as a smaller batch does, and neither batch nor heads are in the key.
#   attention_dq_key: attention_key + (mask gradient,): dQ also writes the L x S mask gradient.
#   attention_preprocess_key: (padded Ev, dtype name, bucket(L)).
# The defaults are leads for Hopper (Inductor's H100 defaults, the Triton FA2 tutorial),
# to be replaced by tuned winners; the interpreter cannot judge them.

SMEM_BUDGET = 200 * 1024  # bytes a default may use: under Hopper's 227 KB, room for the compiler's own
REGISTER_VALUES = 256  # fp32 accumulator + score values per thread a config may hold (255 registers max)
FWD_8_WARP_TILE = 128 * 64  # the smallest forward BLOCK_M x BLOCK_N tile worth 8 warps on sm90
BWD_8_WARP_BLOCK = 64  # the smallest block a backward program owns (dK/dV: BLOCK_N, dQ: BLOCK_M) for 8 warps


def _head_block(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(d))


def attention_key(E: int, EV: int, L: int, S: int, dtype: torch.dtype, causal: bool, mask_kind: str = "none",
                  dropout: bool = False) -> tuple:
    """The forward's and dK/dV's key: (padded head dim, causal, dtype, bucket(L), bucket(S), mask kind, dropout)."""
    return (max(_head_block(E), _head_block(EV)), causal, DTYPE_NAMES[dtype], bucket(L), bucket(S), mask_kind,
            dropout)


def attention_dq_key(E: int, EV: int, L: int, S: int, dtype: torch.dtype, causal: bool, mask_kind: str = "none",
                     dropout: bool = False, mask_grad: bool = False) -> tuple:
    """dQ's key: attention_key + whether the additive mask's gradient is written."""
    return attention_key(E, EV, L, S, dtype, causal, mask_kind, dropout) + (mask_grad,)


def attention_preprocess_key(EV: int, L: int, dtype: torch.dtype) -> tuple:
    """The preprocess's key: (padded Ev, dtype, bucket(L))."""
    return (_head_block(EV), DTYPE_NAMES[dtype], bucket(L))


def _prune(block: int, n: int) -> int:
    """No block beyond the next power of two of the extent, none under 16 (the smallest tl.dot)."""
    return min(block, max(16, triton.next_power_of_2(max(n, 1))))


def _by_head_dim(head_dim: int, d64, d128, d256):
    """The entry for a (padded) head dim of at most 64, 128 or 256."""
    return d64 if head_dim <= 64 else d128 if head_dim <= 128 else d256


def _narrow(block: int, itemsize: int) -> int:
    """A block tuned for 2-byte types, halved for each doubling of the element size (never under 16)."""
    return max(16, block // max(1, itemsize // 2))


def _fwd_smem(block_m: int, block_n: int, stages: int, head_dim: int, itemsize: int) -> int:
    """Shared memory of a forward program: the Q tile, and K and V tiles for each pipeline stage."""
    return (block_m + stages * 2 * block_n) * head_dim * itemsize


def _fit_smem(block_m: int, block_n: int, head_dim: int, itemsize: int, stages: int) -> tuple[int, int]:
    """Halve BLOCK_N, then (float64 only) drop stages, until the forward fits SMEM_BUDGET."""
    while block_n > 16 and _fwd_smem(block_m, block_n, stages, head_dim, itemsize) > SMEM_BUDGET:
        block_n //= 2
    while stages > 1 and _fwd_smem(block_m, block_n, stages, head_dim, itemsize) > SMEM_BUDGET:
        stages -= 1
    return block_n, stages


def attention_config(key: tuple) -> Config:
    """Forward default for an attention_key: BLOCK_M query rows per program, stepping BLOCK_N keys.

    Inductor's H100 bf16 defaults (BM, BN, stages, warps): head dim <= 64 (128, 128, 3, 4),
    <= 128 (128, 64, 3, 8), <= 256 (64, 32, 3, 4). 4-byte types halve BLOCK_N (twice the
    bytes per tile), 8-byte ones (interpreter only) halve it again. BLOCK_N then shrinks
    (and for float64 the stages drop) until Q and 3 stages of K and V fit in shared memory;
    BLOCK_M and BLOCK_N are pruned to next_pow2(L) and next_pow2(S) (at least 16), and a
    tile under 128 x 64 uses 4 warps.
    """
    head_dim, _, dtype, L, S = key[:5]
    itemsize = ITEMSIZE[dtype]
    bm, bn, stages, warps = _by_head_dim(head_dim, (128, 128, 3, 4), (128, 64, 3, 8), (64, 32, 3, 4))
    bm, bn = _prune(bm, L), _prune(_narrow(bn, itemsize), S)
    bn, stages = _fit_smem(bm, bn, head_dim, itemsize, stages)
    if bm < 128 or bm * bn < FWD_8_WARP_TILE:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def attention_bwd_dkdv_config(key: tuple) -> Config:
    """dK/dV default for an attention_key: BLOCK_N keys per program (their dK, dV accumulators
    stay in registers), stepping BLOCK_M query rows.

    From the Triton FA2 tutorial on H100 (BLOCK_N1 = 128, BLOCK_M1 = 32): head dim <= 64
    (32, 128, 4 warps, 3 stages), <= 128 (32, 128, 8 warps, 2 stages: the accumulators
    double), <= 256 (16, 64, 8 warps, 2 stages). 4- and 8-byte types halve BLOCK_N for each
    doubling of the element size; blocks pruned to the extents as in `attention_config`;
    a BLOCK_N under 64 uses 4 warps.
    """
    head_dim, _, dtype, L, S = key[:5]
    bm, bn, warps, stages = _by_head_dim(head_dim, (32, 128, 4, 3), (32, 128, 8, 2), (16, 64, 8, 2))
    bm, bn = _prune(bm, L), _prune(_narrow(bn, ITEMSIZE[dtype]), S)
    if bn < BWD_8_WARP_BLOCK:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def attention_bwd_dq_config(key: tuple) -> Config:
    """dQ default for an attention_dq_key: BLOCK_M query rows per program (dQ accumulator in
    registers), stepping BLOCK_N keys.

    The mirror of the dK/dV tiles (Triton FA2 tutorial: BLOCK_M2 = 128, BLOCK_N2 = 32):
    head dim <= 64 (128, 32, 4 warps, 3 stages), <= 128 (128, 32, 8 warps, 2 stages),
    <= 256 (64, 16, 8 warps, 2 stages); 4- and 8-byte types halve BLOCK_M for each doubling;
    blocks pruned to the extents; a BLOCK_M under 64 uses 4 warps.
    """
    head_dim, _, dtype, L, S = key[:5]
    bm, bn, warps, stages = _by_head_dim(head_dim, (128, 32, 4, 3), (128, 32, 8, 2), (64, 16, 8, 2))
    bm, bn = _prune(_narrow(bm, ITEMSIZE[dtype]), L), _prune(bn, S)
    if bm < BWD_8_WARP_BLOCK:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def attention_bwd_preprocess_config(key: tuple) -> Config:
    """delta = rowsum(O * dO), for an attention_preprocess_key: memory-bound; 64 rows
    (fewer for a short L, 16 for a head wider than 128), 4 warps, no pipeline."""
    head_dim, _, L = key
    bm = 16 if head_dim > 128 else 64
    return Config({"BLOCK_M": _prune(bm, L)}, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------- search spaces
# The shared-memory estimates are upper bounds of what Triton 3.6 and 3.9 allocate compiling
# these kernels for sm90 (checked on float16 tiles from 32 x 128 to 128 x 128 at head dims
# 64-256, and float32 128 x 128 at d128, 1 to 4 stages): they assume every stage holds its own
# K/V (or Q/dO) tiles, as float32 loops do; the 16-bit loops were not pipelined at all (the
# same shared memory at any num_stages: a lead for the GPU).
# Every config of a space runs correctly on the kernels (any power-of-two BLOCK_M, BLOCK_N
# from 16, BLOCK_M != BLOCK_N on the causal diagonal included); the rules only drop what
# cannot run here (shared memory) or cannot win (blocks past the extents, idle warps, spills).
# From GPU_NOTES, adapted so the measured defaults above stay inside: the tutorial drops
# forward tiles under 128 x 128 with 8 warps on sm90, which would drop Inductor's d128
# default (128 x 64, 8 warps), so the bar here is 128 x 64; and its "BLOCK_N <= head dim"
# is that kernel's static_assert, not a limit of ours (Inductor's d64 default has BLOCK_N
# 128): the register budget takes its place.

BLOCKS = [16, 32, 64, 128]
WARPS = [4, 8]
STAGES = [1, 2, 3, 4]


def _problem(key: tuple) -> dict:
    head_dim, _, dtype, L, S = key[:5]
    return {"L": L, "S": S, "D": head_dim, "itemsize": ITEMSIZE[dtype],
            "sm": runtime.device_properties()["capability"][0]}


def _fwd_smem_bytes(config: Config, problem: dict) -> int:
    return _fwd_smem(config["BLOCK_M"], config["BLOCK_N"], config.num_stages, problem["D"], problem["itemsize"])


def _dkdv_smem_bytes(config: Config, problem: dict) -> int:
    """K and V tiles resident; Q and dO tiles for each stage of the loop over query rows, and
    one more BLOCK_M x D tile (seen compiling float32 for sm90 with 1 stage)."""
    return ((2 * config.num_stages + 1) * config["BLOCK_M"] + 2 * config["BLOCK_N"]) * problem["D"] * problem[
        "itemsize"]


def _dq_smem_bytes(config: Config, problem: dict) -> int:
    """Q and dO tiles resident; K and V tiles for each stage of the loop over keys."""
    return (config["BLOCK_M"] + config.num_stages * config["BLOCK_N"]) * 2 * problem["D"] * problem["itemsize"]


def _values_per_thread(config: Config, values: int) -> bool:
    return values <= REGISTER_VALUES * 32 * config.num_warps


def _fwd_registers(config: Config, problem: dict) -> bool:
    """The BLOCK_M x BLOCK_N scores and the BLOCK_M x D accumulator fit in registers."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    return _values_per_thread(config, bm * bn + bm * problem.get("D", 16))


def _fwd_warps(config: Config, problem: dict) -> bool:
    """On sm90, 8 warps only for a tile of at least 128 x 64 (two warpgroups of 64 rows with work)."""
    if config.num_warps < 8 or problem.get("sm", 9) != 9:
        return True
    return config["BLOCK_M"] >= 128 and config["BLOCK_M"] * config["BLOCK_N"] >= FWD_8_WARP_TILE


def _dkdv_rules(config: Config, problem: dict) -> bool:
    """The transposed scores (BLOCK_N x BLOCK_M) and the dK, dV accumulators (BLOCK_N x D each)
    fit in registers; 8 warps only for a BLOCK_N of at least 64."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if config.num_warps >= 8 and bn < BWD_8_WARP_BLOCK:
        return False
    return _values_per_thread(config, bn * bm + 2 * bn * problem.get("D", 16))


def _dq_rules(config: Config, problem: dict) -> bool:
    """The scores (BLOCK_M x BLOCK_N) and the dQ accumulator (BLOCK_M x D) fit in registers;
    8 warps only for a BLOCK_M of at least 64."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if config.num_warps >= 8 and bm < BWD_8_WARP_BLOCK:
        return False
    return _values_per_thread(config, bm * bn + bm * problem.get("D", 16))


def _preprocess_problem(key: tuple) -> dict:
    head_dim, dtype, L = key
    return {"L": L, "D": head_dim, "itemsize": ITEMSIZE[dtype]}


def _preprocess_registers(config: Config, problem: dict) -> bool:
    """The O and dO tiles (BLOCK_M x Ev each, fp32) fit in registers."""
    return _values_per_thread(config, 2 * config["BLOCK_M"] * problem.get("D", 16))


_BLOCK_DIMS = {"BLOCK_M": "L", "BLOCK_N": "S"}

ATTENTION_SPACE = Space(
    {"BLOCK_M": BLOCKS, "BLOCK_N": BLOCKS}, num_warps=WARPS, num_stages=STAGES, smem_bytes=_fwd_smem_bytes,
    block_dims=_BLOCK_DIMS, dot_params=["BLOCK_M", "BLOCK_N"], constraints=[_fwd_registers, _fwd_warps], version=1)

ATTENTION_BWD_DKDV_SPACE = Space(
    {"BLOCK_M": BLOCKS, "BLOCK_N": BLOCKS}, num_warps=WARPS, num_stages=STAGES, smem_bytes=_dkdv_smem_bytes,
    block_dims=_BLOCK_DIMS, dot_params=["BLOCK_M", "BLOCK_N"], constraints=[_dkdv_rules], version=1)

ATTENTION_BWD_DQ_SPACE = Space(
    {"BLOCK_M": BLOCKS, "BLOCK_N": BLOCKS}, num_warps=WARPS, num_stages=STAGES, smem_bytes=_dq_smem_bytes,
    block_dims=_BLOCK_DIMS, dot_params=["BLOCK_M", "BLOCK_N"], constraints=[_dq_rules], version=1)

ATTENTION_BWD_PREPROCESS_SPACE = Space(
    {"BLOCK_M": BLOCKS}, num_warps=WARPS, num_stages=[1], block_dims={"BLOCK_M": "L"},
    constraints=[_preprocess_registers], version=1)


# --------------------------------------------------------------------------- runners (tuning)

TUNE_ROWS = 65536  # query rows (batch x heads x L) of a runner's problem on a GPU: every key does real work
TUNE_MIN_HEADS = 8  # ... and at least this many heads, so long sequences still spread over the SMs
TUNE_DROPOUT = 0.1
TUNE_SEED = 1234


def _tune_heads(L: int) -> int:
    """batch x heads of a runner's problem: TUNE_ROWS query rows on a GPU (at least
    TUNE_MIN_HEADS heads); one head under the interpreter, where timings mean nothing."""
    return max(TUNE_MIN_HEADS, TUNE_ROWS // max(L, 1)) if tuning_device() == "cuda" else 1


def _inputs(key: tuple) -> dict:
    """q, k, v (1, BH, L|S, D) for an attention_key (E = Ev = the key's head dim), the mask
    its kind asks for ((L, S), broadcast over the heads), and dropout's p and seed."""
    head_dim, causal, dtype, L, S, mask_kind, dropout = key[:7]
    dt, device, bh = getattr(torch, dtype), tuning_device(), _tune_heads(L)
    q, k, v = (torch.randn((1, bh, n, head_dim), device=device, dtype=dt) for n in (L, S, S))
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand((L, S), device=device) > 0.1).expand(1, bh, L, S)
    elif mask_kind == "add":
        mask = torch.randn((L, S), device=device, dtype=dt).expand(1, bh, L, S)
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": causal, "scale": None,
            "dropout_p": TUNE_DROPOUT if dropout else 0.0, "seed": TUNE_SEED}


def _runner(key: tuple):
    """A forward launch on inputs built for `key`, into fresh outputs (o, lse)."""
    a = _inputs(key)
    return lambda config: launch_attention_fwd(a["q"], a["k"], a["v"], a["mask"], a["causal"], a["scale"],
                                               a["dropout_p"], a["seed"], config=config)


def _bwd_inputs(key: tuple) -> dict:
    """_inputs plus what the backward kernels read: o, lse (default forward), a random dO, delta."""
    a = _inputs(key)
    # default configs, not the tuners' choice: no tuning of other kernels in the middle of this one's
    o, lse = launch_attention_fwd(a["q"], a["k"], a["v"], a["mask"], a["causal"], a["scale"], a["dropout_p"],
                                  a["seed"], config=attention_config(key[:7]))
    do = torch.randn_like(o)
    pkey = attention_preprocess_key(o.shape[-1], o.shape[-2], o.dtype)
    delta = launch_attention_bwd_preprocess(o, do, config=attention_bwd_preprocess_config(pkey))
    return {**a, "do": do, "lse": lse, "delta": delta}


def _bwd_args(a: dict) -> tuple:
    return (a["do"], a["q"], a["k"], a["v"], a["mask"], a["lse"], a["delta"], a["causal"], a["scale"],
            a["dropout_p"], a["seed"])


def _dkdv_runner(key: tuple):
    """A dK/dV launch on the default forward's statistics and a random dO; returns (dk, dv)."""
    args = _bwd_args(_bwd_inputs(key))
    return lambda config: launch_attention_bwd_dkdv(*args, config=config)


def _dq_runner(key: tuple):
    """A dQ launch (and the mask gradient, when the key has it); returns (dq,) or (dq, dmask)."""
    args = _bwd_args(_bwd_inputs(key))
    mask_grad = key[7]

    def launch(config: Config):
        dq, dmask = launch_attention_bwd_dq(*args, mask_grad=mask_grad, config=config)
        return (dq, dmask) if mask_grad else (dq,)

    return launch


def _preprocess_runner(key: tuple):
    """A preprocess launch on random o and dO (1, BH, L, Ev); returns delta."""
    head_dim, dtype, L = key
    dt, bh = getattr(torch, dtype), _tune_heads(L)
    o, do = (torch.randn((1, bh, L, head_dim), device=tuning_device(), dtype=dt) for _ in range(2))
    return lambda config: launch_attention_bwd_preprocess(o, do, config=config)


def _tuner(name, space, default, runner, problem=_problem):
    return register_tuner(Tuner(name, space, default, runner=runner, problem=problem,
                                sources=[attention_kernels, common_kernels], shipped=SHIPPED_CONFIGS,
                                check=reference.configs_agree))


ATTENTION_TUNER = _tuner("attention", ATTENTION_SPACE, attention_config, _runner)
ATTENTION_BWD_DKDV_TUNER = _tuner("attention_bwd_dkdv", ATTENTION_BWD_DKDV_SPACE, attention_bwd_dkdv_config,
                                  _dkdv_runner)
ATTENTION_BWD_DQ_TUNER = _tuner("attention_bwd_dq", ATTENTION_BWD_DQ_SPACE, attention_bwd_dq_config, _dq_runner)
ATTENTION_BWD_PREPROCESS_TUNER = _tuner("attention_bwd_preprocess", ATTENTION_BWD_PREPROCESS_SPACE,
                                        attention_bwd_preprocess_config, _preprocess_runner,
                                        problem=_preprocess_problem)


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


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(q k^T * scale + mask) @ v and the base-2 log-sum-exp of each row.

    q (Z, H, L, E), k (Z, HK, S, E), v (Z, HK, S, Ev), mask (Z, H, L, S) or None, any strides
    (stride 0 for broadcast dims); H a multiple of HK (query head h reads key head h // (H // HK)).
    Returns o (Z, H, L, Ev) and lse (Z * H, L), float32 (float64 for float64 inputs), in base 2
    (logsumexp / ln 2), +inf for a row with nothing to attend to.
    `config` overrides the tuner's choice (benchmarks, tuning).
    """
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    o = runtime.new_output((Z, H, L, EV), q.dtype, q.device)
    lse = runtime.new_output((Z * H, L), _lse_dtype(q.dtype), q.device)
    if o.numel() == 0:
        return o, lse
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    cfg = config or ATTENTION_TUNER.select(attention_key(E, EV, L, S, q.dtype, causal, mask_kind, dropout_p > 0))
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


def launch_attention_bwd_preprocess(o: torch.Tensor, do: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """delta = rowsum(o * do), (Z * H, L) in the lse's dtype, for o and do (Z, H, L, Ev), any strides."""
    Z, H, L, EV = o.shape
    delta = runtime.new_output((Z * H, L), _lse_dtype(o.dtype), o.device)
    if delta.numel() == 0:
        return delta
    cfg = config or ATTENTION_BWD_PREPROCESS_TUNER.select(attention_preprocess_key(EV, L, o.dtype))
    _attn_bwd_preprocess_kernel[(Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
        o, do, delta, H, L, EV, *o.stride(), *do.stride(),
        BLOCK_DV=_head_block(EV), ACC_DTYPE=acc_dtype(o.dtype), **cfg.launch_kwargs())
    return delta


def _bwd_launch_args(q, k, v, mask, causal, scale, dropout_p, seed):
    """(mask pointer, mask strides, mask kind, scalar args, constexpr kwargs) the backward kernels share."""
    E, EV = q.shape[3], v.shape[3]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    mask_t, mask_strides, mask_kind = _mask_args(mask, q)
    scalars = (scale * LOG2E, scale, dropout_p, _dropout_scale(dropout_p), seed)
    constexprs = dict(BLOCK_D=_head_block(E), BLOCK_DV=_head_block(EV), CAUSAL=causal, MASK=mask_kind,
                      DROPOUT=dropout_p > 0, ACC_DTYPE=acc_dtype(q.dtype),
                      INPUT_PRECISION=dot_input_precision(q.dtype), UPCAST=interpreter_upcast(q.dtype))
    return mask_t, mask_strides, mask_kind, scalars, constexprs


def launch_attention_bwd_dkdv(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor, causal: bool = False,
                              scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                              config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv): one program per BLOCK_N keys of a key head, looping over query rows (and the
    query heads of its GQA group). Shapes as in `launch_attention_fwd`."""
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
                            mask: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor, causal: bool = False,
                            scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                            mask_grad: bool = False, config: Config | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dq, dmask): one program per BLOCK_M query rows, looping over keys; dmask, the additive
    mask's gradient (Z, H, L, S) unreduced, when `mask_grad` (else None)."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    dq = runtime.new_output(q.shape, q.dtype, q.device)
    dmask = runtime.new_output((Z, H, L, S), mask.dtype, q.device) if mask_grad else None
    if dq.numel() == 0 and (dmask is None or dmask.numel() == 0):
        return dq, dmask
    mask_t, mask_strides, mask_kind, scalars, constexprs = _bwd_launch_args(q, k, v, mask, causal, scale,
                                                                            dropout_p, seed)
    cfg = config or ATTENTION_BWD_DQ_TUNER.select(
        attention_dq_key(E, EV, L, S, q.dtype, causal, mask_kind, dropout_p > 0, mask_grad))
    _attn_bwd_dq_kernel[(Z * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
        q, k, v, mask_t, do, lse, delta, dq, dmask if dmask is not None else dq, *scalars,
        H, H // HK, L, S, E, EV,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride(), *dq.stride(),
        *(dmask.stride() if dmask is not None else (0, 0, 0, 0)),
        MASK_GRAD=dmask is not None, **constexprs, **cfg.launch_kwargs())
    return dq, dmask


def launch_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
                         causal: bool = False, scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                         mask_grad: bool = False, dkdv_config: Config | None = None,
                         dq_config: Config | None = None, need_dq: bool = True, need_dkdv: bool = True):
    """dq, dk, dv (and the additive mask's gradient, (Z, H, L, S) unreduced, when `mask_grad`)
    from do (Z, H, L, Ev) and the forward's o and lse; shapes as in `launch_attention_fwd`.

    Three launches: delta = rowsum(o * do); dK/dV per key block (skipped unless `need_dkdv`:
    dk, dv None); dQ per query block (skipped unless `need_dq` or `mask_grad`: dq None).
    """
    delta = launch_attention_bwd_preprocess(o, do)
    args = (do, q, k, v, mask, lse, delta, causal, scale, dropout_p, seed)
    dk = dv = dq = dmask = None
    if need_dkdv:
        dk, dv = launch_attention_bwd_dkdv(*args, config=dkdv_config)
    if need_dq or mask_grad:
        dq, dmask = launch_attention_bwd_dq(*args, mask_grad=mask_grad, config=dq_config)
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
    batch = _batch_shape(query, key, value, enable_gqa)  # raises for batch dims that do not broadcast
    if attn_mask is not None and tuple(torch.broadcast_shapes(attn_mask.shape, (*batch, L, S))) != (*batch, L, S):
        raise RuntimeError(f"tritonops.attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                           f"to {(*batch, L, S)}")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    dropout_p = float(dropout_p) if dropout_p > 0 else 0.0
    if use_reference("attention", device) or E == 0 or EV == 0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if max(E, EV) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"tritonops.attention: head dims up to {MAX_HEAD_DIM} are supported, got E={E}, Ev={EV}")
    seed = draw_dropout_seed() if dropout_p > 0 else 0
    return attention_op(query, key, value, attn_mask, dropout_p, bool(is_causal), scale, seed, bool(enable_gqa))[0]


# --------------------------------------------------------------------------- the `autotune` command

LLM_SHAPES = [(n, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192, 16384)]
TUNE_DTYPES = ("float16", "bfloat16", "float32")


def _tune_keys(shape: tuple, dtype: str):
    """The four kernels' keys for q (BH, L, E), k and v (BH, S, E), no mask, no dropout: forward,
    dK/dV and dQ both non-causal and causal, and the preprocess."""
    if dtype not in TUNE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(TUNE_DTYPES)}")
    L, S, E = shape
    if E > MAX_HEAD_DIM:
        raise ValueError(f"head dim {E}: at most {MAX_HEAD_DIM}")
    dt = getattr(torch, dtype)
    pairs = []
    for causal in (False, True):
        key = attention_key(E, E, L, S, dt, causal)
        pairs += [(ATTENTION_TUNER, key), (ATTENTION_BWD_DKDV_TUNER, key),
                  (ATTENTION_BWD_DQ_TUNER, attention_dq_key(E, E, L, S, dt, causal))]
    return pairs + [(ATTENTION_BWD_PREPROCESS_TUNER, attention_preprocess_key(E, L, dt))]


register(TunableOp(
    "attention", "LxSxE", _tune_keys, {"llm": LLM_SHAPES, "smoke": [(40, 33, 24)]},
    help="scaled_dot_product_attention, L queries, S keys, head dim E; forward and backward, causal and not "
         f"(the runner's problem has max({TUNE_MIN_HEADS}, {TUNE_ROWS} // L) batch x heads)"))
