"""The matmul kernel's variants: the persistent tensor-descriptor (TMA) kernel and split K,
through the public ops (forward and backward) against torch, and the rules that choose them."""

import inspect

import pytest
import torch
import triton

import tritonops
from autotune import Config
from tritonops import runtime
from tritonops.kernels import matmul as matmul_kernels
from tritonops.ops import matmul as matmul_ops
from tritonops.tuning import matmul as matmul_tuning

from .utils import check_op

HOST = {"TMA": False, "SPLIT_K": 1, "EPILOGUE_SUBTILE": False}


def config(bm, bn, bk, warps=4, stages=2, group=8, **host):
    return Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages,
                  host={**HOST, **host})


class Counted:
    """Stands in for a kernel in ops.matmul: counts its launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        self.grids = getattr(self, "grids", []) + [grid]
        return self.kernel[grid]


@pytest.fixture
def forced(monkeypatch):
    """Every matmul launch takes the given config; returns the counted kernels."""
    kernels = {name: Counted(getattr(matmul_ops, name)) for name in
               ("_matmul_tma_kernel", "_matmul_fwd_kernel", "_splitk_reduce_kernel")}
    for name, counted in kernels.items():
        monkeypatch.setattr(matmul_ops, name, counted)
    monkeypatch.setattr(runtime, "sm_count", lambda device: 3)  # persistent programs take several tiles

    def force(cfg):
        monkeypatch.setattr(matmul_ops.MATMUL_TUNER, "select", lambda key: cfg)
        return kernels
    return force


# --------------------------------------------------------------------------- the descriptor kernel

TMA_CONFIGS = [config(16, 32, 16, group=2, TMA=True), config(32, 16, 32, TMA=True, EPILOGUE_SUBTILE=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=["16x32x16", "32x16x32-subtile"])
@pytest.mark.parametrize("layout", ["nn", "a_t", "b_t", "both_t"])
def test_tma_matmul(device, forced, dtype, cfg, layout):
    """Forward and backward (dA = dC B^T, dB = A^T dC: the other layouts) on the descriptor
    kernel; M, N, K multiples of 8 (16-byte rows) with tails past every block."""
    kernels = forced(cfg)
    M, N, K = 40, 56, 72
    a = torch.randn((K, M) if layout in ("a_t", "both_t") else (M, K), dtype=dtype, device=device)
    b = torch.randn((N, K) if layout in ("b_t", "both_t") else (K, N), dtype=dtype, device=device)
    views = lambda t: [t[0].t() if layout in ("a_t", "both_t") else t[0],  # noqa: E731
                       t[1].t() if layout in ("b_t", "both_t") else t[1]]
    check_op(tritonops.matmul, torch.matmul, a, b, strided=views)
    assert kernels["_matmul_tma_kernel"].launches == 3 and kernels["_matmul_fwd_kernel"].launches == 0
    assert all(g == (3,) for g in kernels["_matmul_tma_kernel"].grids)  # the persistent grid: min(SMs, tiles)


@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=["16x32x16", "32x16x32-subtile"])
def test_tma_linear_epilogue(device, forced, activation, cfg):
    """Bias, activation and the saved pre-activation in the descriptor kernel's epilogue, and
    the backward that reads them; rows folded from a batch."""
    kernels = forced(cfg)
    x = torch.randn(3, 16, 48, dtype=torch.bfloat16, device=device)
    w = torch.randn(40, 48, dtype=torch.bfloat16, device=device)
    bias = torch.randn(40, dtype=torch.bfloat16, device=device)
    check_op(lambda x, w, b: tritonops.linear(x, w, b, activation),
             lambda x, w, b: tritonops.reference.linear(x, w, b, activation), x, w, bias)
    assert kernels["_matmul_tma_kernel"].launches >= 3 and kernels["_matmul_fwd_kernel"].launches == 0


def test_tma_layout_rules():
    """The descriptor kernel takes one batch of 16-bit operands with a unit stride and 16-byte
    aligned base and other stride; everything else goes to the pointer kernel."""
    def layout(a, b, c=None, z=None):
        c = c if c is not None else torch.empty(1, a.shape[-2], b.shape[-1], dtype=a.dtype)
        return matmul_ops.tma_layout(a, b, c, z)

    h = torch.float16
    a, b = torch.randn(1, 24, 32, dtype=h), torch.randn(1, 32, 40, dtype=h)
    assert layout(a, b) == ((True, 32), (False, 40))
    assert layout(torch.randn(1, 32, 24, dtype=h).mT, torch.randn(1, 40, 32, dtype=h).mT) == ((False, 24), (True, 32))
    assert layout(a.float(), b.float()) is None  # 32-bit
    assert layout(torch.randn(2, 24, 32, dtype=h), torch.randn(2, 32, 40, dtype=h)) is None  # batched
    assert layout(torch.randn(1, 24, 36, dtype=h)[:, :, :32], b) is None  # row stride of 72 bytes
    assert layout(torch.randn(1, 24, 33, dtype=h)[:, :, 1:], b) is None  # base off 16-byte alignment
    assert layout(a, torch.randn(1, 32, 80, dtype=h)[:, :, ::2]) is None  # no unit stride
    assert layout(a, b, torch.empty(1, 40, 24, dtype=h).mT) is None  # C column-major: the store needs rows
    c = torch.empty(1, 24, 40, dtype=h)
    assert layout(a, b, c, torch.empty(1, 24, 48, dtype=h)[:, :, :40]) is None  # z strides differ from c's


@pytest.mark.parametrize("shapes", [((37, 29), (29, 45)), ((2, 24, 32), (2, 32, 40)), ((24, 0), (0, 40))],
                         ids=["misaligned", "batched", "K=0"])
def test_operands_tma_refuses_take_the_pointer_kernel(device, forced, monkeypatch, shapes):
    """A descriptor config on operands TMA refuses runs the pointer kernel with the key's
    pointer default (a descriptor tile may be too large for the pointer kernel)."""
    kernels = forced(config(128, 256, 64, 8, 3, TMA=True))
    seen = []
    pointer_default = matmul_tuning.matmul_pointer_heuristic
    monkeypatch.setattr(matmul_ops, "matmul_pointer_heuristic", lambda key: seen.append(key) or pointer_default(key))
    a = torch.randn(*shapes[0], dtype=torch.float16, device=device)
    b = torch.randn(*shapes[1], dtype=torch.float16, device=device)
    check_op(tritonops.matmul, torch.matmul, a, b, backward=False)
    assert kernels["_matmul_tma_kernel"].launches == 0 and kernels["_matmul_fwd_kernel"].launches == 1
    a3, b3 = (t if t.dim() == 3 else t[None] for t in (a, b))
    assert seen == [matmul_ops.matmul_key(a3, b3, False)]


# --------------------------------------------------------------------------- split K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("split", [2, 5])
def test_split_k_linear(device, forced, monkeypatch, dtype, split):
    """Split K with a tail (K = 131 over BLOCK_K 16: 9 steps, uneven and empty splits), bias,
    activation and its backward; a batch of rows."""
    kernels = forced(config(16, 16, 16, SPLIT_K=split))
    monkeypatch.setattr(runtime, "sm_count", lambda device: 64)  # every launch here splits
    x = torch.randn(2, 5, 131, dtype=dtype, device=device)
    w = torch.randn(19, 131, dtype=dtype, device=device)
    bias = torch.randn(19, dtype=dtype, device=device)
    check_op(lambda x, w, b: tritonops.linear(x, w, b, "gelu_tanh"),
             lambda x, w, b: tritonops.reference.linear(x, w, b, "gelu_tanh"), x, w, bias)
    assert kernels["_splitk_reduce_kernel"].launches == 3  # forward, dX, dW


def test_split_k_batched_matmul(device, forced, monkeypatch):
    kernels = forced(config(16, 16, 16, SPLIT_K=4))
    monkeypatch.setattr(runtime, "sm_count", lambda device: 64)
    a, b = torch.randn(3, 9, 70, device=device), torch.randn(3, 70, 21, device=device)
    check_op(tritonops.matmul, torch.matmul, a, b)
    assert kernels["_splitk_reduce_kernel"].launches == 3


def test_split_k_reduces_without_atomics():
    """Deterministic by construction: the splits meet only in the reduction kernel's ordered
    sum (the interpreter runs programs one by one, so comparing two runs would prove nothing)."""
    source = inspect.getsource(matmul_kernels)
    assert "tl.atomic" not in source


def test_split_k_is_dropped_where_the_batch_fills_the_gpu(device, forced, monkeypatch):
    """The key has no batch: a split config on a batch whose tiles already fill the GPU twice
    runs unsplit (3 SMs here: 2 batches x 4 tiles >= 6)."""
    kernels = forced(config(16, 16, 16, SPLIT_K=4))
    a, b = torch.randn(2, 20, 64, device=device), torch.randn(2, 64, 30, device=device)
    check_op(tritonops.matmul, torch.matmul, a, b, backward=False)
    assert kernels["_splitk_reduce_kernel"].launches == 0 and kernels["_matmul_fwd_kernel"].grids == [(8,)]
    a = torch.randn(1, 20, 64, device=device)  # 4 tiles: split
    check_op(tritonops.matmul, torch.matmul, a, b[:1], backward=False)
    assert kernels["_splitk_reduce_kernel"].launches == 1 and kernels["_matmul_fwd_kernel"].grids[-1] == (16,)


# --------------------------------------------------------------------------- the rules


def _key(M, N, K, dtype="bfloat16", epilogue=False, a_kmajor=True, b_kmajor=True):
    return matmul_tuning.MatmulKey(M, N, K, dtype, a_kmajor, b_kmajor, epilogue)


def _grid(cfg, key):
    return cfg["SPLIT_K"] * triton.cdiv(key.M, cfg["BLOCK_M"]) * triton.cdiv(key.N, cfg["BLOCK_N"])


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)])
def test_decode_heuristic_fills_the_gpu(M, N, K):
    """Decode shapes run at least twice the SMs' worth of programs, each split with at least
    MIN_SPLIT_STEPS steps of K, and the config is in the Space."""
    key = _key(M, N, K)
    cfg = matmul_tuning.matmul_heuristic(key)
    assert _grid(cfg, key) >= 2 * matmul_tuning.TARGET_SMS
    assert triton.cdiv(K, cfg["BLOCK_K"]) >= cfg["SPLIT_K"] * matmul_tuning.MIN_SPLIT_STEPS
    assert matmul_tuning.MATMUL_SPACE.valid(cfg, matmul_tuning._problem(key))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_large_16bit_heuristic_is_the_descriptor_kernel(dtype, epilogue):
    key = _key(8192, 8192, 8192, dtype, epilogue)
    cfg = matmul_tuning.matmul_heuristic(key)
    assert cfg["TMA"] and cfg["SPLIT_K"] == 1 and cfg["BLOCK_M"] == 128 and cfg.num_warps == 8
    assert cfg["BLOCK_N"] == (128 if epilogue else 256)
    assert matmul_tuning.MATMUL_SPACE.valid(cfg, matmul_tuning._problem(key))
    assert not matmul_tuning.matmul_heuristic(_key(8192, 8192, 8192, "float32"))["TMA"]
    assert not matmul_tuning.matmul_heuristic(_key(8192, 8190, 8192, dtype))["TMA"]  # rows not 16-byte aligned


def test_space_variants():
    """128 x 256 x 64 with 8 warps on the descriptor kernel is a candidate of a large problem;
    split K only for decode shapes; descriptors only for 16-bit types."""
    space = matmul_tuning.MATMUL_SPACE
    big = matmul_tuning._problem(_key(8192, 8192, 8192))
    assert space.valid(config(128, 256, 64, 8, 3, TMA=True), big)
    assert not space.valid(config(128, 128, 64, 8, 3, SPLIT_K=2), big)
    assert not space.valid(config(128, 128, 64, 8, 3, TMA=True), matmul_tuning._problem(_key(8192, 8192, 8192,
                                                                                             "float32")))
    assert not space.valid(config(64, 64, 64, 4, 3, EPILOGUE_SUBTILE=True), big)
    # rows descriptors cannot take (K, N, or an M-major A's M, not a multiple of 8): no TMA
    for key in (_key(8192, 8192, 8190), _key(8192, 8190, 8192), _key(8192, 8192, 8192, b_kmajor=False),
                _key(4100, 8192, 8192, a_kmajor=False)):
        aligned = key.N % 8 == 0 and key.K % 8 == 0 and (key.a_kmajor or key.M % 8 == 0)
        assert space.valid(config(128, 256, 64, 8, 3, TMA=True), matmul_tuning._problem(key)) == aligned, key
    decode = matmul_tuning._problem(_key(16, 4096, 4096))
    assert space.valid(config(16, 64, 64, 4, 3, SPLIT_K=16), decode)
    assert not space.valid(config(16, 64, 128, 4, 3, SPLIT_K=16), decode)  # 2 steps a split
    kinds = {(c["TMA"], c["SPLIT_K"] > 1) for c in space.configs(decode)}
    assert kinds == {(False, False), (True, False), (False, True)}
