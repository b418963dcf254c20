"""Swap tritonops into an existing model, in place, and back.

    report = tritonops.patch(model)          # nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Softmax,
    print(report)                            # nn.LogSoftmax -> ours; transformers' RMSNorm classes
    tritonops.unpatch(model)                 # -> ours; attention -> tritonops.attention

Modules are switched by class, not rebuilt: our modules subclass the ones they replace and add
no state, so parameters, buffers, hooks and optimizer state stay as they are. A transformers
model on attn_implementation "sdpa" is switched to "tritonops" (its config's setting); in any
other model attention is routed by a torch-function mode (tritonops.routing) entered around
its forward: no torch function is rebound, so other models, and this model in other threads,
are untouched.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch

from . import huggingface
from .routing import RoutingMode

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


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class PatchReport:
    """What `patch` replaced: (qualified module name, the original class's name, the qualified
    name of the class swapped in), and whether the model's attention goes to tritonops.attention:
    through transformers' attention interface (`attn_implementation`: the parts switched, ""
    for the model's own config or a sub-config's name, with the implementation before and
    after), or by routing scaled_dot_product_attention calls in its forward."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    attention_routed: bool = False
    attn_implementation: dict[str, tuple[str, str]] | None = None

    def counts(self) -> dict[str, int]:
        """Modules replaced, by original class name ("Linear", "LlamaRMSNorm", ...)."""
        out: dict[str, int] = {}
        for _, original_cls, _ in self.replaced:
            out[original_cls] = out.get(original_cls, 0) + 1
        return out

    def __str__(self) -> str:
        parts = [f"{n} x {cls}" for cls, n in sorted(self.counts().items())]
        if self.attn_implementation is not None:
            for part, (before, after) in self.attn_implementation.items():
                parts.append(f"{part + ' ' if part else ''}attn_implementation {before!r} -> {after!r}")
        elif self.attention_routed:
            parts.append("F.scaled_dot_product_attention -> tritonops.attention")
        return "tritonops.patch: " + (", ".join(parts) if parts else "nothing replaced")


def patch(model: torch.nn.Module, ops=None) -> PatchReport:
    """Swap our modules into `model` in place and route its attention; `ops` limits it to some
    of "linear", "layer_norm", "rms_norm", "softmax", "log_softmax", "attention" (default: all).

    torch's modules are swapped by exact class (not their subclasses); with "rms_norm", so are
    the transformers norm classes tritonops.huggingface.norm_class knows. With "attention", a
    transformers model on attn_implementation "sdpa" is switched to "tritonops" (which holds
    wherever its layers run, activation checkpointing's recompute included); in any other model
    F.scaled_dot_product_attention calls made during model.forward, in the thread running it, go
    to tritonops.attention when it supports them (also under torch.compile). A recompute outside
    forward (activation checkpointing) is not inside forward: route it with tritonops.enable()."""
    ops = set(OPS if ops is None else ops)
    unknown = ops - set(OPS)
    if unknown:
        raise ValueError(f"tritonops.patch: unknown ops {sorted(unknown)}; expected some of {OPS}")
    if hasattr(model, _ATTR):
        raise RuntimeError("tritonops.patch: this model is patched already; unpatch it first")
    from . import nn as ours

    modules = _module_map()
    handled = {torch_cls for torch_cls, _ in modules.values()}  # never offered to norm_class
    mapping = {torch_cls: our_cls for name, (torch_cls, our_cls) in modules.items() if name in ops}
    report = PatchReport()
    swapped = []
    for qualname, module in model.named_modules():
        original_cls = type(module)
        new_cls = mapping.get(original_cls)
        if new_cls is None and "rms_norm" in ops and original_cls not in handled:
            new_cls = huggingface.norm_class(original_cls)
        if new_cls is None:
            continue
        module.__class__ = new_cls
        added_activation = new_cls is ours.Linear
        if added_activation:
            module.activation = None
        swapped.append((module, original_cls, added_activation))
        report.replaced.append((qualname or "<root>", original_cls.__name__, _qualified(new_cls)))
    routed_forward, attn_before = False, None
    if "attention" in ops:
        attn_before = huggingface.switch_attn_implementation(model)
        if attn_before is not None:
            now = huggingface.attn_implementations(model)
            report.attn_implementation = {part: (impl, now[part]) for part, impl in attn_before.items()
                                          if impl != now[part]}
        else:
            # the instance's own forward (a wrapper that keeps its signature and pickles); the
            # class's forward stays as it is for every other instance
            model.forward = _RoutedForward(model, model.__dict__.get("forward"))
            routed_forward = True
        report.attention_routed = True
    setattr(model, _ATTR, (swapped, routed_forward, attn_before))
    return report


class _RoutedForward:
    """A model's forward with its F.scaled_dot_product_attention calls routed to ours by a mode
    on this thread's torch-function stack (torch.compile traces it the same way). It shows the
    forward's signature (what transformers' Trainer and generate read) and pickles and deep-copies
    with its model."""

    def __init__(self, model: torch.nn.Module, original=None):
        self.model = model
        self.original = original  # an instance-level forward set before patch, if any

    @property
    def __signature__(self) -> inspect.Signature:
        forward = self.original if self.original is not None else types.MethodType(type(self.model).forward, self.model)
        return inspect.signature(forward)

    def __call__(self, *args, **kwargs):
        with RoutingMode(ops=("attention",)):
            if self.original is not None:
                return self.original(*args, **kwargs)
            return type(self.model).forward(self.model, *args, **kwargs)


def unpatch(model: torch.nn.Module) -> None:
    """Undo `patch`: the original classes and forward back."""
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        raise RuntimeError("tritonops.unpatch: this model is not patched")
    swapped, routed_forward, attn_before = state
    for module, original_cls, added_activation in swapped:
        module.__class__ = original_cls
        if added_activation:
            module.__dict__.pop("activation", None)
    if routed_forward:
        original_forward = model.__dict__.pop("forward").original
        if original_forward is not None:
            model.forward = original_forward
    if attn_before is not None:
        huggingface.restore_attn_implementation(model, attn_before)
