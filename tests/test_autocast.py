"""Every op under torch.autocast does what torch's does there: the same casts (so the same
output and gradient dtypes), and values held to the float64 reference with torch's autocast
result as the bar. On CPU (the interpreter) torch autocasts matmul, linear and attention
only; on CUDA also softmax, log_softmax and the norms (to float32)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import tritonops
from tritonops import testing
from tritonops.ops import _autocast

from .test_patch import TinyGPT

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _cases(device, low):
    """name -> (ours, torch's, inputs): fp32 inputs, and the mixed ones a model under autocast
    feeds an op (an activation in the autocast dtype meeting a float32 weight)."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(shape, dtype=dtype, device=device)

    mask = t(1, 1, 5, 7)
    return {
        "matmul": (tritonops.matmul, torch.matmul, (t(3, 5, 12), t(12, 6))),
        "matmul-mixed": (tritonops.matmul, torch.matmul, (t(5, 12, dtype=low), t(12, 6))),
        "linear": (tritonops.linear, F.linear, (t(2, 5, 12), t(6, 12), t(6))),
        "linear-mixed": (tritonops.linear, F.linear, (t(2, 5, 12, dtype=low), t(6, 12), t(6))),
        "attention": (tritonops.attention, F.scaled_dot_product_attention,
                      (t(1, 2, 5, 16), t(1, 2, 7, 16), t(1, 2, 7, 8), mask)),
        "attention-causal": (lambda q, k, v: tritonops.attention(q, k, v, is_causal=True),
                             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                             (t(2, 6, 16, dtype=low), t(2, 6, 16), t(2, 6, 16))),
        "softmax": (tritonops.softmax, F.softmax, (t(4, 33, dtype=low), -1)),
        "softmax-fp32": (tritonops.softmax, F.softmax, (t(4, 33), 0)),
        "softmax-dtype": (lambda x, d: tritonops.softmax(x, d, dtype=low),
                          lambda x, d: F.softmax(x, d, dtype=low), (t(4, 33), 1)),
        "log_softmax": (tritonops.log_softmax, F.log_softmax, (t(3, 2, 17, dtype=low), 1)),
        "layer_norm": (tritonops.layer_norm, F.layer_norm, (t(3, 5, 24, dtype=low), (24,), t(24), t(24))),
        "layer_norm-fp32": (tritonops.layer_norm, F.layer_norm, (t(7, 24), (24,), t(24), t(24))),
        "rms_norm": (tritonops.rms_norm, F.rms_norm, (t(3, 5, 24, dtype=low), (24,), t(24))),
        "rms_norm-fp32": (tritonops.rms_norm, F.rms_norm, (t(7, 24), (24,), t(24))),
    }


def _leaves(args):
    return [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]


def _run(fn, args, autocast_dtype, device):
    """fn's output and the gradients of its tensor inputs, under autocast_dtype (None: off)."""
    leaves = _leaves(args)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = fn(*leaves)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, tensors, g.to(device=device, dtype=out.dtype))
    return out, grads


@pytest.mark.parametrize("low", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_cases("cpu", torch.bfloat16)))
def test_op_under_autocast_is_torchs(device, low, case):
    ours, theirs, args = _cases(device, low)[case]
    torch_out, torch_grads = _run(theirs, args, low, device)
    out, grads = _run(ours, args, low, device)
    ref_out, ref_grads = _run(theirs, [a.double() if isinstance(a, torch.Tensor) else a for a in args], None, device)
    assert out.dtype == torch_out.dtype, f"output {out.dtype}, torch's {torch_out.dtype}"
    # the precision the op ran in is its output's (a float32 leaf's gradient came from a cast)
    testing.assert_close(out, ref_out, torch_out, what="output")
    for i, (g, t, r) in enumerate(zip(grads, torch_grads, ref_grads, strict=True)):
        assert g.dtype == t.dtype, f"grad {i}: {g.dtype}, torch's {t.dtype}"
        testing.assert_close(g, r, t, dtype=out.dtype, what=f"grad of input {i}")


def test_autocast_policy_is_torchs_dispatcher():
    """The ops torch autocasts on each device type: matmul, linear and attention in the
    autocast dtype everywhere, the rest to float32 on CUDA only (rms_norm where this torch
    lists it)."""
    applies = _autocast._APPLIES
    for op in ("matmul", "linear", "attention"):
        assert applies[(op, "cpu")] == applies[(op, "cuda")] == _autocast.LOWER_PRECISION
    for op in ("softmax", "log_softmax", "layer_norm"):
        assert (op, "cpu") not in applies and applies[(op, "cuda")] == _autocast.FLOAT32
    assert ("rms_norm", "cpu") not in applies and applies.get(("rms_norm", "cuda"), _autocast.FLOAT32) == "fp32"


def test_autocast_leaves_float64_and_disabled_regions_alone(device):
    a, b = torch.randn(4, 8, dtype=torch.float64, device=device), torch.randn(8, 3, dtype=torch.float64, device=device)
    x, w = torch.randn(4, 8, device=device), torch.randn(3, 8, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert tritonops.matmul(a, b).dtype == torch.float64  # autocast never casts float64
        with pytest.raises(RuntimeError, match="one dtype"):  # nor does torch, which refuses the mix too
            tritonops.linear(a, w)
        with torch.autocast(device.type, enabled=False):
            assert tritonops.linear(x, w).dtype == torch.float32
        assert tritonops.linear(x, w).dtype == torch.bfloat16
    assert tritonops.linear(x, w).dtype == torch.float32


def test_autocast_in_a_compiled_graph(device):
    """torch.compile(fullgraph=True) traces the casts: our op in the graph, torch's dtypes out."""
    x, w, b = (torch.randn(*s, device=device) for s in ((5, 16), (8, 16), (8,)))
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def fn(x, w, b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return tritonops.softmax(tritonops.linear(x, w, b), -1)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(x, w, b)
    assert any("tritonops.linear" in t for t in targets), targets
    expected = torch.bfloat16 if device.type == "cpu" else torch.float32  # CUDA autocasts softmax to float32
    assert out.dtype == fn(x, w, b).dtype == expected
    torch.testing.assert_close(out, fn(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("low", AUTOCAST_DTYPES, ids=str)
def test_patched_model_under_autocast_trains_like_torch(device, low):
    """A patched float32 model under autocast: torch's output dtype and values, and a training
    step gives finite float32 gradients for the float32 parameters, held to torch's."""
    model = TinyGPT().to(device)
    patched = copy.deepcopy(model)
    tritonops.patch(patched)
    reference = copy.deepcopy(model).double()
    idx = torch.randint(0, 37, (2, 11), device=device)
    targets = torch.randint(0, 37, (2, 11), device=device)

    def step(m, autocast):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=low, enabled=autocast):
            out = m(idx)
            loss = F.nll_loss(out.flatten(0, 1), targets.flatten())
        loss.backward()
        return out, {n: p.grad for n, p in m.named_parameters()}

    torch_out, torch_grads = step(model, True)
    out, grads = step(patched, True)
    ref_out, ref_grads = step(reference, False)
    assert out.dtype == torch_out.dtype
    # held at the autocast dtype's precision: the model's matmuls ran in it
    testing.assert_close(out, ref_out, torch_out, dtype=low, what="log-probabilities")
    for name, p in patched.named_parameters():
        g = grads[name]
        assert p.dtype == g.dtype == torch.float32 and torch.isfinite(g).all(), name
        testing.assert_close(g, ref_grads[name], torch_grads[name], dtype=low, what=f"grad of {name}")


def _float32_policy(theirs, args, dtype_given):
    """What CUDA's autocast does to softmax, log_softmax and the norms: eligible inputs cast to
    float32 (softmax: dtype=float32 unless one is given), then torch's op."""
    if dtype_given:
        return theirs, args
    cast = [a.float() if isinstance(a, torch.Tensor) and a.dtype != torch.float64 else a for a in args]
    return theirs, cast


@pytest.mark.parametrize("case", ["softmax", "softmax-fp32", "softmax-dtype", "log_softmax", "layer_norm",
                                  "layer_norm-fp32", "rms_norm", "rms_norm-fp32"])
def test_float32_policy_where_torch_lists_the_op(device, monkeypatch, case):
    """The float32 policy (torch's on CUDA), run here by listing the ops for this device type
    too: ours gives what torch gives on float32-cast inputs, dtypes and values alike."""
    for op in ("softmax", "log_softmax", "layer_norm", "rms_norm"):
        monkeypatch.setitem(_autocast._APPLIES, (op, device.type), _autocast.FLOAT32)
    ours, theirs, args = _cases(device, torch.bfloat16)[case]
    theirs, torch_args = _float32_policy(theirs, args, case == "softmax-dtype")
    out, grads = _run(ours, args, torch.bfloat16, device)
    torch_out, _ = _run(theirs, torch_args, None, device)
    ref_out, _ = _run(theirs, [a.double() if isinstance(a, torch.Tensor) else a for a in args], None, device)
    assert out.dtype == torch_out.dtype == (torch.bfloat16 if case == "softmax-dtype" else torch.float32)
    testing.assert_close(out, ref_out, torch_out, what="output")
    assert [g.dtype for g in grads] == [a.dtype for a in args if isinstance(a, torch.Tensor)]
