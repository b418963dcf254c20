"""Route torch's own calls to tritonops, in the calling thread, without touching torch.

    with tritonops.enable(ops=["linear", "attention"]):   # F.linear, F.scaled_dot_product_attention
        y = model(x)                                       # ... run on tritonops.linear, tritonops.attention
    tritonops.enable()                                     # every op, from now on
    tritonops.disable()                                    # ... and off again

`RoutingMode` is a torch.overrides.TorchFunctionMode: while it is on the torch-function mode
stack, the torch functions listed in `_TABLE` go to our public ops when we support the call,
and on to torch, unchanged, when we do not (a tensor subclass, an integer dtype, tensors on two
devices, a device without a Triton backend, `out=`, an implicit softmax dim, ...). Shape errors
are not screened: our ops raise torch's exceptions for them.

torch keeps that stack per thread, so routing applies to calls made in the thread that entered
it; other threads, and threads started later, are not routed. No torch function is ever
rebound. torch.compile traces the mode: a function compiled and called inside `enable()` has
our ops in its graph, the same function called outside does not (dynamo guards on the stack).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode

from . import runtime
from .ops import attention as _attention
from .ops import matmul as _matmul
from .ops import norm as _norm
from .ops import softmax as _softmax
from .ops._common import FLOAT_DTYPES, forward_ad_in_use

OPS = ("matmul", "linear", "layer_norm", "rms_norm", "softmax", "log_softmax", "attention")

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_MASK_DTYPES = (torch.bool, *FLOAT_DTYPES)


def _op_set(ops, who: str) -> frozenset:
    """`ops` (None: all) as a frozenset of names from OPS; ValueError naming the valid ones."""
    if ops is None:
        return frozenset(OPS)
    names = frozenset((ops,) if isinstance(ops, str) else ops)
    unknown = names - set(OPS)
    if unknown:
        raise ValueError(f"{who}: unknown ops {sorted(unknown)}; expected some of {OPS}")
    return names


# --------------------------------------------------------------------------- what a routed call must be


def _bind(args, kwargs, names: tuple, required: int, ignored: tuple = ()) -> dict | None:
    """The call's arguments by parameter name, or None when they do not fit `names` (torch
    raises its own error then) or carry a keyword our op lacks; `out=None` is no `out`, and
    `ignored` keywords (F.softmax's _stacklevel) are dropped."""
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in ignored or (key == "out" and value is None):
            continue
        if key not in names or key in bound:
            return None
        bound[key] = value
    for name in names[:required]:
        if name not in bound:
            return None
    for name in ignored:
        bound.pop(name, None)
    return bound


def _plain(t) -> bool:
    """A dense tensor of no subclass that overrides torch (a Parameter is plain)."""
    return type(t) in _PLAIN_TYPES and t.layout == torch.strided and not t.is_nested


def _plain_float(t) -> bool:
    """A plain tensor of a float dtype our kernels implement."""
    return _plain(t) and t.dtype in FLOAT_DTYPES


def _routable(tensors: tuple, optional: tuple = (), same_dtype: bool = True) -> bool:
    """Whether our kernels take these tensors: each plain and floating (an `optional` one may be
    None), all on one device with a Triton backend, and of one dtype where `same_dtype` asks it
    and autocast is off for that device (under autocast, our ops cast mixed inputs as torch does)."""
    for t in tensors:
        if not _plain_float(t):
            return False
    present = [t for t in optional if t is not None]
    for t in present:
        if not _plain_float(t):
            return False
    first = tensors[0]
    device = first.device
    for t in (*tensors, *present):
        if t.device != device:
            return False
    if runtime.backend_for(device) == runtime.BACKEND_REFERENCE:
        return False  # torch's own op, and not our reference fallback with its warning
    if forward_ad_in_use((*tensors, *present)) or (
            not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None):
        # torch.func transforms (vmap, jvp, grad) and forward-mode AD: torch's ops have every
        # rule for them, ours reverse mode only
        return False
    if same_dtype and not torch.is_autocast_enabled(device.type):
        for t in (*tensors, *present):
            if t.dtype != first.dtype:
                return False
    return True


# --------------------------------------------------------------------------- handlers
# Each takes a torch call's (args, kwargs) and returns our op's result, or None when the call is
# not ours to take. They call our ops through their modules, so a test can spy on one.


def _matmul_handler(args, kwargs):
    b = _bind(args, kwargs, ("input", "other"), 2)
    if b is None or not _routable((b["input"], b["other"])):
        return None
    return _matmul.matmul(b["input"], b["other"])


def _linear_handler(args, kwargs):
    b = _bind(args, kwargs, ("input", "weight", "bias"), 2)
    if b is None or not _routable((b["input"], b["weight"]), (b.get("bias"),)):
        return None
    weight, bias = b["weight"], b.get("bias")
    if bias is not None and weight.dim() == 2 and tuple(bias.shape) != (weight.shape[0],):
        return None  # a bias torch broadcasts ((1,), (1, N), (M, N)): our epilogue adds an (N,) one
    return _matmul.linear(b["input"], weight, bias)


def _softmax_handler(names: tuple, log: bool, ignored: tuple = ()):
    op = "log_softmax" if log else "softmax"

    def handler(args, kwargs):
        b = _bind(args, kwargs, names, 2, ignored)
        if b is None or not _routable((b["input"],)):
            return None
        dim, dtype = b["dim"], b.get("dtype")
        if type(dim) is not int:  # None (torch's implicit dim, with its warning) or a dim name
            return None
        if dtype is not None and dtype not in FLOAT_DTYPES:
            return None
        return getattr(_softmax, op)(b["input"], dim, dtype=dtype)

    return handler


def _layer_norm_handler(args, kwargs):
    # torch.layer_norm's cudnn_enable chooses among torch's kernels: nothing to ours
    b = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"), 2,
              ignored=("cudnn_enable",))
    # dtypes may differ: a norm's weight may be float32 under a bf16 input; our op decides
    if b is None or not _routable((b["input"],), (b.get("weight"), b.get("bias")), same_dtype=False):
        return None
    return _norm.layer_norm(b["input"], b["normalized_shape"], b.get("weight"), b.get("bias"), b.get("eps", 1e-5))


def _rms_norm_handler(args, kwargs):
    b = _bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), 2)
    if b is None or not _routable((b["input"],), (b.get("weight"),), same_dtype=False):
        return None
    return _norm.rms_norm(b["input"], b["normalized_shape"], b.get("weight"), b.get("eps"))


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _attention_handler(args, kwargs):
    b = _bind(args, kwargs, _SDPA_NAMES, 3)
    if b is None or not _routable((b["query"], b["key"], b["value"])):
        return None
    query, value = b["query"], b["value"]
    if query.dim() and value.dim() and max(query.shape[-1], value.shape[-1]) > _attention.MAX_HEAD_DIM:
        return None  # head dims our kernels do not take
    mask = b.get("attn_mask")
    if mask is not None:  # bool or additive; torch's rules on its dtype are our op's
        if not (_plain(mask) and mask.dtype in _MASK_DTYPES and mask.device == b["query"].device):
            return None
    return _attention.attention(b["query"], b["key"], b["value"], attn_mask=mask,
                                dropout_p=b.get("dropout_p", 0.0), is_causal=b.get("is_causal", False),
                                scale=b.get("scale"), enable_gqa=b.get("enable_gqa", False))


_SOFTMAX_F = ("input", "dim", "_stacklevel", "dtype")  # F.softmax(input, dim=None, _stacklevel=3, dtype=None)
_SOFTMAX_TORCH = ("input", "dim", "dtype")  # torch.softmax and Tensor.softmax (self first)

# torch function -> (op name, handler): the one place that says what is routed where
_TABLE = {
    torch.matmul: ("matmul", _matmul_handler),
    torch.Tensor.matmul: ("matmul", _matmul_handler),  # also what `a @ b` reports
    torch.Tensor.__matmul__: ("matmul", _matmul_handler),
    F.linear: ("linear", _linear_handler),
    F.softmax: ("softmax", _softmax_handler(_SOFTMAX_F, False, ignored=("_stacklevel",))),
    torch.softmax: ("softmax", _softmax_handler(_SOFTMAX_TORCH, False)),
    torch.Tensor.softmax: ("softmax", _softmax_handler(_SOFTMAX_TORCH, False)),
    F.log_softmax: ("log_softmax", _softmax_handler(_SOFTMAX_F, True, ignored=("_stacklevel",))),
    torch.log_softmax: ("log_softmax", _softmax_handler(_SOFTMAX_TORCH, True)),
    torch.Tensor.log_softmax: ("log_softmax", _softmax_handler(_SOFTMAX_TORCH, True)),
    F.layer_norm: ("layer_norm", _layer_norm_handler),
    # what F.layer_norm and F.rms_norm call: where torch.compile inlines those (F.rms_norm on
    # torch 2.13), the mode sees these instead
    torch.layer_norm: ("layer_norm", _layer_norm_handler),
    F.scaled_dot_product_attention: ("attention", _attention_handler),
}
if hasattr(F, "rms_norm"):
    _TABLE[F.rms_norm] = ("rms_norm", _rms_norm_handler)
    _TABLE[torch.rms_norm] = ("rms_norm", _rms_norm_handler)


class RoutingMode(TorchFunctionMode):
    """A TorchFunctionMode that sends the torch calls of `ops` (names from OPS; None: all) to
    our public ops, and every call it does not take on to torch unchanged. Enter it with
    `with RoutingMode(ops):`, in eager code or inside a function torch.compile traces."""

    def __init__(self, ops=None):
        super().__init__()
        self.ops = _op_set(ops, "tritonops.RoutingMode")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _TABLE.get(func)
        if entry is not None and entry[0] in self.ops:
            out = entry[1](args, kwargs)
            if out is not None:
                return out
        # this mode is off the stack while its __torch_function__ runs: torch's own op (or the
        # next mode down) takes the call
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"RoutingMode(ops={sorted(self.ops)})"


# --------------------------------------------------------------------------- enable / disable


class Routing:
    """Routing started by `enable()`: on until `close()`, `disable()` or the end of a `with`
    block over it (an exception included). It belongs to the thread that called enable()."""

    def __init__(self, mode: RoutingMode):
        self.mode = mode
        self._thread = threading.get_ident()

    @property
    def ops(self) -> frozenset:
        return self.mode.ops

    @property
    def active(self) -> bool:
        """Whether its mode is on the calling thread's torch-function mode stack."""
        return any(m is self.mode for m in _get_current_function_mode_stack())

    def close(self) -> None:
        """Stop this routing (a no-op once stopped); modes entered after it stay where they are."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("tritonops: a routing started by enable() is stopped in the thread that "
                               "started it (the torch-function mode stack is per thread)")
        _remove({id(self.mode)})
        started = _started()
        if self in started:
            started.remove(self)

    def __enter__(self) -> Routing:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tritonops routing of {sorted(self.ops)}, {'on' if self.active else 'off'}>"


def _remove(ids: set) -> int:
    """Take the modes whose id() is in `ids` off this thread's torch-function mode stack, leaving
    every other mode on it, in its order; how many were taken off."""
    stack = _get_current_function_mode_stack()
    hits = [i for i, m in enumerate(stack) if id(m) in ids]
    if not hits:
        return 0
    above = [_pop_mode() for _ in range(len(stack) - hits[0])]  # top first
    for mode in reversed(above):
        if id(mode) not in ids:
            _push_mode(mode)
    return len(hits)


def enable(ops=None) -> Routing:
    """Route torch's calls of `ops` (some of "matmul", "linear", "layer_norm", "rms_norm",
    "softmax", "log_softmax", "attention"; None: all) to tritonops, from now on, in the calling
    thread. Returns a handle to stop it; `with tritonops.enable(...):` routes in the block only.
    Calls nest (the innermost takes a call first). Call it outside compiled code: inside a
    function torch.compile traces, enter `RoutingMode(ops)` instead."""
    mode = RoutingMode(_op_set(ops, "tritonops.enable"))
    _push_mode(mode)
    handle = Routing(mode)
    _started().append(handle)
    return handle


def disable() -> None:
    """Stop every routing enable() started in the calling thread; other modes, routing entered
    by tritonops.patch included, stay on the stack."""
    started = _started()
    _remove({id(h.mode) for h in started})
    started.clear()


_local = threading.local()


def _started() -> list:
    """The handles enable() returned in this thread and not yet closed."""
    if not hasattr(_local, "handles"):
        _local.handles = []
    return _local.handles
