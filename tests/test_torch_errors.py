"""tritonops against torch where torch itself draws the line: dtypes the kernels do not implement,
arguments that are not tensors, and torch's own OpInfo sample inputs. Each call either returns
torch's answer or raises an exception of the type torch raises on the same call, so code written
against torch (catching NotImplementedError, RuntimeError or TypeError) handles ours alike."""

import pytest
import torch
import torch.nn.functional as F

import tritonops
from tritonops.ops._common import UnsupportedDtypeError
from tritonops.testing import assert_close

from .utils import check_op

BAD_DTYPES = [torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]


def make(shape, dtype, device):
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.complex64 if dtype.is_complex else torch.float32,
                           device=device).to(dtype)
    return torch.randint(-3, 4, shape, device=device).to(dtype)


# op -> (ours, torch's twin, the call's arguments from a tensor maker)
CALLS = {
    "matmul": (tritonops.matmul, torch.matmul, lambda t: (t(3, 4), t(4, 2))),
    "linear": (tritonops.linear, F.linear, lambda t: (t(3, 4), t(2, 4), t(2))),
    "softmax": (tritonops.softmax, F.softmax, lambda t: (t(3, 4), -1)),
    "log_softmax": (tritonops.log_softmax, F.log_softmax, lambda t: (t(3, 4), 0)),
    "layer_norm": (tritonops.layer_norm, F.layer_norm, lambda t: (t(3, 4), (4,), t(4), t(4))),
    "rms_norm": (tritonops.rms_norm, F.rms_norm, lambda t: (t(3, 4), (4,), t(4))),
    "attention": (tritonops.attention, F.scaled_dot_product_attention, lambda t: (t(1, 2, 3, 8), t(1, 2, 5, 8),
                                                                                 t(1, 2, 5, 8))),
}


def _expect_like_torch(op, ours, theirs, args, kwargs=None):
    """Ours raises an instance of what torch raises on the same call, and is still a TypeError (what
    tritonops raised before, so existing handlers keep working). Where torch has a kernel for the
    dtype and ours has none, ours raises NotImplementedError: torch's own word for a missing dtype."""
    kwargs = kwargs or {}
    try:
        theirs(*args, **kwargs)
        expected = NotImplementedError
    except Exception as e:  # noqa: BLE001 - whatever torch raises is the expectation
        expected = type(e)
    with pytest.raises(expected) as got:
        ours(*args, **kwargs)
    assert isinstance(got.value, TypeError), f"{type(got.value).__name__} is no longer a TypeError"
    assert isinstance(got.value, UnsupportedDtypeError) and f"tritonops.{op}" in str(got.value), got.value


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("op", CALLS)
def test_unsupported_dtype_raises_like_torch(device, op, dtype):
    """Every tensor in the dtype (integer, bool, complex, float8)."""
    ours, theirs, args = CALLS[op]
    _expect_like_torch(op, ours, theirs, args(lambda *s: make(s, dtype, device)))


# torch's rms_norm computes a float input with a weight of another dtype, and warns.
@pytest.mark.filterwarnings("ignore:(Mismatch dtype|Casting complex values):UserWarning")
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("op", CALLS)
def test_one_unsupported_dtype_raises_like_torch(device, op, dtype):
    """The first tensor float32, the rest in the dtype; for softmax, the dtype argument."""
    ours, theirs, args = CALLS[op]
    if op in ("softmax", "log_softmax"):
        _expect_like_torch(op, ours, theirs, (make((3, 4), torch.float32, device), 1), {"dtype": dtype})
        return
    first = iter([torch.float32])
    _expect_like_torch(op, ours, theirs, args(lambda *s: make(s, next(first, dtype), device)))


@pytest.mark.parametrize("op", CALLS)
def test_forward_mode_derivatives_are_refused(device, op):
    """Our ops have reverse-mode derivatives only: under torch.func.jvp (which would take an op
    without a rule as zero) and on a forward_ad dual tensor (whose tangent would be dropped)
    they raise NotImplementedError, torch's word for a missing derivative formula."""
    import torch.autograd.forward_ad as forward_ad

    ours, _, args = CALLS[op]
    inputs = args(lambda *s: torch.randn(s, device=device))
    first, rest = inputs[0], inputs[1:]
    with pytest.raises(NotImplementedError, match=f"tritonops.{op} has no forward-mode derivative"):
        torch.func.jvp(lambda x: ours(x, *rest), (first,), (torch.ones_like(first),))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        ours(forward_ad.make_dual(first, torch.ones_like(first)), *rest)
    assert torch.isfinite(ours(first, *rest)).all()  # and outside them, the op runs
    # an op whose inputs carry no tangent is a constant of the jvp: it runs
    scale = torch.randn((), device=device)
    _, tangent = torch.func.jvp(lambda s: s * ours(first, *rest), (scale,), (torch.ones_like(scale),))
    torch.testing.assert_close(tangent, ours(first, *rest))


def test_unsupported_dtype_error_is_every_type_torch_raises():
    assert issubclass(UnsupportedDtypeError, TypeError)
    assert issubclass(UnsupportedDtypeError, NotImplementedError)  # torch's, for a dtype without a kernel
    assert issubclass(UnsupportedDtypeError, RuntimeError)  # scaled_dot_product_attention's, for integers


@pytest.mark.parametrize("op,ours,theirs,call", [
    ("matmul", tritonops.matmul, torch.matmul, lambda f, x: f(x, 3)),
    ("matmul", tritonops.matmul, torch.matmul, lambda f, x: f([[1.0] * 4], x.t())),
    ("linear", tritonops.linear, F.linear, lambda f, x: f(x, [[1.0] * 4])),
    ("linear", tritonops.linear, F.linear, lambda f, x: f(x, x, 1.0)),
    ("softmax", tritonops.softmax, torch.softmax, lambda f, x: f([1.0, 2.0], 0)),
    ("softmax", tritonops.softmax, torch.softmax, lambda f, x: f(x, 0, dtype="float64")),
    ("log_softmax", tritonops.log_softmax, torch.log_softmax, lambda f, x: f(x, 0, dtype=1)),
    ("layer_norm", tritonops.layer_norm, F.layer_norm, lambda f, x: f(x, (4,), [1.0] * 4)),
    ("rms_norm", tritonops.rms_norm, F.rms_norm, lambda f, x: f(x.tolist(), (4,))),
    ("attention", tritonops.attention, F.scaled_dot_product_attention, lambda f, x: f(x, x, x.tolist())),
], ids=lambda v: v if isinstance(v, str) else "")
def test_non_tensor_arguments_raise_type_error_like_torch(device, op, ours, theirs, call):
    """A list, a number or a string where a tensor or a dtype belongs: a plain TypeError, as torch's
    argument parser raises, not the dtype error."""
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError) as want:
        call(theirs, x)
    with pytest.raises(TypeError) as got:
        call(ours, x)
    assert type(got.value) is type(want.value), f"{type(got.value).__name__} != torch's {type(want.value).__name__}"


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_python_type_as_dtype_like_torch(device, fn):
    """torch reads the Python types float, int, bool and complex as float64, int64, bool and complex128."""
    ours, theirs = getattr(tritonops, fn), getattr(torch, fn)
    x = torch.randn(3, 5, device=device)
    out = ours(x, 1, dtype=float)
    assert out.dtype == torch.float64
    assert_close(out, theirs(x.double(), 1), theirs(x, 1, dtype=float))
    for py_type in (int, bool, complex):
        _expect_like_torch(fn, ours, theirs, (x, 1), {"dtype": py_type})


# --------------------------------------------------------------------------- torch's OpInfo samples

# (OpInfo name, variant) -> ours
OPINFO_OPS = {
    ("matmul", ""): tritonops.matmul,
    ("nn.functional.linear", ""): tritonops.linear,
    ("softmax", ""): tritonops.softmax,
    ("softmax", "with_dtype"): tritonops.softmax,
    ("log_softmax", ""): tritonops.log_softmax,
    ("log_softmax", "with_dtype"): tritonops.log_softmax,
    ("nn.functional.layer_norm", ""): tritonops.layer_norm,
    ("nn.functional.rms_norm", ""): tritonops.rms_norm,
}


@pytest.fixture(scope="module")
def op_db():
    # torch's test internals import expecttest, a test-only package torch does not install.
    pytest.importorskip("expecttest", reason="torch's OpInfo database needs the expecttest package")
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_methods_invocations import op_db
    # The import freezes torch.backends' flags (cudnn.enabled, ...) for the whole process, as
    # torch's own suite wants; the tests that run after these in the process must not inherit that.
    flag_module = torch.backends.flags_frozen.__globals__
    if "__allow_nonbracketed_mutation_flag" in flag_module:
        flag_module["__allow_nonbracketed_mutation_flag"] = not frozen
    return {(o.name, o.variant_test_name): o for o in op_db}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPINFO_OPS, ids=lambda n: "-".join(filter(None, n)))
def test_opinfo_samples_like_torch(device, op_db, name, dtype):
    """Every sample torch tests its own op with (zero-size tensors, 0-D inputs, negative eps, ...):
    output and gradients within the project's tolerances of torch, or torch's exception type."""
    info = op_db[name]
    ours = OPINFO_OPS[name]
    samples = list(info.sample_inputs(device, dtype, requires_grad=False))
    assert samples
    for sample in samples:
        args = (sample.input, *sample.args)
        try:
            info.op(*args, **sample.kwargs)
        except Exception as e:  # noqa: BLE001 - whatever torch raises is the expectation
            with pytest.raises(type(e)):
                ours(*args, **sample.kwargs)
            continue
        check_op(ours, info.op, *args, **sample.kwargs)
