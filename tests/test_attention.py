"""tritonops.attention against torch's scaled_dot_product_attention (float64 reference, and
torch at the same precision for the error bar), forward and backward."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import triton
from autotune import Config
from tritonops import runtime, testing
from tritonops.ops import attention as attn_ops
from tritonops.tuning import attention as attn_tuning
from tritonops.ops.attention import attention

from .utils import check_op, qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
sdpa = F.scaled_dot_product_attention


def sdpa_math(*args, **kwargs):
    """torch's math backend. Its 4-D CPU flash backend gives NaN for causal with a negative
    scale, applies attn_mask together with is_causal where the math backend (and the docs)
    refuse, and accepts key and value of different lengths."""
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa(*args, **kwargs)


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- forward + backward vs torch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [
    (2, 3, 37, 53, 24, 40),  # tails in L and S, E and Ev not powers of two, Ev != E
    (1, 2, 70, 20, 72, 16),  # L > S (causal: rows past S see every key)
    (1, 2, 20, 70, 40, 40),  # L < S (causal: the last keys are never attended)
    (2, 2, 1, 33, 64, 64),  # decoding: L = 1
    (1, 2, 17, 1, 16, 32),  # a single key
], ids=lambda s: "B{}H{}L{}S{}E{}Ev{}".format(*s))
def test_attention(device, dtype, causal, shape):
    B, H, L, S, E, EV = shape
    # causal with L = 1 attends key 0 only: dq and dk are zero, whose relative error is
    # noise over noise; test_causal_single_query_row checks that case's gradients.
    check_op(attention, sdpa, *qkv(B, H, L, S, E, EV, dtype=dtype, device=device), is_causal=causal,
             backward=not (causal and L == 1))


@pytest.fixture(params=[False, True], ids=["output-delta", "exact-delta"])
def exact_delta(request, monkeypatch):
    """The backward's delta both ways: FlashAttention-2's rowsum(O * dO) (the default) and the
    one formed from the backward's own p and dp ($TRITONOPS_ATTENTION_EXACT_DELTA=1)."""
    monkeypatch.setenv(attn_ops.EXACT_DELTA_VARIABLE, "1" if request.param else "0")
    return request.param


@pytest.fixture
def exact_delta_on(monkeypatch):
    monkeypatch.setenv(attn_ops.EXACT_DELTA_VARIABLE, "1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_single_query_row(device, dtype, exact_delta):
    """L = 1, causal: the row sees key 0 alone (softmax = 1), so out = v[0], dv[0] = do and the
    rest of dv, all of dq and dk vanish. FlashAttention-2's delta = rowsum(o * do) leaves only
    rounding noise (fp32 sums of the same terms in two orders) in dq and dk; the exact delta
    makes dp - delta 0 where the recomputed scores match the forward's bit for bit (they do
    under the interpreter); the bound leaves room for a GPU whose transposed dot rounds otherwise."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 1, 33, 64, dtype=dtype, device=device))
    out = attention(q, k, v, is_causal=True)
    assert torch.equal(out, v[:, :, :1].detach())
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    testing.assert_close(dv[:, :, :1], do.double(), None)
    assert not dv[:, :, 1:].any()
    assert dq.abs().max() < 1e-4 and dk.abs().max() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_head(device, dtype):
    """Head dim 256 (the largest supported), a tiny sequence."""
    check_op(attention, sdpa, *qkv(1, 1, 5, 9, 256, 256, dtype=dtype, device=device), is_causal=True)


@pytest.mark.parametrize("shapes", [
    ((13, 24), (21, 24), (21, 16)),  # 2-D: no batch at all
    ((3, 13, 24), (3, 21, 24), (3, 21, 16)),  # 3-D
    ((2, 2, 3, 13, 24), (2, 2, 3, 21, 24), (2, 2, 3, 21, 16)),  # 5-D
    ((2, 3, 13, 24), (1, 3, 21, 24), (2, 1, 21, 16)),  # batch dims broadcast between q, k, v
    ((1, 3, 13, 24), (2, 3, 21, 24), (2, 3, 21, 16)),  # ... q broadcast too
    ((2, 1, 3, 13, 24), (1, 2, 3, 21, 24), (2, 2, 3, 21, 16)),  # 5-D broadcast, no single Z stride
], ids=["2d", "3d", "5d", "bcast", "bcast_q", "bcast_5d"])
def test_batch_dims(device, shapes):
    q, k, v = (randn(*s, device=device) for s in shapes)
    check_op(attention, sdpa, q, k, v)
    check_op(attention, sdpa, q, k, v, is_causal=True, backward=False)


def test_explicit_scale(device):
    q, k, v = qkv(1, 2, 19, 23, 32)
    check_op(attention, sdpa, q, k, v, scale=0.37)
    check_op(attention, sdpa_math, q, k, v, is_causal=True, scale=-0.3)


def test_head_dim_below_16(device):
    """Padded to 16 and masked, as any other head dim."""
    check_op(attention, sdpa, *qkv(1, 2, 9, 11, 8, 4, device=device))


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(2, 1, 29, 45), (29, 45), (1, 3, 1, 45), (2, 3, 29, 45)],
                         ids=["over_heads", "over_batch_heads", "rows_too", "full"])
def test_bool_mask(device, dtype, mask_shape):
    q, k, v = qkv(2, 3, 29, 45, 24, 16, dtype=dtype, device=device)
    mask = torch.rand(mask_shape, device=device) > 0.3
    check_op(attention, sdpa, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(1, 3, 29, 45), (29, 45)], ids=["over_batch", "over_batch_heads"])
def test_additive_mask_and_its_gradient(device, dtype, mask_shape):
    """An additive float mask (with -inf entries) gets its gradient like torch's, summed over
    the dims it broadcasts over."""
    q, k, v = qkv(2, 3, 29, 45, 24, 40, dtype=dtype, device=device)
    mask = randn(*mask_shape, device=device, dtype=dtype)
    mask[torch.rand(mask_shape, device=device) < 0.2] = float("-inf")
    check_op(attention, sdpa, q, k, v, mask)


def test_additive_mask_with_very_negative_rows(device):
    """Every score of a row far below 0 (lse << 0): padding keys past S must stay masked in
    backward, where exp2(0 - lse) would overflow. float64, where -1000 costs no precision."""
    q, k, v = qkv(1, 2, 21, 37, 24, 16, dtype=torch.float64, device=device)
    check_op(attention, sdpa, q, k, v, randn(21, 37, dtype=torch.float64, device=device) - 1000.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_mask_with_half_inputs(device, dtype):
    q, k, v = qkv(2, 2, 21, 19, 32, dtype=dtype, device=device)
    mask = randn(2, 1, 21, 19, device=device)
    ours = attention(q, k, v, attn_mask=mask)
    ref = sdpa(q.double(), k.double(), v.double(), attn_mask=mask.double())
    testing.assert_close(ours, ref, sdpa(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_match_torch(device, dtype, kind):
    """torch 2.13 (math and CPU flash backends) gives 0, not NaN, for a row with every key
    masked, and zero gradients through it; so do we."""
    q, k, v = qkv(2, 2, 24, 37, 16, dtype=dtype, device=device)
    keep = torch.rand(2, 1, 24, 37, device=device) > 0.5
    keep[:, :, [0, 5, 23]] = False  # rows 0, 5, 23: nothing to attend to
    keep[1, :, :, :] = False  # the whole second batch element
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
    expected = sdpa(q, k, v, attn_mask=mask)
    assert expected[:, :, [0, 5, 23]].eq(0).all() and expected[1].eq(0).all()  # torch's behaviour, pinned
    out = check_op(attention, sdpa, q, k, v, mask)  # positional: cast and differentiated with q, k, v
    assert out[:, :, [0, 5, 23]].eq(0).all() and out[1].eq(0).all()


@pytest.mark.xfail(strict=True, reason="a row masked everywhere by a finite bias of finfo.min magnitude: torch "
                   "averages the values uniformly, the kernels give the fully masked row's zeros (the bias scaled "
                   "to base 2 overflows to -inf; clamping it fixes the forward only, since the backward's "
                   "p = exp2(s - lse) cannot see log2(l) next to |lse| ~ 1e38)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_masked_by_the_lowest_finite_bias_are_uniform(device, dtype):
    """finfo.min is a finite "never" (the additive masks eager attention code builds): a row
    masked by it everywhere averages the values uniformly in torch."""
    q, k, v = qkv(2, 2, 9, 13, 16, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 9, 13, dtype=dtype, device=device)
    mask[:, :, [0, 4]] = torch.finfo(dtype).min  # every key of rows 0 and 4
    mask[:, :, 6, ::2] = torch.finfo(dtype).min  # half the keys of row 6
    mask[:, :, 7, 3] = -math.inf
    expected = sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(expected[:, :, 0], v.mean(-2))  # torch's behaviour, pinned
    out = check_op(attention, sdpa, q, k, v, mask)
    torch.testing.assert_close(out[:, :, [0, 4]], v.mean(-2, keepdim=True).expand(-1, -1, 2, -1))


def test_mask_is_read_through_broadcast_strides(device, monkeypatch):
    """A broadcast mask reaches the kernel as a stride-0 view of the caller's storage."""
    q, k, v = qkv(2, 3, 9, 12, 16, device=device)
    mask = torch.rand(9, 12, device=device) > 0.5
    seen = []
    launch = attn_ops.launch_attention_fwd

    def spy(q, k, v, mask, *args, **kwargs):
        seen.append((mask.data_ptr(), mask.stride()))
        return launch(q, k, v, mask, *args, **kwargs)

    monkeypatch.setattr(attn_ops, "launch_attention_fwd", spy)
    attention(q, k, v, attn_mask=mask)
    assert seen == [(mask.data_ptr(), (0, 0, 12, 1))]


# --------------------------------------------------------------------------- layouts


def _split_qkv(H, E):
    """q, k, v as views of one fused (B, L, 3 * H * E) projection: (B, H, L, E), no unit batch stride."""
    def split(t):
        B, L, _ = t[0].shape
        qkv = t[0].view(B, L, 3, H, E).permute(2, 0, 3, 1, 4)
        return [qkv[0], qkv[1], qkv[2]]
    return split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_qkv_views(device, dtype, causal):
    H, E = 3, 24
    x = randn(2, 31, 3 * H * E, dtype=dtype, device=device)
    check_op(attention, sdpa, x, strided=_split_qkv(H, E), is_causal=causal)


def test_fused_qkv_views_are_not_copied(device, monkeypatch):
    H, E = 2, 16
    x = randn(2, 7, 3 * H * E, device=device)
    q, k, v = _split_qkv(H, E)([x])
    seen = []
    launch = attn_ops.launch_attention_fwd

    def spy(q, k, v, *args, **kwargs):
        seen.append([(t.data_ptr(), t.stride()) for t in (q, k, v)])
        return launch(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attn_ops, "launch_attention_fwd", spy)
    attention(q, k, v)
    assert seen == [[(t.data_ptr(), t.stride()) for t in (q, k, v)]]


def test_non_contiguous_output_gradient(device):
    q, k, v = (t.double().requires_grad_() for t in qkv(2, 2, 13, 17, 16, 24, device=device))
    w = randn(2, 2, 24, 13, dtype=torch.float64, device=device)
    ours = torch.autograd.grad((attention(q, k, v).mT * w).sum(), (q, k, v))
    ref = torch.autograd.grad((sdpa(q, k, v).mT * w).sum(), (q, k, v))
    for o, r in zip(ours, ref):
        testing.assert_close(o, r, None)


def _like_torch(args, **kwargs):
    """attention and torch's SDPA on the float64 tensors `args`, forward and backward (d of
    every input, the float mask's included): equal results (the float64 floor), or an
    exception of the same type from both."""
    def run(fn):
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        try:
            out = fn(*leaves, **kwargs)
        except Exception as e:  # noqa: BLE001 - compared with torch's below
            return e, None
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        return out, torch.autograd.grad(out, [x for x in leaves if x.requires_grad], g, allow_unused=True)

    (theirs, their_grads), (ours, our_grads) = run(sdpa), run(attention)
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs), f"torch raises {theirs!r}, we give {ours!r}"
        return
    assert not isinstance(ours, Exception), f"torch returns, we raise {ours!r}"
    testing.assert_close(ours, theirs, None)
    for i, (o, t) in enumerate(zip(our_grads, their_grads, strict=True)):
        assert (o is None) == (t is None), f"grad {i}: ours {o}, torch's {t}"
        if t is not None:
            testing.assert_close(o, t, None, what=f"grad of input {i}")


def _sizes_with_zero(layout, zero):
    """q, k, v shapes of `layout` with the dim named `zero` 0: 3-D (the heads as batch), 4-D,
    4-D key/value under a 3-D query (batch dims broadcast), GQA (two query heads per key head)."""
    n = dict(B=2, H=2, L=3, S=5, E=4, Ev=6)
    n[zero] = 0
    B, H, L, S, E, EV = n.values()
    return {"3d": ((H, L, E), (H, S, E), (H, S, EV)),
            "4d": ((B, H, L, E), (B, H, S, E), (B, H, S, EV)),
            "bcast": ((H, L, E), (B, H, S, E), (B, 1, S, EV)),
            "gqa": ((B, 2 * H, L, E), (B, H, S, E), (B, H, S, EV))}[layout]


@pytest.mark.parametrize("layout, zero", [(layout, zero) for layout in ("3d", "4d", "bcast", "gqa")
                                          for zero in ("B", "H", "L", "S", "E", "Ev") if (layout, zero) != ("3d", "B")])
def test_zero_size_dims_like_torch(device, layout, zero):
    """Every dim 0 in turn, with an additive mask and causal: torch's answer, forward and
    backward. With no query rows or an empty value (S = 0, Ev = 0, or a batch dim of value 0)
    torch returns zeros shaped by the query alone (key's and value's batch dims not broadcast
    in: the "bcast" layout) and checks no shape; with E = 0 every score is 0 and each row
    averages the values it attends."""
    q, k, v = (torch.randn(s, dtype=torch.float64, device=device) for s in _sizes_with_zero(layout, zero))
    gqa = dict(enable_gqa=True) if layout == "gqa" else {}
    mask = torch.randn(q.shape[-2], k.shape[-2], dtype=torch.float64, device=device)
    _like_torch((q, k, v, mask), **gqa)
    _like_torch((q, k, v), is_causal=True, **gqa)


def test_gqa_without_key_heads(device):
    """Key and value with no heads: torch returns zeros (value is empty), and so do we. Only
    one of them without heads: torch 2.13 dies of a division by zero (SIGFPE), we raise."""
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64, device=device)
    k, v = (torch.randn(2, 0, 5, 8, dtype=torch.float64, device=device) for _ in range(2))
    _like_torch((q, k, v), enable_gqa=True)
    with pytest.raises(RuntimeError, match="must divide the number of heads"):
        attention(q, k, torch.randn(2, 2, 5, 8, dtype=torch.float64, device=device), enable_gqa=True)


# --------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(device, dtype, causal):
    q, k, v = qkv(2, 6, 21, 30, 32, 24, dtype=dtype, device=device, HK=2)
    check_op(attention, sdpa, q, k, v, is_causal=causal, enable_gqa=True)


def test_gqa_with_distinct_key_and_value_heads_and_mask(device):
    q = randn(2, 6, 11, 16, device=device)
    k, v = randn(1, 3, 14, 16, device=device), randn(2, 1, 14, 16, device=device)
    mask = randn(6, 11, 14, device=device)
    check_op(attention, sdpa, q, k, v, mask, enable_gqa=True)


def test_gqa_dk_dv_sum_over_group(device, monkeypatch):
    """GQA reaches the kernels with the key heads unexpanded (the dK/dV kernel sums the group)."""
    q, k, v = qkv(1, 4, 8, 8, 16, device=device, HK=2)
    seen = []
    launch = attn_ops.launch_attention_fwd
    monkeypatch.setattr(attn_ops, "launch_attention_fwd",
                        lambda q, k, v, *a, **kw: seen.append((q.shape, k.shape)) or launch(q, k, v, *a, **kw))
    attention(q, k, v, enable_gqa=True)
    assert seen == [((1, 4, 8, 16), (1, 2, 8, 16))]


# --------------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("case", ["plain", "causal", "mask", "gqa"])
def test_gradcheck(device, case):
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 5, 6, 16, 16, device=device))
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "gqa":
        k, v = k[:, :1].detach().requires_grad_(), v[:, :1].detach().requires_grad_()
        kwargs["enable_gqa"] = True
    args = (q, k, v)
    if case == "mask":
        args += (randn(2, 5, 6, dtype=torch.float64, device=device).requires_grad_(),)
    assert torch.autograd.gradcheck(lambda *t: attention(*t, **kwargs), args, fast_mode=True)


def test_gradcheck_full_mode(device):
    """Every Jacobian entry, on the tiniest shape: causal GQA with L != S."""
    q = randn(1, 2, 3, 16, dtype=torch.float64, device=device).requires_grad_()
    k, v = (randn(1, 1, 4, 16, dtype=torch.float64, device=device).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: attention(*t, is_causal=True, enable_gqa=True), (q, k, v))


def test_gradcheck_dropout(device):
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, 5, 6, 16, 16, device=device))

    def fn(*t):
        torch.manual_seed(1234)  # the same dropout mask in every evaluation
        return attention(*t, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# --------------------------------------------------------------------------- dropout


def _sdpa_with_keep(keep, p):
    """torch's math-backend attention with a given dropout keep-mask."""
    def fn(q, k, v, is_causal=False):
        s = (q @ k.mT) / math.sqrt(q.shape[-1])
        if is_causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), -math.inf)
        return (torch.softmax(s, -1) * keep.to(s.dtype) / (1 - p)) @ v
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_its_mask(device, dtype, causal):
    """Forward and backward equal torch's math on the exact keep-mask the kernels draw."""
    B, H, L, S, p, seed = 2, 2, 29, 37, 0.3, 4321
    torch.manual_seed(seed)
    keep = attn_ops.dropout_keep_mask(attn_ops.draw_dropout_seed(), B * H, L, S, p, device).view(B, H, L, S)

    def ours(q, k, v, is_causal=False):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=p, is_causal=is_causal)

    check_op(ours, _sdpa_with_keep(keep, p), *qkv(B, H, L, S, 24, 16, dtype=dtype, device=device),
             is_causal=causal)


def test_dropout_keep_rate_and_scaling(device):
    """Read the kernel's own dropout off its output: with equal scores and one-hot values,
    out[i, j] = keep[i, j] / (S (1 - p)). The keep rate is 1 - p within 5 sigma, rows and
    heads differ, and the mask is the one `dropout_keep_mask` reports."""
    H, L, S, p = 4, 48, 64, 0.3
    q, k = torch.zeros(1, H, L, 16, device=device), torch.zeros(1, H, S, 16, device=device)
    v = torch.eye(S, device=device).expand(1, H, S, S)
    torch.manual_seed(7)
    out = attention(q, k, v, dropout_p=p)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))))
    rate, n = kept.double().mean().item(), kept.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0, 0], kept[0, 0, 1])
    torch.manual_seed(7)
    assert torch.equal(kept[0], attn_ops.dropout_keep_mask(attn_ops.draw_dropout_seed(), H, L, S, p, device))


def test_dropout_is_reproducible(device):
    q, k, v = qkv(1, 2, 16, 16, 16, device=device)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(attention(q, k, v, dropout_p=0.5))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_dropout_edge_probabilities(device):
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 9, 11, 16, device=device))
    out = attention(q, k, v, dropout_p=1.0)  # everything dropped: zeros, as torch
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(attention(q, k, v, dropout_p=-0.5), attention(q, k, v))  # p <= 0: no dropout, as torch


# --------------------------------------------------------------------------- PyTorch's OpInfo samples


def _opinfo_specs():
    """The samples of PyTorch's OpInfo "nn.functional.scaled_dot_product_attention" (torch 2.13,
    sample_inputs_scaled_dot_product_attention), as (q shape, k/v shape, kwargs): 3-D, 4-D,
    and a 3-D query broadcast against a 4-D batch; causal or not; dropout 0 or 0.5; and a
    float mask. (Its generator also loops over an enable_gqa flag it never passes on, so it
    draws each of the first twelve twice, with other values; once here.)"""
    B, L, S, H, E = 4, 3, 6, 4, 8
    shapes = [((B, L, E), (B, S, E)), ((B, H, L, E), (B, H, S, E)), ((H, L, E), (B, H, S, E))]
    specs = [(q, kv, dict(is_causal=causal, dropout_p=p)) for q, kv in shapes for causal in (True, False)
             for p in (0.0, 0.5)]
    return specs + [((B, H, L, E), (B, H, S, E), dict(attn_mask=(L, S)))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("index", range(len(_opinfo_specs())))
def test_opinfo_samples(device, dtype, index, exact_delta_on):
    """Values up to +-9 at head dim 8 make softmax rows where one key takes nearly all the
    weight; there dp_j - delta cancels, and FlashAttention-2's delta, rowsum(O * dO) from the
    stored O, gives dQ and dK of the wrong sign (7 of these 26 cases fail the rule with it). With the exact delta, against float64, each within the tolerance of torch's error at
    the same precision; dropout samples against torch's math backend on the kernels' own
    keep-mask."""
    q_shape, kv_shape, kwargs = _opinfo_specs()[index]

    def make(shape):  # as the OpInfo makes them: uniform in [-9, 9]
        return torch.testing.make_tensor(shape, device=device, dtype=dtype)

    args = [make(q_shape), make(kv_shape), make(kv_shape)]
    if "attn_mask" in kwargs:  # positional, so check_op casts it and checks its gradient too
        args.append(make(kwargs.pop("attn_mask")))
    p = kwargs.pop("dropout_p", 0.0)
    if p == 0:
        check_op(attention, sdpa, *args, **kwargs)
        return
    seed = 1234
    batch = torch.broadcast_shapes(q_shape[:-2], kv_shape[:-2])
    torch.manual_seed(seed)
    keep = attn_ops.dropout_keep_mask(attn_ops.draw_dropout_seed(), math.prod(batch), q_shape[-2], kv_shape[-2], p,
                                      device).view(*batch, q_shape[-2], kv_shape[-2])

    def ours(q, k, v, **kw):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=p, **kw)

    def torch_math(q, k, v, **kw):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, p, dropout_mask=keep, **kw)[0]

    check_op(ours, torch_math, *args, **kwargs)


# --------------------------------------------------------------------------- memory, determinism, configs


class _Allocations(TorchDispatchMode):
    """The shapes of the non-empty tensors torch ops allocate inside the block (views and
    in-place ops allocate nothing; the interpreter's copies of kernel arguments are in-place
    `set_`s of storages it makes outside torch). Our custom ops are opened: what their bodies
    allocate is recorded, not just what they return."""

    BODIES = {torch.ops.tritonops.attention.default: attn_ops._attention_forward,
              torch.ops.tritonops.attention_backward.default: attn_ops._attention_backward}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BODIES:
            with self:
                return self.BODIES[func](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("mask", [False, True], ids=["causal", "mask"])
def test_memory_is_linear_in_sequence_length(device, mask, exact_delta):
    """The forward allocates O and the LSE, nothing else; the backward dQ, dK, dV and
    rowsum(O * dO) per row (and, with the exact delta, the delta the dQ kernel forms from it):
    no L x S buffer anywhere."""
    L = S = 128
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, L, S, 16, device=device))
    attn_mask = torch.rand(L, S, device=device) > 0.1 if mask else None
    with _Allocations() as fwd:
        out = attention(q, k, v, attn_mask=attn_mask, is_causal=not mask)
    assert fwd.shapes == [(1, 2, L, 16), (2, L)]  # O and the LSE
    g = torch.randn_like(out)
    with _Allocations() as bwd:
        out.backward(g)
    assert sorted(bwd.shapes) == [(1, 2, L, 16)] * 3 + [(2, L)] * (2 if exact_delta else 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured with the CUDA allocator")
def test_peak_memory_grows_linearly():
    q, k, v = qkv(1, 8, 8192, 8192, 64, dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attention(q, k, v, is_causal=True)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2 * (q.numel() * 2 + 8 * 8192 * 4)  # O and LSE, far from 8 x 8192^2 scores


def test_key_and_value_gradients_alone(device, exact_delta):
    """Without a gradient for the query the dQ kernel runs only its first pass, which forms
    the exact delta the dK/dV kernel reads (with FlashAttention-2's delta, it does not run):
    dk and dv equal the full backward's bit for bit."""
    q, k, v = qkv(1, 2, 21, 30, 16, device=device)
    k, v = k.requires_grad_(), v.requires_grad_()
    g = torch.randn(1, 2, 21, 16, device=device)
    alone = torch.autograd.grad(attention(q, k, v, is_causal=True), (k, v), g)
    full = torch.autograd.grad(attention(q.requires_grad_(), k, v, is_causal=True), (q, k, v), g)
    assert torch.equal(alone[0], full[1]) and torch.equal(alone[1], full[2])


def test_backward_is_deterministic(device):
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 40, 40, 32, dtype=torch.float16, device=device, HK=1))
    g = torch.randn(1, 4, 40, 32, dtype=torch.float16, device=device)
    runs = [torch.autograd.grad(attention(q, k, v, enable_gqa=True), (q, k, v), g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("blocks", [(16, 64), (64, 16), (32, 32)], ids=lambda b: "BM{}BN{}".format(*b))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_configs(device, blocks, causal):
    """Launchers take any Config: block shapes unlike the defaults (several blocks per loop,
    BLOCK_M < BLOCK_N on the causal diagonal) give the same results."""
    bm, bn = blocks
    cfg = Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2)
    q, k, v = (t.double() for t in qkv(1, 2, 70, 61, 24, 40, device=device))
    mask = None if causal else randn(70, 61, dtype=torch.float64, device=device).expand(1, 2, 70, 61)
    o, lse = attn_ops.launch_attention_fwd(q, k, v, mask, causal, 0.3, config=cfg)
    qr, kr, vr = (t.requires_grad_() for t in (q.clone(), k.clone(), v.clone()))
    ref = sdpa(qr, kr, vr, attn_mask=mask, is_causal=causal, scale=0.3)
    testing.assert_close(o, ref, None)
    s = (q @ k.mT) * 0.3 + (mask if mask is not None else 0)
    if causal:
        s = s.masked_fill(~torch.ones(70, 61, dtype=torch.bool).tril(), -math.inf)
    testing.assert_close(lse.view(1, 2, 70), torch.logsumexp(s, -1) / math.log(2), None)
    do = torch.randn_like(o)
    grads = attn_ops.launch_attention_bwd(do, q, k, v, mask, o, lse, causal, 0.3, dkdv_config=cfg, dq_config=cfg)
    for ours, r in zip(grads[:3], torch.autograd.grad(ref, (qr, kr, vr), do)):
        testing.assert_close(ours, r, None)


TUNERS = {"fwd": attn_tuning.ATTENTION_TUNER, "dkdv": attn_tuning.ATTENTION_BWD_DKDV_TUNER,
          "dq": attn_tuning.ATTENTION_BWD_DQ_TUNER, "preprocess": attn_tuning.ATTENTION_BWD_PREPROCESS_TUNER}


def _keys(E, dtype, L, S, causal=True, mask_kind="none", dropout=False, mask_grad=False, EV=None):
    """(tuner, key) of each of the four kernels for one problem (Ev = E unless given)."""
    EV = EV or E
    fwd = attn_tuning.attention_key(E, EV, L, S, dtype, causal, mask_kind, dropout)
    return [(TUNERS["fwd"], fwd), (TUNERS["dkdv"], fwd),
            (TUNERS["dq"], attn_tuning.attention_dq_key(E, EV, L, S, dtype, causal, mask_kind, dropout, mask_grad)),
            (TUNERS["preprocess"], attn_tuning.attention_preprocess_key(EV, L, dtype))]


def test_config_heuristics_keep_gpu_rules():
    """Every default: power-of-two blocks from 16, pruned to the extents, inside its own space
    (which checks shared memory against the H100's, registers and warps), for every head dim,
    dtype (float64 too: the interpreter's) and extent, with and without a mask and dropout."""
    limits = runtime.device_properties()
    for head_dim in (8, 16, 32, 64, 80, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for L, S in ((0, 0), (1, 1), (16, 4096), (4096, 16), (70, 61), (16384, 16384)):
                for flags in [dict(causal=True), dict(causal=False, mask_kind="add", dropout=True, mask_grad=True),
                              dict(causal=False, mask_kind="bool")]:
                    for tuner, key in _keys(head_dim, dtype, L, S, **flags):
                        cfg = tuner.default(key)
                        problem = tuner.problem(key)
                        assert tuner.space.valid(cfg, problem, limits), (tuner.name, key, cfg)
                        for name, n in (("BLOCK_M", L), ("BLOCK_N", S)):
                            if name in cfg.meta:
                                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0
                                assert cfg[name] <= max(16, triton.next_power_of_2(max(n, 1)))
                    cfg = attn_tuning.attention_config(_keys(head_dim, dtype, L, S)[0][1])
                    d = max(16, triton.next_power_of_2(head_dim))
                    smem = (cfg.num_stages * 2 * cfg["BLOCK_N"] + cfg["BLOCK_M"]) * d * dtype.itemsize
                    assert smem <= 200 * 1024  # the heuristic's own budget, under the H100's 227 KB
    assert attn_tuning.attention_config(attn_tuning.AttentionKey(128, False, "bfloat16", 16384, 16384, "none", False)) == Config(
        {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)  # Inductor's H100 default at d128
    assert attn_tuning.attention_config(attn_tuning.AttentionKey(64, True, "float16", 16384, 16384, "none", False)) == Config(
        {"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)  # ... and its d64 tile, on 8 warps (4 spill)


def test_keys_are_small_tuples(monkeypatch):
    """Keys are tuples of ints, bools and short strings; each launch selects with its own."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, 70, 61, 24, 40))
    key = attn_tuning.attention_key(24, 40, 70, 61, torch.float32, True, "bool", True)
    assert key == (64, True, "float32", 128, 64, "bool", True)
    assert attn_tuning.attention_dq_key(24, 40, 70, 61, torch.float32, False, "add", False, True) == (
        64, False, "float32", 128, 64, "add", False, True)
    assert attn_tuning.attention_preprocess_key(40, 70, torch.bfloat16) == (64, "bfloat16", 128)
    seen = []
    for tuner in TUNERS.values():
        monkeypatch.setattr(tuner, "select", lambda key, select=tuner.select: seen.append(key) or select(key))
    attention(q, k, v, is_causal=True).sum().backward()
    fwd = (64, True, "float32", 128, 64, "none", False)
    assert seen == [fwd, (64, "float32", 128), fwd + (False,), fwd]  # dQ first: it may form dK/dV's delta


def test_spaces_keep_their_rules():
    """Every candidate of each space: blocks within the extents, shared memory within the
    device's (and Hopper's) limit, 8 warps only on big enough tiles, the register budget."""
    limits = runtime.device_properties()
    for head_dim, dtype, L, S in ((64, torch.float16, 4096, 4096), (128, torch.bfloat16, 16384, 16384),
                                  (256, torch.float32, 100, 37), (24, torch.float64, 70, 61)):
        for tuner, key in _keys(head_dim, dtype, L, S):
            configs = tuner.space.configs(tuner.problem(key), limits)  # candidates() adds the default to these
            assert tuner.default(key) in configs
            d, itemsize = max(16, triton.next_power_of_2(head_dim)), dtype.itemsize
            for c in configs:
                bm, bn, warps, stages = c["BLOCK_M"], c.get("BLOCK_N", 16), c.num_warps, c.num_stages
                assert 16 <= bm <= max(16, triton.next_power_of_2(L)) and warps in (4, 8)
                if tuner is TUNERS["preprocess"]:
                    assert stages == 1 and 2 * bm * d <= 256 * 32 * warps
                    continue
                assert 16 <= bn <= max(16, triton.next_power_of_2(S)) and 1 <= stages <= 4
                if tuner is TUNERS["fwd"]:
                    smem, values = (bm + 2 * stages * bn) * d, bm * bn + bm * d
                    assert warps == 4 or (bm == 128 and bm * bn >= 128 * 64)  # sm90 (the stand-in is an H100)
                    # no spills and 8 KB of shared memory to spare, as measured compiling for sm90
                    assert values <= 144 * 32 * warps and (bm < 64 or bn <= bm)
                    assert smem * itemsize <= limits["max_shared_mem"] - 8 * 1024
                elif tuner is TUNERS["dkdv"]:
                    smem, values = ((2 * stages + 1) * bm + 2 * bn) * d, bn * bm + 2 * bn * d
                    assert warps == 4 or bn >= 64
                else:
                    smem, values = (bm + stages * bn) * 2 * d, bm * bn + bm * d
                    assert warps == 4 or bm >= 64
                assert smem * itemsize <= limits["max_shared_mem"] <= 232448
                assert values <= 256 * 32 * warps


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=lambda b: "BM{}BN{}".format(*b))
def test_forced_configs_reach_the_kernels(device, monkeypatch, blocks):
    """The public op launches whatever the tuners select: forced tiles unlike the defaults
    (BLOCK_M != BLOCK_N on the causal diagonal), forward and backward, against torch."""
    bm, bn = blocks
    cfg = Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2)
    for name in ("fwd", "dkdv", "dq"):
        monkeypatch.setattr(TUNERS[name], "select", lambda key: cfg)
    monkeypatch.setattr(TUNERS["preprocess"], "select", lambda key: Config({"BLOCK_M": bm}, num_stages=1))
    check_op(attention, sdpa, *qkv(1, 2, 45, 37, 24, 16, device=device), is_causal=True)


# --------------------------------------------------------------------------- torch.library


def test_op_matches_the_public_function():
    """The op with a seed is the public function with that seed drawn: same output, same grads."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 9, 11, 16, 24))
    p, scale = 0.3, 0.25
    torch.manual_seed(3)
    seed = attn_ops.draw_dropout_seed()
    torch.manual_seed(3)
    want = attention(q, k, v, dropout_p=p, scale=scale)
    got = attn_ops.attention_op(q, k, v, None, p, False, scale, seed, False)[0]
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert torch.equal(a, b)


def test_compile_draws_the_dropout_seed_like_eager():
    """attention with dropout under torch.compile(fullgraph=True): the seed is drawn inside the
    graph from torch's generator, so a torch.manual_seed gives eager's dropout mask, at each
    call (a seed fixed when the graph was traced would give the first call's mask again)."""
    fn = lambda q, k, v: attention(q, k, v, dropout_p=0.4, is_causal=True)  # noqa: E731
    args = [t.requires_grad_() for t in qkv(1, 2, 9, 11, 16)]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs = []
    for manual_seed in (11, 12):
        results = []
        for f in (fn, compiled):
            torch.manual_seed(manual_seed)
            out = f(*args)
            results.append((out, *torch.autograd.grad(out.sum(), args)))
        for ours, eager in zip(*results):
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        outs.append(results[1][0])
    assert not torch.equal(*outs)  # two seeds, two masks


# --------------------------------------------------------------------------- errors


def test_errors_like_torch(device):
    q, k, v = qkv(2, 4, 5, 6, 16, device=device)
    mask = torch.ones(5, 6, dtype=torch.bool, device=device)
    bad = [
        (dict(attn_mask=mask, is_causal=True), RuntimeError, "attn_mask should not be set when is_causal"),
        (dict(dropout_p=1.5), RuntimeError, "between 0 and 1"),
        (dict(attn_mask=mask.int()), RuntimeError, "attn_mask dtype"),
        (dict(attn_mask=mask.double()), RuntimeError, "attn_mask dtype"),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool, device=device)), RuntimeError, None),
        (dict(attn_mask=torch.ones(3, 4, 5, 6, dtype=torch.bool, device=device)), RuntimeError, None),
    ]
    for kwargs, err, match in bad:
        with pytest.raises(err):
            sdpa_math(q, k, v, **kwargs)
        with pytest.raises(err, match=match):
            attention(q, k, v, **kwargs)
    for args, match in [((q, k[..., :8], v), "last dim"), ((q, k, v[:, :, :5]), "positions"),
                        ((q, k[:1].expand(3, 4, 6, 16), v[:1].expand(3, 4, 6, 16)), None),
                        ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), "at least 2 dimensional"),
                        ((q, k.double(), v), "dtype")]:
        with pytest.raises(RuntimeError):
            sdpa_math(*args)
        with pytest.raises(RuntimeError, match=match):
            attention(*args)
    with pytest.raises(RuntimeError, match="must divide the number of heads"):
        attention(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(RuntimeError):  # heads differ without enable_gqa
        attention(q, k[:, :2], v[:, :2])
    with pytest.raises(NotImplementedError, match="up to 256"):
        attention(*qkv(1, 1, 2, 2, 320, device=device))


def test_exact_delta_setting_is_checked(monkeypatch):
    for value, want in [("1", True), (" on ", True), ("0", False), ("", False)]:
        monkeypatch.setenv(attn_ops.EXACT_DELTA_VARIABLE, value)
        assert attn_ops.exact_delta_enabled() is want
    monkeypatch.setenv(attn_ops.EXACT_DELTA_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match=attn_ops.EXACT_DELTA_VARIABLE):
        attn_ops.exact_delta_enabled()
