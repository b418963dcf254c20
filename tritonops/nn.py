"""Drop-in modules: subclasses of the torch.nn ones with the same constructor arguments,
parameters and state_dict keys; only forward() runs on tritonops kernels.

A torch model's state_dict loads into these unchanged. To add a module: subclass the
torch one, override forward() only, and list it in __all__.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.matmul import ACTIVATIONS, linear
from .ops.norm import layer_norm, rms_norm
from .ops.softmax import log_softmax, softmax

__all__ = ["Linear", "LayerNorm", "RMSNorm", "Softmax", "LogSoftmax"]


class Linear(torch.nn.Linear):
    """torch.nn.Linear on tritonops.linear, with an optional activation ("relu", "gelu",
    "gelu_tanh", "silu") fused into the matmul's epilogue. `activation` is a plain
    attribute, not state: state_dict keys are torch's (weight, bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 activation: str | None = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"tritonops.nn.Linear: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on tritonops.layer_norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on tritonops.rms_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _dim(module: torch.nn.Module, name: str, input: torch.Tensor) -> int:
    # dim=None: torch's legacy implicit choice, with its deprecation warning.
    return module.dim if module.dim is not None else F._get_softmax_dim(name, input.dim(), 5)


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax on tritonops.softmax."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return softmax(input, _dim(self, "softmax", input))


class LogSoftmax(torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax on tritonops.log_softmax."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return log_softmax(input, _dim(self, "log_softmax", input))
