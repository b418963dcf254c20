"""Swap tritonops into an existing model, in place, and back.

    report = tritonops.patch(model)          # nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Softmax,
    print(report)                            # nn.LogSoftmax -> ours; F.scaled_dot_product_attention
    tritonops.unpatch(model)                 # calls in model.forward -> tritonops.attention

Modules are switched by class, not rebuilt: our modules subclass torch's and add
no state, so parameters, buffers, hooks and optimizer state stay as they are.
"""

from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OPS = ("linear", "layer_norm", "rms_norm", "softmax", "log_softmax", "attention")
_ATTR = "_tritonops_patch"


def _module_map() -> dict[str, tuple[type, type]]:
    from . import nn as ours

    pairs = {
        "linear": (torch.nn.Linear, ours.Linear),
        "layer_norm": (torch.nn.LayerNorm, ours.LayerNorm),
        "softmax": (torch.nn.Softmax, ours.Softmax),
        "log_softmax": (torch.nn.LogSoftmax, ours.LogSoftmax),
    }
    if hasattr(torch.nn, "RMSNorm"):
        pairs["rms_norm"] = (torch.nn.RMSNorm, ours.RMSNorm)
    return pairs


@dataclass
class PatchReport:
    """What `patch` replaced: (qualified module name, torch class, our class), and whether
    scaled_dot_product_attention calls in the model's forward go to tritonops.attention."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    attention_routed: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, torch_cls, _ in self.replaced:
            out[torch_cls] = out.get(torch_cls, 0) + 1
        return out

    def __str__(self) -> str:
        parts = [f"{n} x {cls}" for cls, n in sorted(self.counts().items())]
        if self.attention_routed:
            parts.append("F.scaled_dot_product_attention -> tritonops.attention")
        return "tritonops.patch: " + (", ".join(parts) if parts else "nothing replaced")


def patch(model: torch.nn.Module, ops=None) -> PatchReport:
    """Swap our modules into `model` in place (exact torch classes only, not their subclasses);
    `ops` limits it to some of "linear", "layer_norm", "rms_norm", "softmax", "log_softmax",
    "attention" (default: all)."""
    ops = set(OPS if ops is None else ops)
    unknown = ops - set(OPS)
    if unknown:
        raise ValueError(f"tritonops.patch: unknown ops {sorted(unknown)}; expected some of {OPS}")
    if hasattr(model, _ATTR):
        raise RuntimeError("tritonops.patch: this model is patched already; unpatch it first")
    mapping = {torch_cls: (name, our_cls) for name, (torch_cls, our_cls) in _module_map().items() if name in ops}
    report = PatchReport()
    swapped = []
    for qualname, module in model.named_modules():
        hit = mapping.get(type(module))
        if hit is None:
            continue
        torch_cls, our_cls = type(module), hit[1]
        module.__class__ = our_cls
        if our_cls.__name__ == "Linear":
            module.activation = None
        swapped.append((module, torch_cls))
        report.replaced.append((qualname or "<root>", torch_cls.__name__, f"tritonops.nn.{our_cls.__name__}"))
    original_forward = None
    if "attention" in ops:
        original_forward = model.__dict__.get("forward")
        # a method bound to the model: copy.deepcopy rebinds it to the copy
        model.forward = types.MethodType(_routed_forward, model)
        report.attention_routed = True
    setattr(model, _ATTR, (swapped, report.attention_routed, original_forward))
    return report


def _routed_forward(self, *args, **kwargs):
    """The model's own forward, with F.scaled_dot_product_attention routed to ours."""
    original = self.__dict__[_ATTR][2]
    if torch.compiler.is_compiling():
        # torch.compile traces the calls: it sees the swap (no lock: dynamo cannot trace one)
        # and bakes tritonops.attention into the graph
        F.scaled_dot_product_attention = _routed_sdpa
        try:
            return original(*args, **kwargs) if original is not None else type(self).forward(self, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = _torch_sdpa
    with route_attention():
        return original(*args, **kwargs) if original is not None else type(self).forward(self, *args, **kwargs)


def unpatch(model: torch.nn.Module) -> None:
    """Undo `patch`: torch's classes and forward back."""
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        raise RuntimeError("tritonops.unpatch: this model is not patched")
    swapped, routed, original_forward = state
    for module, torch_cls in swapped:
        module.__class__ = torch_cls
        module.__dict__.pop("activation", None)
    if routed:
        del model.forward
        if original_forward is not None:
            model.forward = original_forward


_route_lock = threading.RLock()
_route_depth = 0
_torch_sdpa = F.scaled_dot_product_attention


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    from .ops import attention as attention_ops

    return attention_ops.attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def route_attention():
    """Within the block, F.scaled_dot_product_attention is tritonops.attention."""
    global _route_depth
    with _route_lock:
        _route_depth += 1
        F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        with _route_lock:
            _route_depth -= 1
            if _route_depth == 0:
                F.scaled_dot_product_attention = _torch_sdpa
