"""Reference implementations in plain torch of the ops torch has no single call for.

They are the fallback for CPU tensors when no Triton backend is active, and the
ground truth of the tests (run in float64); the ops torch has (softmax, the norms,
attention) fall back to torch itself. Tolerances live in `tritonops.testing`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def activation(z: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        return z
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation_name: str | None = None) -> torch.Tensor:
    return activation(F.linear(x, weight, bias), activation_name)
