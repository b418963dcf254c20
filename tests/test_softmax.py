import re

import pytest
import torch
import torch.nn.functional as F
import triton

from autotune import Config
from tritonops import testing
from tritonops.tuning import rows as _rows
from tritonops.ops import softmax as softmax_ops
from tritonops.tuning import softmax as softmax_tuning
from tritonops.ops.softmax import log_softmax, softmax

from .utils import check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FNS = {"softmax": (softmax, F.softmax), "log_softmax": (log_softmax, F.log_softmax)}


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def small_chunks(monkeypatch, block_r=2, block_n=64):
    """Force the looped (online) variant on small rows: several chunks of BLOCK_N, a ragged tail."""
    cfg = Config({"BLOCK_R": block_r, "BLOCK_N": block_n}, num_warps=4, num_stages=2)
    monkeypatch.setattr(softmax_tuning.SOFTMAX_TUNER, "select", lambda key: cfg)
    monkeypatch.setattr(softmax_tuning.SOFTMAX_BWD_TUNER, "select", lambda key: cfg)


# --------------------------------------------------------------------------- forward + backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("shape,dim", [
    ((37,), 0),  # 1-D
    ((5, 37), -1),  # odd rows, tail in the block
    ((3, 1), -1),  # size-1 rows
    ((4, 7, 5), 1),  # middle dim: strided rows, no transpose
    ((6, 9), 0),  # first dim
    ((2, 3, 4, 5), -3),
    ((3, 1500), 1),  # several rows per program would not fit: one row per program
], ids=str)
def test_softmax(device, dtype, fn, shape, dim):
    ours, ref = FNS[fn]
    check_op(lambda x: ours(x, dim), lambda x: ref(x, dim), randn(*shape, dtype=dtype, device=device) * 3)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((5, 300), -1), ((3, 300, 4), 1), ((300,), 0)], ids=str)
def test_softmax_looped(device, monkeypatch, fn, dtype, shape, dim):
    """The online two-pass variant, 5 chunks of 64 with a tail, forward and backward."""
    small_chunks(monkeypatch)
    ours, ref = FNS[fn]
    check_op(lambda x: ours(x, dim), lambda x: ref(x, dim), randn(*shape, dtype=dtype, device=device) * 3)


@pytest.mark.parametrize("fn", FNS)
def test_softmax_row_of_a_million(device, fn):
    """One 2^20-element row: the default config loops over chunks instead of one huge block."""
    n = 2**20
    key = softmax_tuning.softmax_key(n, 1, torch.float32, False, fn == "log_softmax")
    assert softmax_tuning.SOFTMAX_TUNER.default(key)["BLOCK_N"] < n
    assert softmax_tuning.SOFTMAX_BWD_TUNER.default(key)["BLOCK_N"] < n
    ours, ref = FNS[fn]
    check_op(lambda x: ours(x, -1), lambda x: ref(x, -1), randn(1, n, device=device) * 4)


def test_softmax_scalar(device):
    x = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    for ours, ref in FNS.values():
        out = ours(x, 0)
        assert out.shape == () and torch.equal(out, ref(x, 0))
        assert torch.equal(*(torch.autograd.grad(f(x, -1), x)[0] for f in (ours, ref)))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (5, 0, 0), (0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=str)
def test_softmax_empty(device, fn, shape):
    """Zero-size dims (torch's own sample (5, 0, 0) among them), every dim, with and without a
    dtype argument: torch's empty output and dtype, and its empty gradient."""
    ours, ref = FNS[fn]
    x = randn(*shape, device=device)
    for dim in range(-len(shape), len(shape)):
        for dtype in (None, torch.float64, torch.bfloat16):
            check_op(lambda t: ours(t, dim, dtype=dtype), lambda t: ref(t, dim, dtype=dtype), x)
        i = torch.empty(shape, dtype=torch.int64, device=device)  # an integer input is cast by the dtype argument
        out, want = ours(i, dim, dtype=torch.float32), ref(i, dim, dtype=torch.float32)
        assert out.shape == want.shape and out.dtype == want.dtype


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "permuted"])
def test_softmax_strides(device, fn, layout):
    ours, ref = FNS[fn]
    if layout == "transposed":  # the reduced dim has stride 33
        x, view, dim = randn(40, 33, device=device), lambda t: [t[0].t()], -1
    elif layout == "sliced":
        x, view, dim = randn(6, 80, device=device), lambda t: [t[0][1::2, ::3]], 1
    elif layout == "expanded":  # stride 0 in the outer dims
        x, view, dim = randn(1, 1, 29, device=device), lambda t: [t[0].expand(2, 3, 29)], -1
    else:  # outer dims no single stride walks: copied
        x, view, dim = randn(3, 4, 5, 6, device=device), lambda t: [t[0].permute(2, 0, 3, 1)], 1
    check_op(lambda t: ours(t, dim), lambda t: ref(t, dim), x, strided=view)


class _KernelSpy:
    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((args[0].data_ptr(), args[0].stride()))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_softmax_strided_dim_is_not_copied(device, monkeypatch):
    """dim != -1 and a transposed input are read in place, through their strides."""
    spy = _KernelSpy(softmax_ops._softmax_fwd_kernel)
    monkeypatch.setattr(softmax_ops, "_softmax_fwd_kernel", spy)
    x = randn(4, 7, 5, device=device)
    softmax(x, 1)
    xt = randn(9, 12, device=device).t()
    softmax(xt, -1)
    assert spy.seen == [(x.data_ptr(), x.stride()), (xt.data_ptr(), xt.stride())]


@pytest.mark.parametrize("fn", FNS)
def test_softmax_gradient_of_any_layout(device, fn):
    """dy arrives transposed or expanded (e.g. from .sum()): read through its strides."""
    ours, ref = FNS[fn]
    x = randn(6, 10, dtype=torch.float64, device=device).requires_grad_()
    for dy in (randn(10, 6, dtype=torch.float64, device=device).t(),
               randn(1, 10, dtype=torch.float64, device=device).expand(6, 10)):
        got = torch.autograd.grad(ours(x, 1), x, dy)[0]
        want = torch.autograd.grad(ref(x, 1), x, dy)[0]
        testing.assert_close(got, want, None)


def test_softmax_gradcheck(device):
    x = randn(3, 37, dtype=torch.float64, device=device).requires_grad_()
    y = randn(2, 5, 3, dtype=torch.float64, device=device).requires_grad_()
    for ours, _ in FNS.values():
        assert torch.autograd.gradcheck(lambda t: ours(t, -1), (x,))
        assert torch.autograd.gradcheck(lambda t: ours(t, 1), (y,))


def test_softmax_gradcheck_looped(device, monkeypatch):
    small_chunks(monkeypatch, block_r=2, block_n=16)
    x = randn(3, 41, dtype=torch.float64, device=device).requires_grad_()
    for ours, _ in FNS.values():  # fast mode: random projections, a few launches instead of one per element
        assert torch.autograd.gradcheck(lambda t: ours(t, -1), (x,), fast_mode=True)


# --------------------------------------------------------------------------- special values


# NaN results are the point here; the interpreter's numpy warns about computing them.
@pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")
@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("fn", FNS)
def test_softmax_special_values_like_torch(device, monkeypatch, fn, looped):
    """-inf entries, all -inf rows (NaN), +inf and NaN (NaN rows), as torch; a leading chunk of
    all -inf must not poison the online sum of the looped variant."""
    if looped:
        small_chunks(monkeypatch, block_r=2, block_n=16)
    ours, ref = FNS[fn]
    x = randn(6, 70, dtype=torch.float64, device=device)
    inf = float("inf")
    x[0, 3] = -inf
    x[1, :] = -inf
    x[2, 5] = inf
    x[3, 60] = float("nan")
    x[4, :40] = -inf  # the first chunks see nothing but -inf
    x[5, 10:] = -inf
    for dtype in (torch.float32, torch.float64):
        got, want = ours(x.to(dtype), 1), ref(x, 1)
        assert torch.equal(got.isnan(), want.isnan())
        testing.assert_close(got, want, ref(x.to(dtype), 1))
    assert torch.isnan(ours(x, 1)[1]).all() and not torch.isnan(ours(x, 1)[4]).any()


# --------------------------------------------------------------------------- dtype argument


def test_softmax_dtype_argument(device):
    x16 = randn(5, 37, dtype=torch.float16, device=device).requires_grad_()
    x32 = randn(5, 37, device=device).requires_grad_()
    for ours, ref in FNS.values():
        # widening: fused into the kernel (read fp16, write fp32), gradient back in fp16
        out = ours(x16, -1, dtype=torch.float32)
        assert out.dtype == torch.float32
        testing.assert_close(out, ref(x16.double(), -1), ref(x16, -1, dtype=torch.float32))
        g = randn(5, 37, device=device)
        dx = torch.autograd.grad(out, x16, g)[0]
        assert dx.dtype == torch.float16
        x64 = x16.detach().double().requires_grad_()
        testing.assert_close(dx, torch.autograd.grad(ref(x64, -1), x64, g.double())[0],
                               torch.autograd.grad(ref(x16, -1, dtype=torch.float32), x16, g)[0])
        # narrowing: the input is cast first, as torch does
        out = ours(x32, 0, dtype=torch.bfloat16)
        want = ref(x32.to(torch.bfloat16), 0, dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        testing.assert_close(out, ref(x32.to(torch.bfloat16).double(), 0), want)
        # integer input with a dtype
        i = torch.arange(12, device=device).view(3, 4)
        testing.assert_close(ours(i, 1, dtype=torch.float32), ref(i.double(), 1), ref(i, 1, dtype=torch.float32))


# --------------------------------------------------------------------------- errors, configs


def test_softmax_errors_like_torch(device):
    x = randn(2, 3, device=device)
    for ours, ref in FNS.values():
        for bad_dim in (2, -3):
            with pytest.raises(IndexError) as want:
                ref(x, bad_dim)
            with pytest.raises(IndexError, match=re.escape(str(want.value))):
                ours(x, bad_dim)
        with pytest.raises(IndexError, match=r"\[-1, 0\]"):
            ours(torch.tensor(1.0), 1)
        with pytest.raises(TypeError, match="int64"):
            ours(torch.arange(3), 0)
        with pytest.raises(TypeError, match="dtype"):
            ours(x, 0, dtype=torch.int32)


def test_softmax_config_keeps_gpu_rules():
    for n in (1, 7, 64, 1000, 2048, 8191, 16384, 16385, 100_000, 2**20):
        for rows in (1, 3, 1000, 10**6):
            for dtype in (torch.float16, torch.float32, torch.float64):
                for strided in (False, True):
                    key = softmax_tuning.softmax_key(n, rows, dtype, strided, False)
                    for fn in (softmax_tuning.softmax_heuristic, softmax_tuning.softmax_bwd_heuristic):
                        cfg = fn(key)
                        assert softmax_tuning.SOFTMAX_SPACE.valid(cfg, softmax_tuning._problem(key))  # in its space
                        r, b = cfg["BLOCK_R"], cfg["BLOCK_N"]
                        assert r & (r - 1) == 0 and b & (b - 1) == 0 and b >= 16
                        assert r * b <= _rows.ONE_PASS_MAX[dtype.itemsize]
                        # whole rows no longer than compile cleanly for sm90 (no spills)
                        bwd = fn is softmax_tuning.softmax_bwd_heuristic
                        whole = _rows.WHOLE_ROW_BWD if bwd else _rows.WHOLE_ROW_FWD
                        assert b <= whole[dtype.itemsize]
                        assert cfg.num_warps in (4, 8, 16, 32)
                        if n <= b:  # one pass: every row in one tile, several short rows per program
                            assert strided or r * b >= min(_rows.SHORT_ROW_TILE,
                                                           b * triton.next_power_of_2(rows))
                        else:
                            assert cfg.num_stages == 2


# --------------------------------------------------------------------------- tuning: the space


def test_space_keeps_to_its_rules():
    for key in (softmax_tuning.softmax_key(100, 5, torch.float32, False, False),
                softmax_tuning.softmax_key(70_000, 4096, torch.float64, True, True)):
        problem = softmax_tuning._problem(key)
        configs = softmax_tuning.SOFTMAX_SPACE.configs(problem)
        assert softmax_tuning.softmax_heuristic(key) in configs
        for c in configs:
            r, b = c["BLOCK_R"], c["BLOCK_N"]
            assert 16 <= b <= min(triton.next_power_of_2(problem["N"]), _rows.ONE_PASS_MAX[problem["itemsize"]])
            assert r <= triton.next_power_of_2(problem["ROWS"])
            assert r * b * (2 if problem["itemsize"] == 8 else 1) <= 64 * 32 * c.num_warps
            assert c.num_stages == 1 or b < problem["N"]
