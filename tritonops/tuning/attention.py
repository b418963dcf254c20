"""Config choice of the attention kernels (forward; backward dK/dV, dQ and preprocess): the
keys, the heuristic defaults, the search spaces, the tuning runners, the Tuners and the
`autotune` op."""

import functools
from typing import NamedTuple

import torch
import triton

from autotune import Config, Space, TunableOp, Tuner, bucket, register, register_tuner

from .. import runtime
from ..kernels.attention import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel,
                                 _attn_fwd_kernel)
from ..ops._common import padded_dim
from .common import ITEMSIZE, SHIPPED_CONFIGS, check_dtype, dtype_name, tuning_device

MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------- keys
# L and S are bucketed to powers of two: blocks depend only on next_pow2(L / S). The mask
# (an L x S read per tile) and dropout (Philox per score) change the work per tile, so the
# best tile; GQA is left out: it only shrinks the dK/dV grid, as a smaller batch does, and
# neither batch nor heads are in the key.


class AttentionKey(NamedTuple):
    """A problem of the forward and of the dK/dV kernel."""

    D: int  # head dim padded to a power of two (max over E and Ev)
    causal: bool
    dtype: str
    L: int  # bucketed query length
    S: int  # bucketed key length
    mask: str  # "none" | "bool" | "add"
    dropout: bool


class AttentionDqKey(NamedTuple):
    """A problem of the dQ kernel: AttentionKey and whether it writes the L x S gradient of
    an additive mask."""

    D: int
    causal: bool
    dtype: str
    L: int
    S: int
    mask: str
    dropout: bool
    mask_grad: bool


class AttentionPreprocessKey(NamedTuple):
    """A problem of the backward's preprocess, delta0 = rowsum(O * dO)."""

    D: int  # Ev padded to a power of two
    dtype: str
    L: int  # bucketed


def attention_key(E: int, EV: int, L: int, S: int, dtype: torch.dtype | str, causal: bool, mask_kind: str = "none",
                  dropout: bool = False) -> AttentionKey:
    return AttentionKey(max(padded_dim(E), padded_dim(EV)), bool(causal), dtype_name(dtype), bucket(L), bucket(S),
                        mask_kind, bool(dropout))


def attention_dq_key(E: int, EV: int, L: int, S: int, dtype: torch.dtype | str, causal: bool,
                     mask_kind: str = "none", dropout: bool = False, mask_grad: bool = False) -> AttentionDqKey:
    return AttentionDqKey(*attention_key(E, EV, L, S, dtype, causal, mask_kind, dropout), bool(mask_grad))


def attention_preprocess_key(EV: int, L: int, dtype: torch.dtype | str) -> AttentionPreprocessKey:
    return AttentionPreprocessKey(padded_dim(EV), dtype_name(dtype), bucket(L))


class AttentionSplitKey(NamedTuple):
    """A problem of the split-key forward (short queries, many keys: decoding)."""

    D: int  # head dim padded to a power of two (max over E and Ev)
    causal: bool
    dtype: str
    rows: int  # bucketed query rows of a GQA group (group size x L), the rows a program packs
    S: int  # bucketed key length


def attention_split_key(E: int, EV: int, rows: int, S: int, dtype: torch.dtype | str,
                        causal: bool) -> AttentionSplitKey:
    return AttentionSplitKey(max(padded_dim(E), padded_dim(EV)), bool(causal), dtype_name(dtype), bucket(rows),
                             bucket(S))


# --------------------------------------------------------------------------- heuristic defaults
# The defaults are leads for Hopper (Inductor's H100 defaults, the Triton FA2 tutorial),
# to be replaced by tuned winners; the interpreter cannot judge them.

SMEM_BUDGET = 200 * 1024  # bytes a default may use: under Hopper's 227 KB, room for the compiler's own
REGISTER_VALUES = 256  # fp32 accumulator + score values per thread a config may hold (255 registers max)
# The forward's budget, measured (compiled for sm90 as the JIT compiles, Triton 3.6 and 3.9, 16-bit,
# causal, head dims 64-256, descriptor and pointer loads): every tile of up to 144 score +
# accumulator values per thread compiled without spills, in 82-254 registers; from 160 on the
# pointer loads spill (d64 128x128 4 warps: 192, 56-92 B; d128 128x32 4 warps: 160, 56 B; d256
# 64x64 4 warps: 160, 24 B; d128 128x64 4 warps: 192, 464-520 B).
FWD_REGISTER_VALUES = 144
# ... and with a mask or dropout (a mask tile, Philox bits per score), on the pointer loads those
# take: up to 80 values compiled without spills; d64 128x128 8 warps, d128 128x64 8 warps and
# d128 64x64 4 warps (96 values) spill 8-104 B, d256 64x32 4 warps (144) 60 B.
FWD_MASKED_REGISTER_VALUES = 80
# Shared memory a forward config leaves free under the device's limit: 229 KB of 227 KB-limit
# (d128 128x128, 3 stages: 3 KB under Hopper's 232448 B) is too close to be worth a compile.
FWD_SMEM_MARGIN = 8 * 1024
FWD_8_WARP_TILE = 128 * 64  # the smallest forward BLOCK_M x BLOCK_N tile worth 8 warps on sm90
BWD_8_WARP_BLOCK = 64  # the smallest block a backward program owns (dK/dV: BLOCK_N, dQ: BLOCK_M) for 8 warps


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


def _fwd_values(block_m: int, block_n: int, head_dim: int, warps: int) -> float:
    """fp32 score (BLOCK_M x BLOCK_N) and accumulator (BLOCK_M x D) values per thread."""
    return (block_m * block_n + block_m * head_dim) / (32 * warps)


def _fwd_value_budget(mask_or_dropout: bool) -> int:
    return FWD_MASKED_REGISTER_VALUES if mask_or_dropout else FWD_REGISTER_VALUES


def attention_config(key: AttentionKey) -> Config:
    """Forward default for an attention_key: BLOCK_M query rows per program, stepping BLOCK_N keys.

    Inductor's H100 bf16 defaults (BM, BN, stages, warps): head dim <= 64 (128, 128, 3, 4),
    <= 128 (128, 64, 3, 8), <= 256 (64, 32, 3, 4); at d64 with 8 warps here, as 4 spill
    (FWD_REGISTER_VALUES). 4-byte types halve BLOCK_N (twice the bytes per tile), 8-byte ones
    (interpreter only) halve it again. float32 takes FLOAT32_TILES (pruned to the extents), as
    the halved tiles spill on its FMA dots. BLOCK_N then shrinks (and for float64 the stages drop)
    until Q and 3 stages of K and V fit in shared memory; BLOCK_M and BLOCK_N are pruned to
    next_pow2(L) and next_pow2(S) (at least 16), a tile under 128 x 64 uses 4 warps, and
    the tile halves (the wider of its sides) while its values per thread pass the budget
    (FWD_REGISTER_VALUES, FWD_MASKED_REGISTER_VALUES with a mask or dropout): with a mask or
    dropout d64 128 x 64, d128 64 x 32, d256 32 x 32; with dropout d64 64 x 32 and d256 on 2
    stages, where the larger tiles still spill.
    """
    itemsize = ITEMSIZE[key.dtype]
    if key.dtype == "float32":
        bm, bn, warps, stages = _by_head_dim(key.D, *FLOAT32_TILES["fwd"])
        return Config({"BLOCK_M": _prune(bm, key.L), "BLOCK_N": _prune(bn, key.S)}, num_warps=warps,
                      num_stages=stages)
    bm, bn, stages, warps = _by_head_dim(key.D, (128, 128, 3, 8), (128, 64, 3, 8), (64, 32, 3, 4))
    bm, bn = _prune(bm, key.L), _prune(_narrow(bn, itemsize), key.S)
    bn, stages = _fit_smem(bm, bn, key.D, itemsize, stages)
    if key.dropout:
        # Dropout's Philox bits per score, compiled for sm90 (Triton 3.9 and 3.6, bf16, GQA, a
        # seed other than 1, which the JIT would fold): d64 128 x 64 with 8 warps spills 8-40 B
        # (64 x 32, which the loop below makes of 128 x 32: 128-167 registers, clean); d256
        # 32 x 32 with 3 stages 16 B (2 stages: 224-239 registers, clean).
        if key.D <= 64:
            bn = min(bn, 32)
        elif key.D > 128:
            stages = min(stages, 2)
    budget = _fwd_value_budget(key.mask != "none" or key.dropout)
    while True:
        if bm < 128 or bm * bn < FWD_8_WARP_TILE:
            warps = 4
        if bm * bn == 256 or _fwd_values(bm, bn, key.D, warps) <= budget:
            break
        if bn >= bm and bn > 16:
            bn //= 2
        else:
            bm //= 2
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# float32 at torch's default "ieee" precision computes its dots exactly on the FMA units (no
# tensor cores), with both operand tiles in registers; compiled for sm90 (Triton 3.9, bool
# mask, dropout, causal, GQA) every default of the 2-byte rules halved spilled kilobytes
# (forward d80 64 x 32: 7376 B; dQ 2652-4508 B; dK/dV 5068 B). The largest tiles found without
# spills, (BLOCK_M, BLOCK_N, warps, stages) for head dims <= 64, <= 128, <= 256:
# - forward: 32 x 32 at d64 (134 registers; d128: 3068-3724 B), 32 x 16 at d128 (198-214;
#   16 x 32 spills 1292-1884 B), 32 x 16 at d256 (212-222);
# - dK/dV: 16 x 32 at d64 (190; 32 x 32 spills 96 B), 32 x 16 at d128 (192; 16 x 32 spills
#   88 B, 32 x 32 1968 B and more), 16 x 16 at d256 (194);
# - dQ: 32 x 16 at d64 (254 registers, no spills), 16 x 16 at d128 (32 x 32 spills 2324 B)
#   and d256, where nothing is clean: 16 x 16 spills least (16 B with 2 stages; 1 stage
#   8936 B, 32 x 16 6312 B);
# - the split-key forward (32 query heads over 8, 16 queries, 8192 keys): 16 x 32 at d64 (166
#   registers), 32 x 16 at d128 (200; 16 x 16 spills 24 B at 72 registers, 16 x 32 1736 B),
#   16 x 16 at d256 (118; 32 x 16 spills 4972 B); its 2-byte 64 x 64 spilled 7276 B here.
FLOAT32_TILES = {
    "fwd": ((32, 32, 4, 2), (32, 16, 4, 2), (32, 16, 4, 2)),
    "dkdv": ((16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)),
    "dq": ((32, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
    "split": ((16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)),
}


def _wide_dkdv_config(key: AttentionKey) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of dK/dV for float32 (FLOAT32_TILES) and float64
    (interpreter only: the FA2 tutorial's tiles, BLOCK_N quartered)."""
    if key.dtype == "float32":
        return _by_head_dim(key.D, *FLOAT32_TILES["dkdv"])
    bm, bn, warps, stages = _by_head_dim(key.D, (32, 128, 8, 3), (32, 128, 8, 2), (16, 32, 4, 1))
    return bm, _narrow(bn, ITEMSIZE[key.dtype]), warps, stages


def _wide_dq_config(key: AttentionDqKey) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of dQ for float32 (FLOAT32_TILES) and float64
    (interpreter only: the FA2 tutorial's tiles, BLOCK_M quartered)."""
    if key.dtype == "float32":
        return _by_head_dim(key.D, *FLOAT32_TILES["dq"])
    bm, bn, warps, stages = _by_head_dim(key.D, (128, 32, 4, 3), (128, 32, 8, 2), (64, 16, 8, 2))
    return _narrow(bm, ITEMSIZE[key.dtype]), bn, warps, stages


def attention_bwd_dkdv_config(key: AttentionKey) -> Config:
    """dK/dV default for an attention_key: BLOCK_N keys per program (their dK, dV accumulators
    stay in registers), stepping BLOCK_M query rows.

    From the Triton FA2 tutorial on H100 (BLOCK_N1 = 128, BLOCK_M1 = 32), moved off the
    configs that spill compiled for sm90 (Triton 3.9 and 3.6, fp16 and bf16, L = S = 2048,
    causal or not, every mask kind, dropout or not). The key has no GQA field, and a GQA
    group (H > HK) costs registers here: the program loops over the group's query heads at
    run time (with one head the JIT folds that loop), so each default is clean for H = 2 HK,
    the worst case. 16-bit (BLOCK_M, BLOCK_N, warps, stages):
    - head dim <= 64: (32, 128, 8, 3); with dropout (16, 128, 8, 3), as 32 x 128 spills
      44-88 B causal with GQA and a mask, 112 B without one on Triton 3.6 (with 4 warps it
      spills 344-480 B causal);
    - <= 128: (16, 128, 8, 2) without mask or dropout (32 x 128 spills 256 B causal with GQA);
      with a mask (16, 32, 4, 1): 16 x 64 with 8 warps spills 12-248 B (52 B with dropout
      alone), 16 x 32 with 2 stages 36 B, 32 x 128 up to 1072 B (bool mask, dropout, causal,
      GQA); with dropout (16, 16, 4, 3), 1 stage with an additive mask (16 x 32 with 1 stage
      spills 40 B with a mask on Triton 3.6; 16 x 16 with 3 stages 24 B with an additive mask
      there, with 1 stage 12 B without one);
    - <= 256: (16, 16, 4, 2), 1 stage with a mask or dropout (16 x 32 with 1 stage spills
      144-676 B causal; 16 x 16 with 2 stages 196-284 B with a mask and dropout, 48 B with
      dropout alone on Triton 3.6).
    4- and 8-byte types: `_wide_dkdv_config`. Blocks are pruned to the extents as in
    `attention_config`; a BLOCK_N under 64 uses 4 warps.
    """
    masked = key.mask != "none"
    if ITEMSIZE[key.dtype] > 2:
        bm, bn, warps, stages = _wide_dkdv_config(key)
    elif key.D <= 64:
        bm, bn, warps, stages = (16 if key.dropout else 32), 128, 8, 3
    elif key.D <= 128:
        if key.dropout:  # 16 x 32 with 1 stage spills 40 B with a mask and dropout on Triton 3.6
            bm, bn, warps, stages = (16, 16, 4, 1) if key.mask == "add" else (16, 16, 4, 3)
        else:
            bm, bn, warps, stages = (16, 32, 4, 1) if masked else (16, 128, 8, 2)
    else:
        bm, bn, warps, stages = 16, 16, 4, (1 if masked or key.dropout else 2)
    bm, bn = _prune(bm, key.L), _prune(bn, key.S)
    if bn < BWD_8_WARP_BLOCK:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def attention_bwd_dq_config(key: AttentionDqKey) -> Config:
    """dQ default for an attention_dq_key: BLOCK_M query rows per program (dQ accumulator in
    registers), stepping BLOCK_N keys, twice (the first pass forms delta: the same tiles and
    scores, two row sums in place of the dQ accumulator).

    The mirror of the dK/dV tiles (Triton FA2 tutorial: BLOCK_M2 = 128, BLOCK_N2 = 32), moved
    off the configs that spill compiled for sm90 (Triton 3.9 and 3.6, fp16 and bf16, as for
    dK/dV, with the exact-delta pass and the mask gradient): head dim <= 64 (128, 32, 4 warps,
    3 stages), 8 warps with dropout or a mask (4 spill 92-692 B with dropout, 160 B with an
    additive mask on Triton 3.6; 8 use 162-211 registers);
    <= 128 (128, 32, 8 warps, 2 stages); <= 256 (64, 16, 8 warps, 2 stages), with a mask or
    dropout (16, 16, 4 warps, 2 stages: 156-168 registers), as 64 x 16 spills 24-360 B
    (8 warps) and 156-344 B (4 warps), 32 x 16 16-80 B in some cases. 4- and 8-byte types: `_wide_dq_config`. Blocks are pruned to the extents; a
    BLOCK_M under 64 uses 4 warps.
    """
    if ITEMSIZE[key.dtype] > 2:
        bm, bn, warps, stages = _wide_dq_config(key)
    elif key.D <= 64:
        bm, bn, warps, stages = 128, 32, (8 if key.dropout or key.mask != "none" else 4), 3
    elif key.D <= 128:
        bm, bn, warps, stages = 128, 32, 8, 2
    else:
        bm, bn, warps, stages = (16, 16, 4, 2) if key.mask != "none" or key.dropout else (64, 16, 8, 2)
    bm, bn = _prune(bm, key.L), _prune(bn, key.S)
    if bm < BWD_8_WARP_BLOCK:
        warps = 4
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The split-key forward serves query lengths up to SPLIT_MAX_L, without a mask or dropout (those
# take the regular forward). Its programs: batch x key heads x row blocks x key splits.
SPLIT_MAX_L = 16
SPLIT_MAX_BLOCK_M = 64  # rows of a GQA group a program packs (more: several row blocks)
SPLIT_PROGRAMS_PER_SM = 2  # the default's target: programs = PROGRAMS_PER_SM x SMs


@functools.lru_cache(maxsize=None)  # asked on every decode step; its key is bucketed
def attention_split_config(key: AttentionSplitKey) -> Config:
    """Split-key forward default: BLOCK_M packed query rows (the group's heads x L queries,
    16 to SPLIT_MAX_BLOCK_M: tl.dot needs 16), stepping BLOCK_N keys through a 3-stage
    pipeline of K and V (memory-bound: the tile is small, the stream of keys long), 4 warps;
    BLOCK_N 64 for 2-byte types up to head dim 128, 32 at 256, halved for each doubling of
    the element size and pruned to S; float32 FLOAT32_TILES. Host parameter PROGRAMS_PER_SM:
    the split count is chosen to give the GPU that many programs per SM (`split_count`)."""
    itemsize = ITEMSIZE[key.dtype]
    if key.dtype == "float32":
        bm, bn, warps, stages = _by_head_dim(key.D, *FLOAT32_TILES["split"])
        return Config({"BLOCK_M": _prune(bm, key.rows), "BLOCK_N": _prune(bn, key.S)}, num_warps=warps,
                      num_stages=stages, host={"PROGRAMS_PER_SM": SPLIT_PROGRAMS_PER_SM})
    bm = _prune(SPLIT_MAX_BLOCK_M, key.rows)
    bn = _prune(_narrow(64 if key.D <= 128 else 32, itemsize), key.S)
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=3,
                  host={"PROGRAMS_PER_SM": SPLIT_PROGRAMS_PER_SM})


def split_count(keys: int, block_n: int, programs: int, target_programs: int) -> tuple[int, int]:
    """(splits, keys per split) for `keys` keys stepped BLOCK_N at a time, when `programs`
    programs (batch x key heads x row blocks) each take one slice: slices of whole blocks,
    as many blocks each as still gives at least target_programs programs in all (one slice
    of every key when the programs alone reach it)."""
    blocks = triton.cdiv(keys, block_n)
    per_split = max(1, blocks // max(1, triton.cdiv(target_programs, max(programs, 1))))
    return triton.cdiv(blocks, per_split), per_split * block_n


def attention_bwd_preprocess_config(key: AttentionPreprocessKey) -> Config:
    """delta0 = rowsum(O * dO), for an attention_preprocess_key: memory-bound; 64 rows
    (fewer for a short L, 16 for a head wider than 128), 4 warps, no pipeline."""
    bm = 16 if key.D > 128 else 64
    return Config({"BLOCK_M": _prune(bm, key.L)}, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------- search spaces
# The shared-memory estimates are what Triton 3.6 and 3.9 allocate compiling these kernels for
# sm90 with the JIT's specialisation of the arguments (16-byte divisibility): every stage of
# the pipelined loops holds its own K/V (or Q/dO) tiles, 16-bit and float32 alike; the forward
# on tensor descriptors adds its barriers (1 KB at 3 stages), inside FWD_SMEM_MARGIN.
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


def _problem(key: AttentionKey | AttentionDqKey) -> dict:
    return {"L": key.L, "S": key.S, "D": key.D, "itemsize": ITEMSIZE[key.dtype],
            "sm": runtime.device_properties()["capability"][0], "masked": key.mask != "none" or key.dropout}


def _fwd_smem_bytes(config: Config, problem: dict) -> int:
    """The forward's shared memory and FWD_SMEM_MARGIN: configs within the margin of the
    device's limit are dropped with those over it."""
    return _fwd_smem(config["BLOCK_M"], config["BLOCK_N"], config.num_stages, problem["D"],
                     problem["itemsize"]) + FWD_SMEM_MARGIN


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
    """The BLOCK_M x BLOCK_N scores and the BLOCK_M x D accumulator fit in registers without
    spills (FWD_REGISTER_VALUES per thread, FWD_MASKED_REGISTER_VALUES with a mask or dropout);
    and a tile of 64 rows or more steps no more keys than it has rows: 64 x 128 spills at d128
    with 4 warps (136 B) and at d256 with 8 (56 B)."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if bm >= 64 and bn > bm:
        return False
    budget = _fwd_value_budget(problem.get("masked", False))
    return _fwd_values(bm, bn, problem.get("D", 16), config.num_warps) <= budget


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


def _preprocess_problem(key: AttentionPreprocessKey) -> dict:
    return {"L": key.L, "D": key.D, "itemsize": ITEMSIZE[key.dtype]}


def _preprocess_registers(config: Config, problem: dict) -> bool:
    """The O and dO tiles (BLOCK_M x Ev each, fp32) fit in registers."""
    return _values_per_thread(config, 2 * config["BLOCK_M"] * problem.get("D", 16))


_BLOCK_DIMS = {"BLOCK_M": "L", "BLOCK_N": "S"}

ATTENTION_SPACE = Space(
    {"BLOCK_M": BLOCKS, "BLOCK_N": BLOCKS}, num_warps=WARPS, num_stages=STAGES, smem_bytes=_fwd_smem_bytes,
    block_dims=_BLOCK_DIMS, dot_params=["BLOCK_M", "BLOCK_N"], constraints=[_fwd_registers, _fwd_warps], version=2)

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


def _inputs(key: AttentionKey | AttentionDqKey) -> dict:
    """q, k, v (1, BH, L|S, D) for a key (E = Ev = the key's head dim), the mask its kind
    asks for ((L, S), broadcast over the heads), and dropout's p and seed."""
    L, S = key.L, key.S
    dt, device, bh = getattr(torch, key.dtype), tuning_device(), _tune_heads(L)
    q, k, v = (torch.randn((1, bh, n, key.D), device=device, dtype=dt) for n in (L, S, S))
    mask = None
    if key.mask == "bool":
        mask = (torch.rand((L, S), device=device) > 0.1).expand(1, bh, L, S)
    elif key.mask == "add":
        mask = torch.randn((L, S), device=device, dtype=dt).expand(1, bh, L, S)
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": key.causal, "scale": None,
            "dropout_p": TUNE_DROPOUT if key.dropout else 0.0, "seed": TUNE_SEED}


def _runner(key: AttentionKey):
    """A forward launch on inputs built for `key`, into fresh outputs (o, lse)."""
    from ..ops.attention import launch_attention_fwd  # the ops import this module for the Tuners

    a = _inputs(key)
    return lambda config: launch_attention_fwd(a["q"], a["k"], a["v"], a["mask"], a["causal"], a["scale"],
                                               a["dropout_p"], a["seed"], config=config)


def _bwd_inputs(key: AttentionKey | AttentionDqKey) -> dict:
    """_inputs plus what the backward kernels read: o, lse (default forward), a random dO, and
    the preprocess's delta0 (which the dQ kernel reads)."""
    from ..ops.attention import launch_attention_bwd_preprocess, launch_attention_fwd

    a = _inputs(key)
    # default configs, not the tuners' choice: no tuning of other kernels in the middle of this one's
    o, lse = launch_attention_fwd(a["q"], a["k"], a["v"], a["mask"], a["causal"], a["scale"], a["dropout_p"],
                                  a["seed"], config=attention_config(key))
    do = torch.randn_like(o)
    pkey = attention_preprocess_key(o.shape[-1], o.shape[-2], o.dtype)
    delta0 = launch_attention_bwd_preprocess(o, do, config=attention_bwd_preprocess_config(pkey))
    return {**a, "do": do, "lse": lse, "delta0": delta0}


def _bwd_args(a: dict, delta: torch.Tensor) -> tuple:
    return (a["do"], a["q"], a["k"], a["v"], a["mask"], a["lse"], delta, a["causal"], a["scale"],
            a["dropout_p"], a["seed"])


def _dkdv_runner(key: AttentionKey):
    """A dK/dV launch on the default forward's statistics, a random dO and the delta the
    default dQ config forms from them; returns (dk, dv)."""
    from ..ops.attention import exact_delta_enabled, launch_attention_bwd_dkdv, launch_attention_bwd_dq

    a = _bwd_inputs(key)
    dq_key = attention_dq_key(key.D, key.D, key.L, key.S, key.dtype, key.causal, key.mask, key.dropout)
    _, _, delta = launch_attention_bwd_dq(*_bwd_args(a, a["delta0"]), config=attention_bwd_dq_config(dq_key),
                                         need_dq=False, exact_delta=exact_delta_enabled())
    args = _bwd_args(a, delta)
    return lambda config: launch_attention_bwd_dkdv(*args, config=config)


def _dq_runner(key: AttentionDqKey):
    """A dQ launch (and the mask gradient, when the key has it); returns (dq, delta) or
    (dq, dmask, delta)."""
    from ..ops.attention import exact_delta_enabled, launch_attention_bwd_dq

    a = _bwd_inputs(key)
    args = _bwd_args(a, a["delta0"])
    exact = exact_delta_enabled()  # timed as the backward will run it

    def launch(config: Config):
        dq, dmask, delta = launch_attention_bwd_dq(*args, mask_grad=key.mask_grad, config=config,
                                                   exact_delta=exact)
        return (dq, dmask, delta) if key.mask_grad else (dq, delta)

    return launch


def _preprocess_runner(key: AttentionPreprocessKey):
    """A preprocess launch on random o and dO (1, BH, L, Ev); returns delta."""
    from ..ops.attention import launch_attention_bwd_preprocess

    dt, bh = getattr(torch, key.dtype), _tune_heads(key.L)
    o, do = (torch.randn((1, bh, key.L, key.D), device=tuning_device(), dtype=dt) for _ in range(2))
    return lambda config: launch_attention_bwd_preprocess(o, do, config=config)


def _tuner(name, space, default, runner, kernel, key_type, problem=_problem):
    return register_tuner(Tuner(name, space, default, runner=runner, problem=problem, key_type=key_type,
                                sources=[kernel], shipped=SHIPPED_CONFIGS))


ATTENTION_TUNER = _tuner("attention", ATTENTION_SPACE, attention_config, _runner, _attn_fwd_kernel, AttentionKey)
ATTENTION_BWD_DKDV_TUNER = _tuner("attention_bwd_dkdv", ATTENTION_BWD_DKDV_SPACE, attention_bwd_dkdv_config,
                                  _dkdv_runner, _attn_bwd_dkdv_kernel, AttentionKey)
ATTENTION_BWD_DQ_TUNER = _tuner("attention_bwd_dq", ATTENTION_BWD_DQ_SPACE, attention_bwd_dq_config, _dq_runner,
                                _attn_bwd_dq_kernel, AttentionDqKey)
ATTENTION_BWD_PREPROCESS_TUNER = _tuner("attention_bwd_preprocess", ATTENTION_BWD_PREPROCESS_SPACE,
                                        attention_bwd_preprocess_config, _preprocess_runner,
                                        _attn_bwd_preprocess_kernel, AttentionPreprocessKey,
                                        problem=_preprocess_problem)


# --------------------------------------------------------------------------- the `autotune` command

# largest first: under a time cap (`--op-seconds`) the problems that take the most GPU time are tuned first
LLM_SHAPES = sorted(((n, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192, 16384)),
                    key=lambda s: -s[0] * s[1] * s[2])
TUNE_DTYPES = ("float16", "bfloat16", "float32")


def _tune_keys(shape: tuple, dtype: str):
    """The four kernels' keys for q (BH, L, E), k and v (BH, S, E), no mask, no dropout: forward,
    dK/dV and dQ both non-causal and causal, and the preprocess."""
    check_dtype(dtype, TUNE_DTYPES)
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

