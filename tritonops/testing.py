"""The one tolerance table and the checks every test holds results to.

A result in precision p is held to the float64 reference by relative error: it
may be at most `factor` times torch's own error at precision p, plus a per-dtype
floor. (Two configs of one kernel are compared by autotune's own agreement check,
`autotune.default_check`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    factor: float  # allowed multiple of torch's own relative error at this precision
    floor: float  # relative error always allowed (covers torch being exact by luck)


TOLERANCES = {
    torch.float64: Tolerance(factor=2.0, floor=1e-10),
    torch.float32: Tolerance(factor=2.0, floor=2e-6),
    torch.float16: Tolerance(factor=2.0, floor=5e-4),
    torch.bfloat16: Tolerance(factor=2.0, floor=4e-3),
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
