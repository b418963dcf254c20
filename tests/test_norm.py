import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autotune import Config
from tritonops import runtime, testing
from tritonops.ops import norm as norm_ops
from tritonops.tuning import norm as norm_tuning
from tritonops.tuning import rows as row_tiling
from tritonops.ops.norm import layer_norm, rms_norm

from .utils import check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (input shape, normalized_shape)
    ((7, 33), (33,)),  # odd rows, tail in the block
    ((2, 3, 20), (3, 20)),  # two normalized dims
    ((40,), (40,)),  # 1-D input: one row
    ((3, 1500), (1500,)),  # one row per program
]
AFFINE = ["weight_bias", "weight", "bias", "none"]


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def force_config(monkeypatch, block_r, block_n, programs_per_sm=1):
    fwd = Config({"BLOCK_R": block_r, "BLOCK_N": block_n}, num_warps=4, num_stages=2)
    monkeypatch.setattr(norm_tuning.NORM_TUNER, "select", lambda key: fwd)
    bwd = Config(fwd.meta, fwd.num_warps, fwd.num_stages, host={"PROGRAMS_PER_SM": programs_per_sm})
    monkeypatch.setattr(norm_tuning.NORM_BWD_TUNER, "select", lambda key: bwd)


def small_chunks(monkeypatch, block_r=2, block_n=64):
    """Force the looped variant (BLOCK_N chunks, a ragged tail) on small rows."""
    force_config(monkeypatch, block_r, block_n)


def few_sms(monkeypatch, sms=1):
    """Pretend the device has `sms` SMs, so each backward program loops over several row blocks."""
    props = dict(runtime.device_properties(), multiprocessor_count=sms)
    monkeypatch.setattr(runtime, "device_properties", lambda *a: props)


def ln_args(shape, norm_shape, affine, dtype, device):
    x = randn(*shape, dtype=dtype, device=device) * 2 + 0.5
    w = randn(*norm_shape, dtype=dtype, device=device) if affine in ("weight_bias", "weight") else None
    b = randn(*norm_shape, dtype=dtype, device=device) if affine in ("weight_bias", "bias") else None
    return x, w, b


def check_layer_norm(x, w, b, norm_shape, eps=1e-5, strided=None):
    args = [t for t in (x, w, b) if t is not None]

    def call(fn):
        def run(*ts):
            it = iter(ts)
            return fn(next(it), norm_shape, next(it) if w is not None else None, next(it) if b is not None else None,
                      eps=eps)
        return run

    return check_op(call(layer_norm), call(F.layer_norm), *args, strided=strided)


def check_rms_norm(x, w, norm_shape, eps=None, strided=None):
    args = [t for t in (x, w) if t is not None]
    return check_op(lambda x, *w: rms_norm(x, norm_shape, *w, eps=eps),
                    lambda x, *w: F.rms_norm(x, norm_shape, *w, eps=eps), *args, strided=strided)


# --------------------------------------------------------------------------- forward + backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape,norm_shape", SHAPES, ids=str)
def test_layer_norm(device, dtype, affine, shape, norm_shape):
    check_layer_norm(*ln_args(shape, norm_shape, affine, dtype, device), norm_shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("shape,norm_shape", SHAPES, ids=str)
def test_rms_norm(device, dtype, with_weight, eps, shape, norm_shape):
    x, w, _ = ln_args(shape, norm_shape, "weight" if with_weight else "none", dtype, device)
    check_rms_norm(x, w, norm_shape, eps)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_norm_size_one_rows(device, dtype):
    """N = 1. layer_norm returns the bias, with dx and dweight exactly zero (torch leaves
    ~1e-15 of rounding there, which a relative comparison against it cannot judge) and
    dbias the sum of dy over rows: checked as identities. rms_norm's dx is 0 but for eps,
    hence eps = 0.1; its gradients are compared with torch in float64 only: the weight
    gradient is one element, a sum over rows, that torch's CPU bf16 accumulates in bf16,
    and its luck would set the bar of a one-element comparison."""
    x, w, b = ln_args((5, 1), (1,), "weight_bias", dtype, device)
    if dtype == torch.float64:
        check_rms_norm(x, w, (1,), eps=0.1)
    check_op(lambda *t: layer_norm(t[0], (1,), *t[1:]), lambda *t: F.layer_norm(t[0], (1,), *t[1:]), x, w, b,
             backward=False)
    check_op(lambda *t: rms_norm(t[0], (1,), *t[1:], eps=0.1), lambda *t: F.rms_norm(t[0], (1,), *t[1:], eps=0.1),
             x, w, backward=False)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    g = (torch.randint(-8, 9, (5, 1)) / 4).to(device=device, dtype=dtype)  # sums exact in every dtype
    dx, dw, db = torch.autograd.grad(layer_norm(x, (1,), w, b), (x, w, b), g)
    assert not dx.any() and not dw.any()
    assert torch.equal(db, g.double().sum(0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_is_torchs(device, dtype):
    """eps=None is float32's epsilon for 16-bit inputs, as in torch (not the input dtype's):
    on rows of tiny values the two give different results."""
    check_rms_norm(randn(6, 24, dtype=dtype, device=device) * 1e-3, None, (24,), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_looped(device, monkeypatch, dtype, op):
    """Rows of 300 in 5 chunks of 64; a large mean (layer_norm must not cancel its variance);
    each backward program loops over several row blocks."""
    small_chunks(monkeypatch)
    x, w, b = ln_args((9, 300), (300,), "weight_bias", dtype, device)
    if op == "layer_norm":
        check_layer_norm(x + 300, w, b, (300,))
    else:
        check_rms_norm(x, w, (300,), 1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_persistent_backward(device, monkeypatch, op):
    """One-pass rows, two programs sharing 19 row blocks: their partial weight sums cover every row."""
    few_sms(monkeypatch)
    force_config(monkeypatch, block_r=2, block_n=64, programs_per_sm=2)
    x, w, b = ln_args((37, 48), (48,), "weight_bias", torch.float32, device)
    if op == "layer_norm":
        check_layer_norm(x, w, b, (48,))
    else:
        check_rms_norm(x, w, (48,))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_row_of_a_million(device, op):
    n = 2**20
    assert norm_tuning.NORM_TUNER.default(norm_tuning.norm_key(n, 1, torch.float32, op == "rms_norm", True))["BLOCK_N"] < n
    x, w, b = ln_args((1, n), (n,), "weight_bias", torch.float32, device)
    if op == "layer_norm":
        check_layer_norm(x, w, b, (n,))
    else:
        check_rms_norm(x, w, (n,))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("layout", ["sliced_rows", "transposed", "expanded"])
def test_norm_strides(device, op, layout):
    if layout == "sliced_rows":  # rows through their stride, no copy
        x, view = randn(12, 40, device=device), lambda t: [t[0][::3, 5:35], *t[1:]]
    elif layout == "transposed":  # no (M, N) strides: copied
        x, view = randn(30, 8, device=device), lambda t: [t[0].t(), *t[1:]]
    else:  # stride-0 rows
        x, view = randn(1, 30, device=device), lambda t: [t[0].expand(4, 30), *t[1:]]
    w = randn(60, device=device)
    b = randn(30, device=device)
    w_view = lambda t: [view(t)[0], t[1][::2], *t[2:]]  # a strided weight too
    if op == "layer_norm":
        check_layer_norm(x, w, b, (30,), strided=w_view)
    else:
        check_rms_norm(x, w, (30,), strided=w_view)


def test_norm_sliced_rows_are_not_copied(device, monkeypatch):
    seen = []
    launch = norm_ops.launch_norm_fwd

    def spy(x, *args, **kwargs):
        seen.append((x.data_ptr(), x.stride()))
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(norm_ops, "launch_norm_fwd", spy)
    base = randn(12, 40, device=device)
    layer_norm(base[::3, 5:35], (30,))
    assert seen == [(base[::3, 5:35].data_ptr(), (120, 1))]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape,norm_shape", [
    ((0, 8), (8,)), ((3, 0), (0,)), ((0,), (0,)),  # no rows, no columns
    ((0, 3, 4), (4,)), ((2, 0, 4), (4,)), ((2, 3, 0), (0,)),  # a zero leading dim, batched or not
    ((0, 3, 4), (3, 4)), ((2, 0, 4), (0, 4)), ((2, 3, 0), (3, 0)),  # a zero normalized dim
    ((0, 1), (1,)),  # torch's own OpInfo sample
], ids=str)
def test_norm_empty(device, shape, norm_shape, affine):
    """Zero-size dims: torch's empty output; weight and bias gradients zero (no rows) or empty."""
    x, w, b = ln_args(shape, norm_shape, affine, torch.float32, device)
    check_layer_norm(x, w, b, norm_shape)
    check_rms_norm(x, w, norm_shape)


@pytest.mark.parametrize("looped", [False, True])
def test_norm_gradcheck(device, monkeypatch, looped):
    # 3 row blocks of 2, one or two passes, one backward program looping over all of them
    force_config(monkeypatch, block_r=2, block_n=16 if looped else 64)
    few_sms(monkeypatch)
    x = randn(5, 2, 9 if looped else 5, dtype=torch.float64, device=device).requires_grad_()
    w = randn(*x.shape[1:], dtype=torch.float64, device=device).requires_grad_()
    b = randn(*x.shape[1:], dtype=torch.float64, device=device).requires_grad_()
    fast = {"fast_mode": looped}  # fast: random projections, a few launches instead of one per element
    assert torch.autograd.gradcheck(lambda *t: layer_norm(t[0], x.shape[1:], *t[1:]), (x, w, b), **fast)
    assert torch.autograd.gradcheck(lambda *t: rms_norm(t[0], x.shape[1:], *t[1:]), (x, w), **fast)


# --------------------------------------------------------------------------- weight gradients


@pytest.mark.parametrize("looped", [False, True])
def test_weight_grads_are_deterministic(device, monkeypatch, looped):
    """Two-stage reduction, no atomics: bit-identical weight and bias gradients run to run."""
    if looped:
        small_chunks(monkeypatch, block_r=8)
    few_sms(monkeypatch, sms=3)  # 6 programs, each summing several row blocks
    x, w, b = (t.requires_grad_() for t in ln_args((201, 100), (100,), "weight_bias", torch.float16, device))
    g = randn(201, 100, dtype=torch.float16, device=device)
    runs = [torch.autograd.grad(layer_norm(x, (100,), w, b), (x, w, b), g) for _ in range(2)]
    runs += [torch.autograd.grad(rms_norm(x, (100,), w), (x, w), g) for _ in range(2)]
    for a, c in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_only_the_asked_grads(device):
    x, w, b = ln_args((4, 16), (16,), "weight_bias", torch.float32, device)
    w.requires_grad_()
    out = layer_norm(x, (16,), w, b)
    (gw,) = torch.autograd.grad(out.sum(), w)
    x64, w64 = x.double(), w.detach().double().requires_grad_()
    testing.assert_close(gw, torch.autograd.grad(F.layer_norm(x64, (16,), w64, b.double()).sum(), w64)[0],
                           torch.autograd.grad(F.layer_norm(x, (16,), w, b).sum(), w)[0])


# --------------------------------------------------------------------------- parameters of another dtype


def _mixed_run(fn, x, params, dtypes):
    """fn's output and gradients with x and each parameter cast to its dtype in `dtypes`."""
    leaves = [t.detach().to(dt).requires_grad_() for t, dt in zip([x, *params], dtypes)]
    out = fn(leaves[0], *leaves[1:])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return out, torch.autograd.grad(out, leaves, g.to(device=out.device, dtype=out.dtype))


@pytest.mark.parametrize("op,dtypes", [
    ("layer_norm", (torch.bfloat16, torch.float32, torch.float32)),  # torch's mixed-dtype layer_norm
    ("layer_norm", (torch.float16, torch.float32, torch.float32)),
    ("rms_norm", (torch.bfloat16, torch.float32)),  # a model's fp32 norm weight on a bf16 activation
    ("rms_norm", (torch.float32, torch.bfloat16)),
    ("rms_norm", (torch.float16, torch.bfloat16)),
    ("rms_norm", (torch.float64, torch.float32)),
])
@pytest.mark.parametrize("looped", [False, True])
def test_norm_parameters_of_another_dtype(device, monkeypatch, op, dtypes, looped):
    """As torch: the output in input's dtype, each gradient in its tensor's dtype, values held
    to float64 with torch's error at the input's precision as the bar."""
    if looped:
        small_chunks(monkeypatch, block_n=16)
    x = randn(6, 2, 37, device=device) * 2 + 0.5
    params = [randn(37, device=device) for _ in dtypes[1:]]
    ours, theirs = (layer_norm, F.layer_norm) if op == "layer_norm" else (rms_norm, F.rms_norm)

    def call(fn):
        return (lambda x, w: fn(x, (37,), w, 1e-5)) if op == "rms_norm" else (lambda x, w, b: fn(x, (37,), w, b))

    out, grads = _mixed_run(call(ours), x, params, dtypes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "Mismatch dtype ... fused implementation"
        torch_out, torch_grads = _mixed_run(call(theirs), x, params, dtypes)
    ref_out, ref_grads = _mixed_run(call(theirs), x, params, [torch.float64] * len(dtypes))
    assert out.dtype == torch_out.dtype  # input's in torch 2.13; see the test below for a torch that promotes
    testing.assert_close(out, ref_out, torch_out, what="output")
    for i, (g, t, r) in enumerate(zip(grads, torch_grads, ref_grads, strict=True)):
        assert g.dtype == t.dtype, f"grad {i}: {g.dtype}, torch's {t.dtype}"
        testing.assert_close(g, r, t, dtype=dtypes[0], what=f"grad of input {i}")


def test_rms_norm_follows_a_torch_that_promotes_with_the_weight(device, monkeypatch):
    """Where torch's rms_norm returns promote_types(input, weight) for a weight of another dtype
    (an older composite), ours does too: output, gradient dtypes and values, forward and fake."""
    monkeypatch.setattr(norm_ops, "_RMS_NORM_PROMOTES", True)
    x = (randn(5, 3, 24, device=device) * 2).bfloat16().requires_grad_()
    w = randn(24, device=device).requires_grad_()
    out = rms_norm(x, (24,), w, 1e-5)
    assert out.dtype == torch.float32
    mode = torch._subclasses.FakeTensorMode()
    fx, fw = mode.from_tensor(x.detach()), mode.from_tensor(w.detach())
    with mode:
        fake = norm_ops.rms_norm_op(fx, [24], fw, 1e-5)[0]
    assert fake.dtype == torch.float32
    xd, wd = x.detach().double(), w.detach().double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    testing.assert_close(out, ref, None, dtype=torch.bfloat16)  # one bf16 rounding: the input's
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_importing_leaves_torchs_one_mismatch_warning_to_the_user():
    """Asking torch's rms_norm for its dtype rule at import must not use up torch's warn-once."""
    import subprocess
    import sys

    code = ("import warnings, torch, tritonops\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    torch.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), [4], torch.ones(4))\n"
            "assert any('Mismatch dtype' in str(w.message) for w in seen), [str(w.message) for w in seen]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_layer_norm_parameter_dtypes_torch_refuses(device):
    """layer_norm takes float32 parameters only for a 16-bit input, and both of one dtype."""
    x16, x32 = randn(3, 4, dtype=torch.bfloat16, device=device), randn(3, 4, device=device)
    w, b = randn(4, device=device), randn(4, device=device)
    for args in [(x32, w.bfloat16(), b.bfloat16()), (x16, w, b.bfloat16()), (x16, w.bfloat16(), b),
                 (x16.half(), w.bfloat16(), None), (x32.double(), w, b)]:
        with pytest.raises(RuntimeError):
            F.layer_norm(args[0], (4,), *args[1:])
        with pytest.raises(RuntimeError, match="dtype"):
            layer_norm(args[0], (4,), *args[1:])


# --------------------------------------------------------------------------- errors, configs


def _raises_like_torch(ours, theirs):
    with pytest.raises(Exception) as want:
        theirs()
    with pytest.raises(type(want.value)) as got:
        ours()
    assert str(got.value) == str(want.value)


def test_norm_errors_like_torch(device):
    x = randn(3, 4, device=device)
    w5, w4 = randn(5, device=device), randn(4, device=device)
    for shape in [(5,), (3, 4, 5), (2, 4), ()]:
        _raises_like_torch(lambda: layer_norm(x, shape), lambda: F.layer_norm(x, shape))
    _raises_like_torch(lambda: layer_norm(x, (4,), w5), lambda: F.layer_norm(x, (4,), w5))
    _raises_like_torch(lambda: layer_norm(x, (4,), w4, w5), lambda: F.layer_norm(x, (4,), w4, w5))
    _raises_like_torch(lambda: rms_norm(x, (4,), w5), lambda: F.rms_norm(x, (4,), w5))
    with pytest.raises(RuntimeError, match="Given normalized_shape"):
        rms_norm(x, (5,))
    with pytest.raises(RuntimeError, match="dtype"):
        layer_norm(x, (4,), w4.half())
    with pytest.raises(RuntimeError, match="device"):
        rms_norm(x, (4,), torch.empty(4, device="meta"))
    with pytest.raises(TypeError, match="int64"):
        layer_norm(torch.ones(3, 4, dtype=torch.int64), (4,))


class _Index:
    def __index__(self):
        return 4


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("normalized_shape", [
    (4,), [4], torch.Size([4]), (3, 4), [3, 4], torch.Size([3, 4]),  # taken
    (np.int64(4),), (_Index(),), (torch.tensor(4),), (torch.tensor([4]),),  # elements taken through __index__
    4, 4.0, None, "4", torch.tensor(4), torch.tensor([4]), np.array([4]), range(4, 5),  # not a tuple: TypeError
    (4.0,), (True,), (4, None), (torch.tensor(4.0),),  # elements not ints: TypeError
    (torch.tensor(True),),  # RuntimeError
    (), [], (5,), (-1,), (2, 4),  # shapes that do not fit: RuntimeError
], ids=repr)
def test_normalized_shape_like_torch(device, op, normalized_shape):
    """normalized_shape as F.layer_norm / F.rms_norm take it: a tuple, list or torch.Size of ints;
    a bare int is a TypeError there, so here (nn.LayerNorm's constructor is what accepts one)."""
    ours, theirs = (layer_norm, F.layer_norm) if op == "layer_norm" else (rms_norm, F.rms_norm)
    x = randn(3, 4, device=device)
    try:
        want = theirs(x, normalized_shape)
    except (TypeError, RuntimeError) as e:
        with pytest.raises(type(e)):
            ours(x, normalized_shape)
        return
    testing.assert_close(ours(x, normalized_shape), theirs(x.double(), normalized_shape), want)


def test_norm_config_keeps_gpu_rules():
    for n in (1, 7, 64, 1000, 2048, 8191, 16384, 16385, 100_000, 2**20):
        for rows in (1, 3, 1000, 10**6):
            for dtype in (torch.float16, torch.float32, torch.float64):
                for fn, key, space in (
                        (norm_tuning.norm_heuristic, norm_tuning.norm_key(n, rows, dtype, False, True), norm_tuning.NORM_SPACE),
                        (norm_tuning.norm_bwd_heuristic, norm_tuning.norm_bwd_key(n, rows, dtype, False, True, True),
                         norm_tuning.NORM_BWD_SPACE)):
                    cfg = fn(key)
                    assert space.valid(cfg, norm_tuning._problem(key))  # in its space
                    m, b = cfg["BLOCK_R"], cfg["BLOCK_N"]
                    assert m & (m - 1) == 0 and b & (b - 1) == 0 and b >= 16
                    assert m * b <= row_tiling.ONE_PASS_MAX[dtype.itemsize]
                    # whole rows no longer than compile cleanly for sm90 (no spills)
                    whole = row_tiling.WHOLE_ROW_FWD if space is norm_tuning.NORM_SPACE else row_tiling.WHOLE_ROW_BWD
                    assert b <= whole[dtype.itemsize]
                    assert cfg.num_warps in (4, 8, 16, 32)
                    assert (cfg.num_stages == 2) == (n > b)
