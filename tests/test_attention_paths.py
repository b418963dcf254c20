"""The forward's kernel choice: the regular forward on tensor descriptors (TMA) or on pointer
loads, and the split-key forward for short queries against many keys, each against torch
(float64 reference, torch at the same precision for the error bar), with the launches
recorded so a test fails if the launcher silently took another kernel."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from autotune import Config
from tritonops import runtime, testing
from tritonops.kernels import attention as attn_kernels
from tritonops.ops import attention as attn_ops
from tritonops.ops.attention import attention
from tritonops.tuning import attention as attn_tuning

from .utils import check_op, qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
sdpa = F.scaled_dot_product_attention
FORWARD_KERNELS = ("_attn_fwd_kernel", "_attn_fwd_split_kernel", "_attn_split_merge_kernel")


class _Recorder:
    """Stands in for a kernel in the ops module: records each launch's kernel name (and its
    TMA flag, where it has one), then launches the real kernel."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((self.kernel.__name__, kwargs.get("TMA")))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    """The forward kernels' launches, in order, as (name, TMA flag or None)."""
    seen = []
    for name in FORWARD_KERNELS:
        monkeypatch.setattr(attn_ops, name, _Recorder(getattr(attn_ops, name), seen))
    return seen


# --------------------------------------------------------------------------- the regular forward on descriptors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 37, 53, 64, 64),  # GQA, tails in L and S
    (1, 2, 2, 45, 29, 80, 48),  # head dim 80 (a padded block), Ev != E, L > S
], ids=lambda s: "B{}H{}HK{}L{}S{}E{}Ev{}".format(*s))
def test_descriptor_forward(device, launches, dtype, causal, shape):
    B, H, HK, L, S, E, EV = shape
    q, k, v = qkv(B, H, L, S, E, EV, dtype=dtype, device=device, HK=HK)
    assert attn_ops.attention_fwd_plan(q, k, v, None, causal).kernel == "tma"
    check_op(attention, sdpa, q, k, v, is_causal=causal, enable_gqa=HK != H)
    assert launches and all(launch == ("_attn_fwd_kernel", True) for launch in launches)


def _odd_layouts(dtype, device):
    """(name, q, k, v): layouts a descriptor cannot read, each in one operand."""
    B, H, L, S, E = 1, 2, 21, 27, 32
    q, k, v = qkv(B, H, L, S, E, dtype=dtype, device=device)
    # every other element of a wider head: head-dim stride 2
    strided_q = torch.randn(B, H, L, 2 * E, dtype=dtype, device=device)[..., ::2]
    # one element past an aligned allocation: a base address off 16 bytes
    shifted_k = torch.randn(B * H * S * E + 1, dtype=dtype, device=device)[1:].view(B, H, S, E)
    # rows 36 elements apart (72 or 144 bytes): 16-byte aligned only for float32
    padded_v = torch.randn(B, H, S, 36, dtype=dtype, device=device)[..., :E]
    # heads one element more than their rows apart: aligned rows, a head base off 16 bytes
    heads_v = torch.randn(B, H, S * E + 1, dtype=dtype, device=device)[..., :S * E].view(B, H, S, E)
    cases = [("head_dim_stride", strided_q, k, v), ("base_address", q, shifted_k, v),
             ("head_stride", q, k, heads_v)]
    if dtype != torch.float32:
        cases.append(("row_stride", q, k, padded_v))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_descriptors_cannot_read_take_the_pointer_path(device, launches, dtype):
    for name, q, k, v in _odd_layouts(dtype, device):
        launches.clear()
        assert attn_ops.attention_fwd_plan(q, k, v, None, True).kernel == "pointer", name
        out = attention(q, k, v, is_causal=True)
        ref = sdpa(q.double(), k.double(), v.double(), is_causal=True)
        testing.assert_close(out, ref, sdpa(q, k, v, is_causal=True), what=name)
        assert launches == [("_attn_fwd_kernel", False)], name


def test_descriptor_layout_rule():
    """What decides the path: contiguous 16-bit operands whose rows are 16-byte multiples
    take descriptors; float32 and float64, rows of 8 bytes, broadcast (stride-0) batch and head
    dims (every head at one aligned address), a mask and dropout decide as they should."""
    q, k, v = qkv(1, 2, 20, 30, 16, dtype=torch.float16)
    plan = attn_ops.attention_fwd_plan
    assert plan(q, k, v).kernel == "tma"
    assert plan(q.double(), k.double(), v.double()).kernel == "pointer"
    assert plan(q.float(), k.float(), v.float()).kernel == "pointer"
    narrow = [t[..., :4].contiguous() for t in (q, k, v)]  # 4 x 2 bytes a row
    assert plan(*narrow).kernel == "pointer"
    padded_v = torch.randn(1, 2, 30, 8, dtype=torch.float16)[..., :4]  # 16-byte rows, 4 values each
    assert plan(q, k, padded_v).kernel == "pointer"  # the output's rows (4 x 2 bytes) decide too
    assert plan(q, k[:1, :1].expand(1, 2, 30, 16), v).kernel == "tma"
    assert plan(q, k, v, torch.ones(1, 2, 20, 30, dtype=torch.bool)).kernel == "pointer"
    assert plan(q, k, v, dropout_p=0.2).kernel == "pointer"


def test_explicit_config_keeps_its_tile(launches):
    """`config=` selects the regular forward's tile, whatever the path, also for one query row."""
    cfg = Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    q, k, v = qkv(1, 4, 1, 300, 32, HK=2, dtype=torch.float16)
    plan = attn_ops.attention_fwd_plan(q, k, v, config=cfg)
    assert plan.kernel == "tma" and plan.config is cfg
    o, lse = attn_ops.launch_attention_fwd(q, k, v, config=cfg)
    assert launches == [("_attn_fwd_kernel", True)]
    testing.assert_close(o, sdpa(q.double(), k.double(), v.double(), enable_gqa=True),
                         sdpa(q, k, v, enable_gqa=True), torch.float16)


# --------------------------------------------------------------------------- the split-key forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 1, 300, 64, 64),  # one query row per head, GQA pairs, a key tail (300 = 4 x 64 + 44)
    (1, 6, 2, 7, 131, 32, 48),  # seven rows, groups of three: 21 packed rows, one block
], ids=lambda s: "B{}H{}HK{}L{}S{}E{}Ev{}".format(*s))
def test_split_forward_and_backward(device, launches, dtype, shape):
    B, H, HK, L, S, E, EV = shape
    q, k, v = qkv(B, H, L, S, E, EV, dtype=dtype, device=device, HK=HK)
    plan = attn_ops.attention_fwd_plan(q, k, v)
    assert plan.kernel == "split" and plan.splits >= 3
    check_op(attention, sdpa, q, k, v, enable_gqa=True)  # forward, then backward on the split's lse
    assert launches == [("_attn_fwd_split_kernel", None), ("_attn_split_merge_kernel", None)]


def _split_config(bm, bn):
    return Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2, host={"PROGRAMS_PER_SM": 2})


def _reference(q, k, v, causal, scale):
    """(o, base-2 lse) in float64, GQA by repeating key heads; causal top-left aligned."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k.mT * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1) / math.log(2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_lse_matches_the_regular_forward(device, causal):
    """The split path's (o, lse) is the regular forward's, in float64 (where both are exact to
    the last bits but for the order of their sums), and the float64 reference's: several row
    blocks (28 packed rows in 16-row blocks), slices of 32 keys with a tail; causal top-left,
    where the 7 attended keys fit one slice (a causal query block of at most 16 rows sees at
    most 16 keys, so the plan never splits it)."""
    q, k, v = (t.double() for t in qkv(2, 8, 7, 90, 24, 40, device=device, HK=2))
    o, lse = attn_ops.launch_attention_fwd_split(q, k, v, causal, 0.3, config=_split_config(16, 16), num_splits=3)
    o_regular, lse_regular = attn_ops.launch_attention_fwd(q, k, v, None, causal, 0.3,
                                                           config=Config({"BLOCK_M": 16, "BLOCK_N": 32}, 4, 2))
    testing.assert_close(o, o_regular, None)
    testing.assert_close(lse, lse_regular, None)
    o_ref, lse_ref = _reference(q, k, v, causal, 0.3)
    testing.assert_close(o, o_ref, None)
    testing.assert_close(lse.view(2, 8, 7), lse_ref, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_forward_causal(device, dtype):
    """Causal with L < S, top-left aligned as torch's SDPA: query i sees keys j <= i, so only
    the first L keys take part (one slice); against torch and its backward through the op."""
    q, k, v = qkv(1, 4, 7, 70, 32, dtype=dtype, device=device, HK=1)
    o, lse = attn_ops.launch_attention_fwd_split(q, k, v, True, None)
    o_ref, lse_ref = _reference(q, k, v, True, 1 / math.sqrt(32))
    testing.assert_close(o, o_ref, sdpa(q, k.expand(1, 4, 70, 32), v.expand(1, 4, 70, 32), is_causal=True))
    testing.assert_close(lse.view(1, 4, 7), lse_ref, None)  # float32: the inputs' values are exact in it


def test_split_merge_weights_every_slice(device):
    """One key per row carries all of the weight, in a different slice for each row: the merge
    must take each row's output from its own slice (a merge that dropped or misweighted any
    slice would be off by O(1))."""
    S, E = 64, 16
    k = torch.zeros(1, 1, S, E, dtype=torch.float64, device=device)
    q = torch.zeros(1, 4, 1, E, dtype=torch.float64, device=device)
    for h, key in enumerate((3, 20, 37, 63)):  # slices of 16 keys: one key in each
        k[0, 0, key, h] = 1.0
        q[0, h, 0, h] = 200.0
    v = torch.randn(1, 1, S, 8, dtype=torch.float64, device=device)
    o, lse = attn_ops.launch_attention_fwd_split(q, k, v, False, 1.0, config=_split_config(16, 16), num_splits=4)
    o_ref, lse_ref = _reference(q, k, v, False, 1.0)
    testing.assert_close(o, o_ref, None)
    testing.assert_close(lse.view(1, 4, 1), lse_ref, None)
    assert torch.allclose(o[0, :, 0], v[0, 0, [3, 20, 37, 63]])


def test_split_merges_without_atomics():
    """Deterministic by construction: the slices meet only in the merge kernel's ordered sum
    (the interpreter runs programs one by one, so comparing two runs would prove nothing)."""
    source = inspect.getsource(attn_kernels)
    assert "tl.atomic" not in source


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_split_lse_of_nan_and_inf_scores_is_the_regular_forwards(device, bad):
    """A NaN or +inf score makes the rows that see it NaN; their lse is the regular forward's
    (+inf), not the finite lse of the other slices."""
    q, k, v = qkv(1, 4, 1, 300, 32, device=device, HK=2)
    k[0, 0, 250, 3] = bad
    o, lse = attn_ops.launch_attention_fwd_split(q, k, v, num_splits=4)
    o_regular, lse_regular = attn_ops.launch_attention_fwd(q, k, v, config=Config({"BLOCK_M": 16, "BLOCK_N": 32}, 4, 2))
    assert torch.equal(o.isnan(), o_regular.isnan()) and o.isnan().any()
    assert torch.equal(lse.isinf(), lse_regular.isinf()) and lse.isinf().any()
    finite = lse_regular.isfinite()
    testing.assert_close(lse[finite], lse_regular[finite], None)


def test_split_plan_rules():
    """Masks, dropout, more than 16 rows, a given config and causal (at most 16 keys) take the
    regular forward; so do keys that fit one block. Nothing reads the tensors' data."""
    q, k, v = (torch.empty(s, dtype=torch.bfloat16) for s in ((1, 4, 16, 64), (1, 2, 4096, 64), (1, 2, 4096, 64)))
    plan = attn_ops.attention_fwd_plan
    assert plan(q, k, v).kernel == "split"
    assert plan(q, k, v, torch.ones(16, 4096, dtype=torch.bool).expand(1, 4, 16, 4096)).kernel == "pointer"
    assert plan(q, k, v, dropout_p=0.1).kernel == "pointer"
    assert plan(q, k, v, causal=True).kernel == "tma"
    assert plan(torch.empty(1, 4, 17, 64, dtype=torch.bfloat16), k, v).kernel == "tma"
    assert plan(q, k, v, config=attn_tuning.attention_config(attn_tuning.attention_key(
        64, 64, 16, 4096, torch.bfloat16, False))).kernel == "tma"
    assert plan(q, k[:, :, :64], v[:, :, :64]).kernel == "tma"


def test_split_fills_the_gpu_for_one_decoding_row():
    """B = 1, 32 query heads on 8 key heads, one query row, 8192 keys, head dim 128, bfloat16:
    the split launch has at least two programs per SM of a 132-SM GPU (the stand-in's count
    off a GPU), though batch x key heads alone would be 8 programs."""
    q = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)
    k = v = torch.empty(1, 8, 8192, 128, dtype=torch.bfloat16)
    plan = attn_ops.attention_fwd_plan(q, k, v)
    assert plan.kernel == "split"
    splits, split_keys, row_blocks, keys = attn_ops._split_layout(q, k, False, plan.config)
    assert row_blocks == 1 and keys == 8192 and splits * split_keys >= 8192 > (splits - 1) * split_keys
    assert splits == plan.splits and 8 * row_blocks * splits >= 2 * runtime.sm_count(q.device)


def test_split_count_rule():
    assert attn_tuning.split_count(8192, 64, 8, 264) == (43, 192)  # 128 blocks, 3 a slice: 344 programs
    assert attn_tuning.split_count(8192, 64, 300, 264) == (1, 8192)  # the programs alone fill the GPU
    assert attn_tuning.split_count(100, 32, 1, 264) == (4, 32)  # one block a slice at most, the tail its own
    assert attn_tuning.split_count(0, 32, 1, 264) == (0, 32)


# --------------------------------------------------------------------------- heuristic defaults


def _default(kernel, D, dtype, mask="none", dropout=False, causal=True, L=2048):
    key = attn_tuning.AttentionKey(D, causal, dtype, L, L, mask, dropout)
    if kernel == "dq":
        return attn_tuning.attention_bwd_dq_config(attn_tuning.AttentionDqKey(*key, mask == "add"))
    return {"fwd": attn_tuning.attention_config, "dkdv": attn_tuning.attention_bwd_dkdv_config}[kernel](key)


def _tile(cfg):
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.num_warps, cfg.num_stages


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_defaults_shrink_where_sm90_spills(dtype):
    """The 16-bit backward defaults, measured compiled for sm90 with GQA (the key cannot tell
    it apart): the tutorial's tiles where they compile clean, smaller ones where a mask,
    dropout or the head dim make them spill."""
    for mask in ("none", "bool", "add"):
        for dropout in (False, True):
            masked = mask != "none"
            # dK/dV: (BLOCK_M, BLOCK_N, warps, stages)
            assert _tile(_default("dkdv", 64, dtype, mask, dropout)) == ((16 if dropout else 32), 128, 8, 3)
            d128 = ((16, 16, 4, 1 if mask == "add" else 3) if dropout
                    else (16, 32, 4, 1) if masked else (16, 128, 8, 2))
            assert _tile(_default("dkdv", 128, dtype, mask, dropout)) == d128
            assert _tile(_default("dkdv", 256, dtype, mask, dropout)) == (16, 16, 4, 1 if masked or dropout else 2)
            # dQ
            assert _tile(_default("dq", 64, dtype, mask, dropout)) == (128, 32, 8 if dropout or masked else 4, 3)
            assert _tile(_default("dq", 128, dtype, mask, dropout)) == (128, 32, 8, 2)
            assert _tile(_default("dq", 256, dtype, mask, dropout)) == (
                (16, 16, 4, 2) if masked or dropout else (64, 16, 8, 2))
    # a short sequence prunes the blocks, and the warps follow BLOCK_N (dK/dV) or BLOCK_M (dQ)
    assert _tile(_default("dkdv", 128, dtype, L=32)) == (16, 32, 4, 2)
    assert _tile(_default("dq", 64, dtype, dropout=True, L=32)) == (32, 32, 4, 3)


def test_float32_defaults_are_the_fma_tiles():
    """float32 (exact dots on FMA units) takes FLOAT32_TILES on every kernel, pruned to the
    extents; float64 (interpreter only) keeps the 2-byte tiles narrowed."""
    for kernel in ("fwd", "dkdv", "dq"):
        for i, D in enumerate((64, 128, 256)):
            for mask, dropout in (("none", False), ("bool", True), ("add", False)):
                cfg = _default(kernel, D, "float32", mask, dropout)
                assert _tile(cfg) == attn_tuning.FLOAT32_TILES[kernel][i], (kernel, D, mask, dropout)
    assert attn_tuning.FLOAT32_TILES["fwd"][0] == (32, 32, 4, 2)
    assert attn_tuning.FLOAT32_TILES["dkdv"][1] == (32, 16, 4, 2)
    assert _tile(_default("fwd", 64, "float32", L=16)) == (16, 16, 4, 2)
    assert _tile(_default("dkdv", 128, "float64")) == (32, 32, 4, 2)
    for i, D in enumerate((64, 128, 256)):  # the split-key forward, 64 packed rows
        cfg = attn_tuning.attention_split_config(attn_tuning.attention_split_key(D, D, 64, 8192, "float32", False))
        assert _tile(cfg) == attn_tuning.FLOAT32_TILES["split"][i]
    cfg = attn_tuning.attention_split_config(attn_tuning.attention_split_key(128, 128, 4, 8192, "float32", False))
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 16)  # pruned to the rows there are


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_default_tiles_with_gqa_and_a_mask(device, monkeypatch, dtype):
    """The defaults of a GQA problem with a bool mask, causal, head dim 80 (padded to 128):
    the tiles the rules pick reach the kernels, and forward and backward match torch."""
    chosen = {}
    for name, tuner in (("fwd", attn_tuning.ATTENTION_TUNER), ("dkdv", attn_tuning.ATTENTION_BWD_DKDV_TUNER),
                        ("dq", attn_tuning.ATTENTION_BWD_DQ_TUNER)):
        monkeypatch.setattr(tuner, "select",
                            lambda key, name=name, select=tuner.select: chosen.setdefault(name, select(key)))
    q, k, v = qkv(1, 4, 37, 45, 80, dtype=dtype, device=device, HK=2)
    mask = (torch.rand(37, 45, device=device) > 0.2).expand(1, 4, 37, 45)
    check_op(attention, sdpa, q, k, v, attn_mask=mask, is_causal=False, enable_gqa=True)
    dkdv = (32, 16, 4, 2) if dtype == torch.float32 else (16, 32, 4, 1)
    assert _tile(chosen["dkdv"]) == dkdv
    assert _tile(chosen["dq"]) == ((16, 16, 4, 2) if dtype == torch.float32 else (64, 32, 8, 2))


def test_forward_dropout_defaults_move_off_tiles_that_spill():
    """With dropout, d64 steps 32 keys (128 x 64 on 8 warps spills 8-40 B on sm90) and d256
    pipelines 2 stages (3 spill 16 B); without dropout the tiles stay."""
    def cfg(D, dropout, mask="none"):
        return attn_tuning.attention_config(attn_tuning.AttentionKey(D, True, "bfloat16", 4096, 4096, mask, dropout))
    assert _tile(cfg(64, True)) == (64, 32, 4, 3) and _tile(cfg(64, True, "add")) == (64, 32, 4, 3)
    assert _tile(cfg(64, False)) == (128, 128, 8, 3)
    assert _tile(cfg(256, True)) == (32, 32, 4, 2) and _tile(cfg(256, False, "add")) == (32, 32, 4, 3)
