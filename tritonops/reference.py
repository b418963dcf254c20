"""Reference implementations (plain torch) and the one tolerance table.

The references serve two purposes: the fallback for CPU tensors when no Triton
backend is active, and the ground truth of every test. A result in precision p
is held to the float64 reference by relative error: it may be at most
`factor` times torch's own error at precision p, plus a per-dtype floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    factor: float  # allowed multiple of torch's own relative error at this precision
    floor: float  # relative error always allowed (covers torch being exact by luck)
    agree: float  # relative difference allowed between two configs of one kernel (the tuner's check);
    # float32 allows for TF32


TOLERANCES = {
    torch.float64: Tolerance(factor=2.0, floor=1e-10, agree=1e-9),
    torch.float32: Tolerance(factor=2.0, floor=2e-6, agree=1e-2),
    torch.float16: Tolerance(factor=2.0, floor=5e-4, agree=1e-2),
    torch.bfloat16: Tolerance(factor=2.0, floor=4e-3, agree=3e-2),
}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| over the finite elements of ref; inf if the
    non-finite elements (NaN, +inf, -inf) do not sit in the same places."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    finite = torch.isfinite(ref)
    same_nonfinite = torch.equal(torch.isnan(x), torch.isnan(ref)) and torch.equal(
        torch.where(finite, 0.0, x.nan_to_num(nan=0.0)), torch.where(finite, 0.0, ref.nan_to_num(nan=0.0)))
    if not same_nonfinite:
        return math.inf
    if not finite.any():
        return 0.0
    diff = (x - ref)[finite].abs().max().item()
    if math.isnan(diff):
        return math.inf
    scale = ref[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(ours: torch.Tensor, reference: torch.Tensor, torch_result: torch.Tensor | None,
                 dtype: torch.dtype | None = None, what: str = "result") -> None:
    """Check `ours` against a float64 `reference`.

    `torch_result` is torch's own answer at the same precision; its error sets the
    bar. Pass None where torch has no such answer: then the floor alone applies.
    """
    dtype = dtype or ours.dtype
    tol = TOLERANCES[dtype]
    err = relative_error(ours, reference)
    torch_err = relative_error(torch_result, reference) if torch_result is not None else 0.0
    if math.isinf(torch_err):
        torch_err = 0.0
    bound = tol.factor * torch_err + tol.floor
    if not err <= bound:
        raise AssertionError(
            f"{what} ({dtype}): relative error {err:.3g} > {bound:.3g} "
            f"(= {tol.factor} x torch's {torch_err:.3g} + {tol.floor:.1g})")


def configs_agree(out, default_out) -> bool:
    """The autotuner's check: a candidate config's outputs match the default config's."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = default_out if isinstance(default_out, (tuple, list)) else (default_out,)
    return len(outs) == len(refs) and all(
        o.shape == r.shape and relative_error(o, r) <= TOLERANCES[r.dtype].agree for o, r in zip(outs, refs))
