"""tritonops.routing: which torch calls enable() sends to our ops (and that they give torch's
answer), which go on to torch untouched, enable()/disable() on the torch-function mode stack,
threads (a patched model's attention is routed in its own thread only), and torch.compile."""

import re
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import tritonops
from tritonops import routing, runtime
from tritonops.ops import attention as attention_ops
from tritonops.ops import matmul as matmul_ops
from tritonops.ops import norm as norm_ops
from tritonops.ops import softmax as softmax_ops

from .utils import check_op

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's builtin, never rebound

# op name -> (module, attribute) the routing handlers call
OP_ATTRS = {
    "matmul": (matmul_ops, "matmul"),
    "linear": (matmul_ops, "linear"),
    "softmax": (softmax_ops, "softmax"),
    "log_softmax": (softmax_ops, "log_softmax"),
    "layer_norm": (norm_ops, "layer_norm"),
    "rms_norm": (norm_ops, "rms_norm"),
    "attention": (attention_ops, "attention"),
}


@pytest.fixture(autouse=True)
def _clean_mode_stack():
    assert not _get_current_function_mode_stack()
    yield
    leftover = _get_current_function_mode_stack()
    routing.disable()
    while _get_current_function_mode_stack():
        torch.overrides._pop_mode()
    assert not leftover, f"modes left on the stack: {leftover}"


@pytest.fixture
def calls(monkeypatch):
    """op name -> the thread idents of the calls that reached our op."""
    seen = {name: [] for name in OP_ATTRS}

    def spy(name, real):
        def op(*args, **kwargs):
            seen[name].append(threading.get_ident())
            return real(*args, **kwargs)
        return op

    for name, (module, attr) in OP_ATTRS.items():
        monkeypatch.setattr(module, attr, spy(name, getattr(module, attr)))
    return seen


def _counts(calls):
    return {name: len(c) for name, c in calls.items() if c}


def _t(*shape, dtype=torch.float32, device=None):
    return torch.randn(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- each routed function


def _routed_cases(device):
    """id -> (op name, torch's call, inputs): every function in routing's table, as models call it."""
    def t(*shape):
        return _t(*shape, device=device)

    return {
        "torch.matmul": ("matmul", lambda a, b: torch.matmul(a, b), (t(2, 3, 5, 7), t(7, 6))),
        "Tensor.matmul": ("matmul", lambda a, b: a.matmul(other=b), (t(5, 7), t(3, 7, 6))),
        "@": ("matmul", lambda a, b: a @ b, (t(7), t(2, 7, 6))),
        "Tensor.__matmul__": ("matmul", lambda a, b: torch.Tensor.__matmul__(a, b), (t(4, 9), t(9))),
        "F.linear": ("linear", lambda x, w, b: F.linear(x, w, b), (t(2, 5, 12), t(6, 12), t(6))),
        "F.linear-kw": ("linear", lambda x, w: F.linear(input=x, weight=w, bias=None), (t(3, 12), t(5, 12))),
        "F.softmax": ("softmax", lambda x: F.softmax(x, dim=1), (t(3, 17, 5),)),
        "torch.softmax": ("softmax", lambda x: torch.softmax(x, 0, torch.float64), (t(3, 17),)),
        "Tensor.softmax": ("softmax", lambda x: x.softmax(-1), (t(2, 3, 19),)),
        "F.log_softmax": ("log_softmax", lambda x: F.log_softmax(x, 2, 3, torch.float64), (t(3, 5, 17),)),
        "torch.log_softmax": ("log_softmax", lambda x: torch.log_softmax(x, dim=-2), (t(3, 17),)),
        "Tensor.log_softmax": ("log_softmax", lambda x: x.log_softmax(1, dtype=None), (t(2, 19, 3),)),
        "F.layer_norm": ("layer_norm", lambda x, w, b: F.layer_norm(x, (24,), w, b, eps=1e-6),
                         (t(3, 5, 24), t(24), t(24))),
        "F.layer_norm-no-affine": ("layer_norm", lambda x: F.layer_norm(x, [5, 24]), (t(3, 5, 24),)),
        "F.rms_norm": ("rms_norm", lambda x, w: F.rms_norm(x, (24,), w), (t(7, 24), t(24))),
        "torch.rms_norm": ("rms_norm", lambda x, w: torch.rms_norm(x, [3, 24], w, eps=1e-3), (t(2, 3, 24), t(3, 24))),
        "torch.layer_norm": ("layer_norm", lambda x, w: torch.layer_norm(x, (24,), w, None, 1e-5, False),
                             (t(5, 24), t(24))),
        "F.sdpa": ("attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                   (t(2, 3, 5, 16), t(2, 3, 7, 16), t(2, 3, 7, 8))),
        "F.sdpa-mask": ("attention", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, 0.0, False, scale=0.3),
                        (t(2, 5, 16), t(2, 7, 16), t(2, 7, 8), t(1, 5, 7))),
    }


ROUTED = list(_routed_cases("cpu"))


@pytest.mark.parametrize("case", ROUTED)
def test_enable_routes_each_function_to_our_op(device, calls, case):
    op, fn, args = _routed_cases(device)[case]

    def routed(*a):
        with tritonops.routing.enable(ops=[op]):
            return fn(*a)

    check_op(routed, fn, *args)  # output and gradients: ours held to float64, torch's error the bar
    assert _counts(calls) == {op: 1}


def test_only_the_ops_asked_for_are_routed(device, calls):
    cases = _routed_cases(device)
    with tritonops.routing.enable(ops=["linear", "rms_norm"]):
        for op, fn, args in cases.values():
            fn(*args)
    assert _counts(calls) == {"linear": 2, "rms_norm": 2}


def test_shape_errors_come_from_our_op(device, calls):
    with tritonops.routing.enable():
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(5x7 and 6x8\)"):
            torch.matmul(_t(5, 7, device=device), _t(6, 8, device=device))
        with pytest.raises(RuntimeError, match="normalized_shape"):
            F.layer_norm(_t(3, 5, device=device), (4,))
    assert _counts(calls) == {"matmul": 1, "layer_norm": 1}


# --------------------------------------------------------------------------- calls that go on to torch


class Sub(torch.Tensor):
    """A tensor subclass: its own __torch_function__ decides, not us."""


def _fall_through_cases(device):
    """id -> a call routing must leave to torch (with every op enabled)."""
    a, b, w = _t(3, 7, device=device), _t(7, 5, device=device), _t(5, 7, device=device)
    q = _t(2, 5, 16, device=device)
    bias1, bias35, q320 = _t(1, device=device), _t(3, 5, device=device), _t(1, 3, 320, device=device)
    return {
        "int tensors": lambda: torch.matmul(a.to(torch.int32), b.to(torch.int32)),
        "complex": lambda: a.to(torch.complex64) @ b.to(torch.complex64),
        "out=": lambda: torch.matmul(a, b, out=torch.empty(3, 5, device=device)),
        "softmax out=": lambda: torch.softmax(a, 1, out=torch.empty(3, 7, device=device)),
        "softmax int dtype": lambda: a.to(torch.int64).softmax(0, dtype=torch.float32),
        "softmax python dtype": lambda: a.log_softmax(1, dtype=float),
        "a subclass": lambda: F.linear(a.as_subclass(Sub), w),
        "nested": lambda: F.linear(torch.nested.nested_tensor([a, a[:2]]), w),
        "sparse": lambda: torch.matmul(a.to_sparse(), b),
        "mask of ints": lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int8,
                                                                                             device=device)),
        "norm of ints": lambda: F.layer_norm(a.to(torch.int32), (7,)),
        "not a tensor": lambda: F.linear(a, w.tolist()),
        # calls torch takes and our ops do not: a bias it broadcasts, head dims past ours
        "linear bias (1,)": lambda: F.linear(a, w, bias1),
        "linear bias (3, 5)": lambda: F.linear(a, w, bias35),
        "head dim 320": lambda: F.scaled_dot_product_attention(q320, q320, q320),
    }


def _transform_cases(device):
    """id -> a call under a torch.func transform or forward-mode AD: torch's ops have the rules
    for those, ours reverse mode only, so routing leaves them to torch."""
    import torch.autograd.forward_ad as forward_ad

    a, w, c = _t(3, 7, device=device), _t(5, 7, device=device), _t(3, 7, device=device)

    def dual_tangent():
        with forward_ad.dual_level():
            out = F.softmax(forward_ad.make_dual(a, c), -1)
            return forward_ad.unpack_dual(out).tangent.clone()

    return {
        "jvp": lambda: torch.func.jvp(lambda x: F.linear(x, w), (a,), (c,))[1],
        "forward_ad": dual_tangent,
        "vmap": lambda: torch.func.vmap(lambda x: F.linear(x, w))(a),
        "grad": lambda: torch.func.grad(lambda x: (F.softmax(x, -1) * c).sum())(a),
        "jacrev": lambda: torch.func.jacrev(lambda x: torch.matmul(x, w.t()))(a[0]),
        "compiled forward_ad": lambda: _compiled_dual_tangent(a, c),
    }


def _compiled_dual_tangent(a, c):
    """torch.compile traces a dual tensor its own way: routing must still leave it to torch."""
    import torch.autograd.forward_ad as forward_ad

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: F.softmax(x, -1), fullgraph=True, backend="aot_eager")
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(compiled(forward_ad.make_dual(a, c))).tangent.clone()


@pytest.mark.parametrize("case", list(_transform_cases("cpu")))
def test_transforms_and_forward_mode_reach_torch(device, calls, case):
    fn = _transform_cases(device)[case]
    expected = fn()
    with tritonops.routing.enable():
        out = fn()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert _counts(calls) == {}


@pytest.mark.parametrize("case", list(_fall_through_cases("cpu")))
def test_unsupported_calls_reach_torch(device, calls, case):
    fn = _fall_through_cases(device)[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype warnings of nested and sparse tensors
        try:
            expected = fn()
        except Exception as e:  # torch refuses it: then it must refuse it routed, with its own error
            with tritonops.routing.enable(), pytest.raises(type(e), match="^" + re.escape(str(e))):
                fn()
        else:
            with tritonops.routing.enable():
                out = fn()
            assert type(out) is type(expected) and out.is_nested == expected.is_nested
            if out.is_nested:
                out, expected = torch.nested.to_padded_tensor(out, 0.0), torch.nested.to_padded_tensor(expected, 0.0)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert _counts(calls) == {}


def test_implicit_softmax_dim_reaches_torch_with_its_warning(device, calls):
    x = _t(3, 7, device=device)
    with tritonops.routing.enable(), pytest.warns(UserWarning, match="Implicit dimension choice"):
        out = F.softmax(x)
    torch.testing.assert_close(out, torch.softmax(x, 1), rtol=0, atol=0)
    assert _counts(calls) == {}


def test_tensors_on_two_devices_reach_torch(device, calls):
    a, b = _t(3, 7, device=device), _t(7, 5, device="meta")
    with tritonops.routing.enable():
        try:
            torch.matmul(a, b)  # torch's business, whatever it makes of it
        except RuntimeError:
            pass
        try:
            F.layer_norm(a, (7,), torch.ones(7, device="meta"))
        except RuntimeError:
            pass
    assert _counts(calls) == {}


def test_mixed_dtypes_reach_torch_without_autocast(device, calls):
    a, b = _t(3, 7, device=device), _t(7, 5, dtype=torch.float64, device=device)
    with tritonops.routing.enable(), pytest.raises(RuntimeError, match="expected m1 and m2 to have the same dtype"):
        torch.matmul(a, b)  # torch's own message: ours would name tritonops
    assert _counts(calls) == {}


def test_mixed_dtypes_reach_our_op_where_it_decides(device, monkeypatch):
    """Under autocast our ops cast mixed inputs as torch does, and a norm's weight may differ
    from its input at any time: routing leaves those dtypes to the op."""
    marker = torch.zeros(())
    for name, (module, attr) in OP_ATTRS.items():
        monkeypatch.setattr(module, attr, lambda *a, _name=name, **k: (_name, marker))
    low = torch.bfloat16
    x, w = _t(3, 7, dtype=low, device=device), _t(5, 7, device=device)
    q, kv = _t(2, 5, 16, dtype=low, device=device), _t(2, 5, 16, device=device)
    with tritonops.routing.enable():
        assert F.layer_norm(x, (7,), _t(7, device=device), _t(7, device=device))[0] == "layer_norm"
        assert F.rms_norm(x, (7,), _t(7, device=device))[0] == "rms_norm"
        with torch.autocast(device.type, dtype=low):
            assert F.linear(x, w)[0] == "linear"
            assert torch.matmul(x, w.t())[0] == "matmul"
            assert F.scaled_dot_product_attention(q, kv, kv)[0] == "attention"
        with pytest.raises(RuntimeError):  # the same call without autocast is torch's, and it refuses
            F.linear(x, w)


def test_a_device_without_triton_backend_reaches_torch_silently(device, calls, monkeypatch):
    monkeypatch.setattr(runtime, "backend_for", lambda d: runtime.BACKEND_REFERENCE)
    monkeypatch.setattr(runtime, "_warned_reference", set())  # our fallback would warn again
    cases = _routed_cases(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = [fn(*args) for _, fn, args in cases.values()]
        with tritonops.routing.enable():
            outs = [fn(*args) for _, fn, args in cases.values()]
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert _counts(calls) == {}


# --------------------------------------------------------------------------- enable / disable


def _stack():
    return _get_current_function_mode_stack()


class Recorder(TorchFunctionMode):
    """Someone else's mode: records what it sees and passes it on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_enable_disable_and_with(device, calls):
    x, w = _t(3, 8, device=device), _t(5, 8, device=device)
    handle = tritonops.routing.enable(ops=["linear"])
    assert handle.active and handle.ops == {"linear"} and len(_stack()) == 1
    F.linear(x, w)
    F.softmax(x, -1)
    assert _counts(calls) == {"linear": 1}
    tritonops.routing.disable()
    assert not handle.active and not _stack()
    F.linear(x, w)
    handle.close()  # stopped already: nothing to do
    assert _counts(calls) == {"linear": 1}

    with tritonops.routing.enable(ops=("softmax",)) as h:
        assert h.active
        F.linear(x, w)
        F.softmax(x, -1)
    assert not h.active and not _stack()
    F.softmax(x, -1)
    assert _counts(calls) == {"linear": 1, "softmax": 1}


def test_with_restores_on_an_exception(device, calls):
    with pytest.raises(KeyError):
        with tritonops.routing.enable():
            raise KeyError("boom")
    assert not _stack()
    F.linear(_t(3, 8, device=device), _t(5, 8, device=device))
    assert _counts(calls) == {}


def test_nested_enable(device, calls):
    x, w = _t(3, 8, device=device), _t(5, 8, device=device)
    with tritonops.routing.enable(ops=["linear"]):
        with tritonops.routing.enable(ops=["softmax", "linear"]):
            F.linear(x, w)
            F.softmax(x, 0)
        assert _counts(calls) == {"linear": 1, "softmax": 1}  # the inner one took linear, once
        F.linear(x, w)
        F.softmax(x, 0)
        assert _counts(calls) == {"linear": 2, "softmax": 1}
    a, b = tritonops.routing.enable(ops=["linear"]), tritonops.routing.enable(ops=["softmax"])
    a.close()  # not the innermost: taken from under b
    assert _stack() == [b.mode]
    F.linear(x, w)
    F.softmax(x, 0)
    assert _counts(calls) == {"linear": 2, "softmax": 2}
    tritonops.routing.enable(ops=["matmul"])
    tritonops.routing.disable()  # every one enable() started
    assert not _stack()


def test_disable_under_someone_elses_mode(device, calls):
    x, w = _t(3, 8, device=device), _t(5, 8, device=device)
    handle = tritonops.routing.enable()
    with Recorder() as recorder:
        tritonops.routing.enable(ops=["softmax"])
        with Recorder() as top:
            tritonops.routing.disable()
            assert _stack() == [recorder, top]
            F.linear(x, w)
        assert recorder.seen == top.seen == [F.linear]
        handle.close()
        assert _stack() == [recorder]
    assert not _stack() and _counts(calls) == {}


def test_disable_leaves_modes_it_did_not_start(device, calls):
    with routing.RoutingMode(["linear"]) as mode:
        tritonops.routing.enable(ops=["softmax"])
        tritonops.routing.disable()
        assert _stack() == [mode]
        F.linear(_t(3, 8, device=device), _t(5, 8, device=device))
    assert _counts(calls) == {"linear": 1}


def test_unknown_ops_name_the_valid_ones():
    for bad in (["linear", "conv"], "conv2d"):
        with pytest.raises(ValueError, match=r"unknown ops \['conv.*'\]; expected some of \('matmul', 'linear'"):
            tritonops.routing.enable(ops=bad)
    assert not _stack()
    assert tritonops.routing.enable(ops="attention").ops == {"attention"}  # one name, not its letters
    tritonops.routing.disable()


def test_enable_routes_its_own_thread_only(device, calls):
    x, w = _t(3, 8, device=device), _t(5, 8, device=device)
    expected = F.linear(x, w)
    results = {}

    def other():
        results["stack"] = list(_stack())
        results["out"] = F.linear(x, w)
        handle = tritonops.routing.enable()
        results["close"] = handle
        F.linear(x, w)

    with tritonops.routing.enable():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        with pytest.raises(RuntimeError, match="thread that started it"):
            results["close"].close()
        F.linear(x, w)
    assert results["stack"] == []
    torch.testing.assert_close(results["out"], expected, rtol=0, atol=0)
    assert calls["linear"] == [thread.ident, threading.get_ident()]


# --------------------------------------------------------------------------- a patched model, between threads


class Attend(nn.Module):
    """SDPA twice; between the two calls, it can hold its thread until told to go on."""

    def __init__(self, entered=None, release=None):
        super().__init__()
        self.entered, self.release, self.saw_torch_sdpa = entered, release, []

    def forward(self, q, k, v):
        self.saw_torch_sdpa.append(F.scaled_dot_product_attention is TORCH_SDPA)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.entered is not None:
            self.entered.set()
            assert self.release.wait(60), "never released"
        self.saw_torch_sdpa.append(F.scaled_dot_product_attention is TORCH_SDPA)
        return F.scaled_dot_product_attention(y, k, v)


def test_patched_attention_is_routed_in_its_own_thread_only(device, calls):
    q, k, v = _t(2, 3, 5, 16, device=device), _t(2, 3, 7, 16, device=device), _t(2, 3, 7, 16, device=device)
    expected = Attend()(q, k, v)
    ref = Attend()(q.double(), k.double(), v.double())
    entered, release = threading.Event(), threading.Event()
    patched = Attend(entered, release)
    tritonops.patch(patched)
    unpatched = Attend()
    results, errors = {}, []

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # shown by the main thread
            errors.append(e)
            entered.set()

    a = threading.Thread(target=run, args=("a", lambda: patched(q, k, v)))
    a.start()
    try:
        assert entered.wait(60) and not errors, errors  # a is inside its patched forward, routed
        assert F.scaled_dot_product_attention is TORCH_SDPA
        b = threading.Thread(target=run, args=("b", lambda: (unpatched(q, k, v), F.scaled_dot_product_attention(
            q, k, v, is_causal=True), list(_stack()))))
        b.start()
        b.join(60)
        assert not b.is_alive()
    finally:
        release.set()
        a.join(60)
    assert not errors, errors
    assert calls["attention"] == [a.ident, a.ident] and _counts(calls) == {"attention": 2}
    out_b, plain_b, stack_b = results["b"]
    assert stack_b == []
    torch.testing.assert_close(out_b, expected, rtol=0, atol=0)
    torch.testing.assert_close(plain_b, TORCH_SDPA(q, k, v, is_causal=True), rtol=0, atol=0)
    tritonops.testing.assert_close(results["a"], ref, expected, what="patched output")
    assert patched.saw_torch_sdpa == [True, True] and unpatched.saw_torch_sdpa == [True, True]
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patched_attention_in_the_calling_thread_only_while_forward_runs(device, calls):
    q = _t(1, 2, 5, 16, device=device)
    model = Attend()
    tritonops.patch(model)
    model(q, q, q)
    assert not _stack()
    F.scaled_dot_product_attention(q, q, q)
    assert _counts(calls) == {"attention": 2}
    tritonops.unpatch(model)
    model(q, q, q)
    assert _counts(calls) == {"attention": 2} and model.saw_torch_sdpa == [True] * 4


# --------------------------------------------------------------------------- torch.compile


def _graph_ops(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_compiled_function_routes_inside_enable_only(device):
    def fn(x, w, b, q, k, v):
        h = F.layer_norm(F.linear(x, w, b), (6,))
        p = h.softmax(-1) @ w
        return p.sum() + F.scaled_dot_product_attention(q, k, v, is_causal=True).sum() + F.rms_norm(x, (12,)).sum()

    args = (_t(2, 5, 12, device=device), _t(6, 12, device=device), _t(6, device=device),
            _t(1, 2, 5, 16, device=device), _t(1, 2, 7, 16, device=device), _t(1, 2, 7, 8, device=device))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with tritonops.routing.enable():
        routed = compiled(*args)
        eager_routed = fn(*args)
    assert len(graphs) == 1
    for op in ("linear", "layer_norm", "softmax", "matmul", "attention", "rms_norm"):
        assert f"tritonops.{op}.default" in graphs[0], f"tritonops.{op} missing from the graph: {sorted(graphs[0])}"
    assert not any("scaled_dot_product_attention" in t or t == "<built-in function linear>" for t in graphs[0])
    torch.testing.assert_close(routed, eager_routed, rtol=0, atol=0)

    plain = compiled(*args)  # outside: recompiled, nothing of ours
    assert len(graphs) == 2 and not any("tritonops" in t for t in graphs[1]), sorted(graphs[1])
    torch.testing.assert_close(plain, fn(*args), rtol=0, atol=0)

    with tritonops.routing.enable(ops=["linear"]):  # another op set: another graph
        compiled(*args)
    assert len(graphs) == 3 and {t for t in graphs[2] if "tritonops" in t} == {"tritonops.linear.default"}
    with tritonops.routing.enable():  # the first graph again, no recompile
        compiled(*args)
    assert len(graphs) == 3
