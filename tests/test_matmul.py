import pytest
import torch
import torch.nn.functional as F

import tritonops
from tritonops import reference, runtime, testing
from tritonops.ops import matmul as matmul_ops
from tritonops.tuning import matmul as matmul_tuning
from tritonops.ops._common import dot_input_precision

from .utils import check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- matmul forward + backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [
    ((29,), (29,)),  # 1-D x 1-D
    ((29,), (29, 13)),  # 1-D x 2-D
    ((37, 29), (29,)),  # 2-D x 1-D
    ((37, 29), (29, 53)),  # odd sizes, tails in every dim
    ((1, 1), (1, 1)),
    ((1, 131), (131, 17)),  # decode-like M = 1, K past one block
    ((2, 3, 7, 19), (19, 5)),  # batch folded into M
    ((2, 1, 7, 19), (3, 19, 5)),  # broadcast batch dims
    ((7, 19), (2, 19, 5)),  # 2-D x batched
    ((4, 19), (2, 3, 19, 1)),
    ((3, 19), (19,)),
], ids=lambda s: "x".join(str(list(t)) for t in s))
def test_matmul(device, dtype, shapes):
    a, b = randn(*shapes[0], dtype=dtype, device=device), randn(*shapes[1], dtype=dtype, device=device)
    check_op(tritonops.matmul, torch.matmul, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["a_t", "b_t", "both_t", "sliced", "batch_t"])
def test_matmul_strides(device, dtype, layout):
    """Transposed and sliced operands are read through their strides."""
    M, N, K = 23, 41, 37
    if layout == "batch_t":
        a, b = randn(K, 3, M, dtype=dtype, device=device), randn(3, K, N, dtype=dtype, device=device)
        views = lambda t: [t[0].permute(1, 2, 0), t[1]]  # a is (3, M, K) with no unit stride in K
    elif layout == "sliced":
        a, b = randn(M, 2 * K, dtype=dtype, device=device), randn(K, 3 * N, dtype=dtype, device=device)
        views = lambda t: [t[0][:, ::2], t[1][:, 1::3]]
    else:
        a = randn(K, M, dtype=dtype, device=device) if layout in ("a_t", "both_t") else randn(M, K, dtype=dtype, device=device)
        b = randn(N, K, dtype=dtype, device=device) if layout in ("b_t", "both_t") else randn(K, N, dtype=dtype, device=device)
        views = lambda t: [t[0].t() if layout in ("a_t", "both_t") else t[0],
                           t[1].t() if layout in ("b_t", "both_t") else t[1]]
    check_op(tritonops.matmul, torch.matmul, a, b, strided=views)


def test_transposed_operand_is_not_copied(device, monkeypatch):
    """The kernel receives the caller's storage, with the transposed strides."""
    a, b = randn(16, 24, device=device), randn(32, 24, device=device)
    seen = []
    launch = matmul_ops.launch_matmul

    def spy(x, y, *args, **kwargs):
        seen.append((x.data_ptr(), x.stride(), y.data_ptr(), y.stride()))
        return launch(x, y, *args, **kwargs)

    monkeypatch.setattr(matmul_ops, "launch_matmul", spy)
    tritonops.matmul(a, b.t())
    assert seen[0][2] == b.data_ptr() and seen[0][3][1:] == (1, 24)


# Every rank combination torch.matmul takes, as (B, M, K, N) -> operand shapes.
_MATMUL_RANKS = [
    lambda B, M, K, N: ((K,), (K,)),
    lambda B, M, K, N: ((K,), (K, N)),
    lambda B, M, K, N: ((M, K), (K,)),
    lambda B, M, K, N: ((M, K), (K, N)),
    lambda B, M, K, N: ((B, M, K), (K, N)),  # batch folded into M
    lambda B, M, K, N: ((B, M, K), (K,)),
    lambda B, M, K, N: ((K,), (B, K, N)),
    lambda B, M, K, N: ((M, K), (B, K, N)),
    lambda B, M, K, N: ((B, M, K), (B, K, N)),
    lambda B, M, K, N: ((B, 1, M, K), (3, K, N)),  # broadcast batch dims
    lambda B, M, K, N: ((1, M, K), (B, K, N)),
]
_DIMS = (2, 3, 4, 5)


def _zeroed(ranks, zero: int):
    """The operand shapes of `ranks` with dim `zero` of (B, M, K, N) set to 0."""
    return ranks(*(0 if i == zero else d for i, d in enumerate(_DIMS)))


# Each of B, M, K, N set to 0 in turn, in every rank combination; and torch's own OpInfo samples.
_EMPTY_MATMUL = sorted({_zeroed(r, z) for r in _MATMUL_RANKS for z in range(4)
                        if _zeroed(r, z) != r(*_DIMS)}  # a B of 0 leaves ranks without B unchanged
                       | {((5, 5, 0), (0, 5)), ((0, 0), (5, 0, 0)), ((0, 1, 3, 4), (3, 4, 5))})


@pytest.mark.parametrize("shapes", _EMPTY_MATMUL, ids=lambda s: "x".join(str(list(t)) for t in s))
def test_matmul_empty(device, shapes):
    """Zero-size dims anywhere: torch's shapes, zeros for K = 0, and gradients (zero or empty) as torch's."""
    check_op(tritonops.matmul, torch.matmul, *(randn(*s, device=device) for s in shapes))


def test_matmul_gradcheck(device):
    a = randn(5, 7, device=device, dtype=torch.float64).requires_grad_()
    b = randn(2, 7, 3, device=device, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(tritonops.matmul, (a, b))


def test_fp32_precision_follows_torch(monkeypatch):
    for setting, expected in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]:
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda s=setting: s)
        assert dot_input_precision(torch.float32) == expected
    assert dot_input_precision(torch.float64) == "ieee"


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(device, dtype, activation, with_bias):
    x = randn(3, 11, 37, dtype=dtype, device=device)
    w = randn(45, 37, dtype=dtype, device=device) / 6
    b = randn(45, dtype=dtype, device=device) if with_bias else None
    args = (x, w, b) if with_bias else (x, w)
    check_op(lambda *t: tritonops.linear(*t, activation=activation),
             lambda *t: reference.linear(*t, activation_name=activation), *args)


@pytest.mark.parametrize("shapes", [((37,), (5, 37), (5,)), ((37,), (37,), ()), ((3, 4, 37), (37,), None),
                                    ((1, 9), (1, 9), (1,))])
def test_linear_vector_shapes(device, shapes):
    x, w, b = (randn(*s, device=device) if s is not None else None for s in shapes)
    check_op(tritonops.linear, F.linear, *(t for t in (x, w, b) if t is not None))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradcheck(device, activation):
    x = randn(2, 3, 7, device=device, dtype=torch.float64).requires_grad_()
    w = randn(5, 7, device=device, dtype=torch.float64).requires_grad_()
    b = randn(5, device=device, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: tritonops.linear(*t, activation=activation), (x, w, b))


def test_linear_non_contiguous_input(device):
    x = randn(6, 40, device=device)
    w = randn(9, 20, device=device)
    check_op(tritonops.linear, F.linear, x, w, strided=lambda t: [t[0][::2, ::2], t[1]])


# (input, weight) shapes of linear with one of rows, batch, K or N zero, for 2-D and 1-D weights.
_EMPTY_LINEAR = [((0, 7), (5, 7)), ((4, 0), (5, 0)), ((4, 7), (0, 7)), ((0, 0), (0, 0)),
                 ((0, 3, 7), (5, 7)), ((2, 0, 7), (5, 7)), ((2, 3, 0), (5, 0)), ((2, 3, 7), (0, 7)),
                 ((0,), (5, 0)), ((7,), (0, 7)),
                 ((0, 7), (7,)), ((4, 0), (0,)), ((0,), (0,)), ((2, 0, 7), (7,)), ((2, 3, 0), (0,))]


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("shapes,with_bias", [(s, b) for s in _EMPTY_LINEAR for b in (False, True)
                                              # torch takes no bias with a 1-D weight and a 2-D input
                                              if not (b and len(s[1]) == 1 and len(s[0]) == 2)], ids=str)
def test_linear_empty(device, shapes, with_bias, activation):
    """Zero-size dims: torch's shapes, the (activated) bias for K = 0, gradients as torch's."""
    x, w = randn(*shapes[0], device=device), randn(*shapes[1], device=device)
    b = (randn(*w.shape[:-1], device=device),) if with_bias else ()
    check_op(lambda *t: tritonops.linear(*t, activation=activation),
             lambda *t: reference.linear(*t, activation_name=activation), x, w, *b)


@pytest.mark.parametrize("shapes", [((4, 3), (3,), ()), ((3,), (3,), (1,)), ((2, 4, 3), (3,), (1,)),
                                    ((3,), (3,), ()), ((2, 4, 3), (3,), ()), ((4, 3), (5, 3), (3,))], ids=str)
def test_linear_bias_rules(device, shapes):
    """With a 1-D weight torch takes only a 0-D bias, and not for a 2-D input: ours as torch."""
    x, w, b = (randn(*s, device=device, dtype=torch.float64) for s in shapes)
    try:
        want = F.linear(x, w, b)
    except RuntimeError as e:
        with pytest.raises(type(e)):
            tritonops.linear(x, w, b)
        return
    testing.assert_close(tritonops.linear(x, w, b), want, None)


def test_linear_k_zero_gives_bias(device):
    x, w, b = randn(4, 0, device=device), randn(3, 0, device=device), randn(3, device=device)
    out = tritonops.linear(x, w, b, activation="relu")
    assert torch.equal(out, F.relu(b).expand(4, 3))


def test_linear_bias_grad_is_deterministic(device):
    x = randn(300, 64, device=device, dtype=torch.float16)
    w = randn(48, 64, device=device, dtype=torch.float16).requires_grad_()
    b = randn(48, device=device, dtype=torch.float16).requires_grad_()
    grads = []
    for _ in range(2):
        out = tritonops.linear(x, w, b, activation="gelu")
        grads.append(torch.autograd.grad(out.sum(), (w, b)))
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


# --------------------------------------------------------------------------- special values

INF, NAN = float("inf"), float("nan")
# NaN, +-inf, signed zeros, and finite pre-activations whose square overflows fp32 (above 1.8e19)
SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 1e20, -1e20, 1e30, -1e30]


# NaN and inf results are the point here; the interpreter's numpy warns about computing them.
@pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a])
def test_linear_activation_special_values_like_torch(device, dtype, activation):
    """Each fused activation and its gradient, element by element, against torch's twin (reference.py)
    in float64, torch's own result at `dtype` setting the bar. K = 1 and a unit weight make the
    pre-activation z = x exactly (float16 turns the largest into inf), and dx = dy * activation'(z)."""
    z = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), torch.randn(8, dtype=torch.float64) * 4])
    x = z.to(dtype).to(device)[:, None]
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)

    def run(fn, dt):
        leaf = x.to(dt).requires_grad_()
        out = fn(leaf, torch.ones(1, 1, dtype=dt, device=device))
        return out, torch.autograd.grad(out, leaf, dy.to(dt))[0]

    ours = run(lambda *t: tritonops.linear(*t, activation=activation), dtype)
    ref = run(lambda *t: reference.linear(*t, activation_name=activation), torch.float64)
    theirs = run(lambda *t: reference.linear(*t, activation_name=activation), dtype)
    for what, o, r, t in zip(("output", "input gradient"), ours, ref, theirs):
        for i in range(len(z)):
            testing.assert_close(o[i], r[i], t[i], dtype, what=f"{activation} {what} at z = {x[i].item()}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_linear_relu_keeps_nan(device):
    """NaN in a row makes its outputs NaN through relu as in torch, instead of relu's max dropping it."""
    x = torch.tensor([[NAN, 1.0], [2.0, -1.0]], device=device)
    out = tritonops.linear(x, torch.ones(2, 2, device=device), activation="relu")
    assert torch.equal(out.isnan(), torch.relu(F.linear(x, torch.ones(2, 2, device=device))).isnan())
    assert out.isnan()[0].all() and torch.equal(out[1], torch.ones(2, device=device))


# --------------------------------------------------------------------------- errors


def test_mismatched_inner_dims_raise_like_torch(device):
    a, b = randn(3, 4, device=device), randn(5, 6, device=device)
    with pytest.raises(RuntimeError) as torch_err:
        torch.matmul(a, b)
    with pytest.raises(type(torch_err.value), match=r"cannot be multiplied \(3x4 and 5x6\)"):
        tritonops.matmul(a, b)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        tritonops.linear(a, randn(2, 5, device=device))
    with pytest.raises(RuntimeError):
        tritonops.matmul(randn(2, 3, 4, device=device), randn(3, 4, 5, device=device))  # batch 2 vs 3


def test_bad_inputs_are_named(device):
    a = randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match="dtype"):
        tritonops.matmul(a, randn(4, 2, device=device, dtype=torch.float16))
    with pytest.raises(TypeError, match="int64"):
        tritonops.matmul(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="device"):
        tritonops.matmul(a, torch.empty(4, 2, device="meta"))
    with pytest.raises(ValueError, match="activation 'tanh'"):
        tritonops.linear(a, randn(2, 4, device=device), activation="tanh")
    with pytest.raises(RuntimeError, match="bias has shape"):
        tritonops.linear(a, randn(2, 4, device=device), randn(3, device=device))
    with pytest.raises(RuntimeError, match="at least 1D"):
        tritonops.matmul(torch.tensor(1.0), a)


# --------------------------------------------------------------------------- harness


def test_outputs_are_poisoned():
    """The harness itself: buffers start as NaN, so an unwritten element cannot pass."""
    assert runtime.POISON
    assert torch.isnan(runtime.new_output((4, 4), torch.bfloat16, torch.device("cpu"))).all()


def test_assert_close_catches_a_wrong_element():
    ref = torch.randn(8, 8, dtype=torch.float64)
    ours = ref.to(torch.float16)
    testing.assert_close(ours, ref, None)  # correctly rounded: within float16's floor alone
    # The bar is torch's own error: 2 x 4e-3 + the floor passes 6e-3, not 1e-2; the floor alone not 6e-3.
    torch_result = ref * (1 + 4e-3)
    testing.assert_close(ref * (1 + 6e-3), ref, torch_result, torch.float16)
    with pytest.raises(AssertionError):
        testing.assert_close(ref * (1 + 1e-2), ref, torch_result, torch.float16)
    with pytest.raises(AssertionError):
        testing.assert_close(ref * (1 + 6e-3), ref, None, torch.float16)
    ours[3, 5] = float("nan")
    with pytest.raises(AssertionError):
        testing.assert_close(ours, ref, ref.to(torch.float16))
    ours[3, 5] = ref[3, 5] + 0.05
    with pytest.raises(AssertionError):
        testing.assert_close(ours, ref, ref.to(torch.float16))


def test_heuristic_config_keeps_gpu_rules():
    for M, N, K in [(1, 1, 1), (1, 4096, 4096), (8192, 8192, 8192), (37, 53, 29)]:
        for dtype in (torch.float16, torch.float32, torch.float64):
            cfg = matmul_tuning.matmul_heuristic(matmul_tuning.MatmulKey(M, N, K, str(dtype)[6:], True, True, False))
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0
            smem = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * dtype.itemsize * cfg.num_stages
            assert smem <= 227 * 1024
