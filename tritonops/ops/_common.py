"""Validation and dtype helpers shared by every op."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import triton

from .. import runtime

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DTYPE_NAMES = {dt: str(dt).replace("torch.", "") for dt in FLOAT_DTYPES}


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A tensor (or a requested output) dtype the kernels do not implement: integer, bool, complex.

    torch raises NotImplementedError for a dtype an op has no kernel for (a RuntimeError, which
    is what scaled_dot_product_attention raises for integer inputs), so code written against
    torch catches one of those; tritonops raised TypeError before, so it stays one too.
    """


def unsupported_dtype(op: str, what: str, dtype: torch.dtype) -> UnsupportedDtypeError:
    return UnsupportedDtypeError(
        f"tritonops.{op}: {what} has dtype {dtype}; supported are float16, bfloat16, float32 and float64")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):  # as torch's argument parser: a plain TypeError
        raise TypeError(f"tritonops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise unsupported_dtype(op, name, t.dtype)


def check_same(op: str, tensors: dict[str, torch.Tensor | None]) -> tuple[torch.dtype, torch.device]:
    """All given tensors are floating, of one dtype and on one device; returns those."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        check_float(op, name, t)
    (first_name, first), *rest = present.items()
    for name, t in rest:
        if t.device != first.device:
            raise RuntimeError(
                f"tritonops.{op}: expected all tensors on one device, but {first_name} is on {first.device} "
                f"and {name} is on {t.device}")
        if t.dtype != first.dtype:
            raise RuntimeError(
                f"tritonops.{op}: expected all tensors of one dtype, but {first_name} is {first.dtype} "
                f"and {name} is {t.dtype}")
    return first.dtype, first.device


def forward_ad_in_use(tensors) -> bool:
    """Whether a forward-mode derivative is being taken through `tensors`: one of them is the
    subject of the innermost torch.func.jvp, or a forward_ad dual tensor. Under torch.compile,
    which traces dual tensors its own way, any open forward_ad dual level counts (dynamo
    guards on it)."""
    if torch.compiler.is_compiling():
        return forward_ad._current_level >= 0
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Jvp:
        level = interpreter.level()
        if any(isinstance(t, torch.Tensor) and torch._C._functorch.maybe_get_level(t) == level for t in tensors):
            return True
    if forward_ad._current_level < 0:  # no dual level entered: no tensor carries a tangent
        return False
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def check_no_forward_ad(op: str, tensors) -> None:
    """Our ops have reverse-mode derivatives only: refuse a forward-mode one, which torch would
    otherwise take as zero (torch.func.jvp) or drop (forward_ad) without a word."""
    if forward_ad_in_use(tensors):
        raise NotImplementedError(
            f"tritonops.{op} has no forward-mode derivative (torch.func.jvp, torch.autograd.forward_ad); "
            f"use torch's op there, or reverse mode (backward, torch.autograd.grad)")


def use_reference(op: str, device: torch.device) -> bool:
    """True (with a one-time warning) when no Triton backend can run on this device."""
    if runtime.backend_for(device) == runtime.BACKEND_REFERENCE:
        runtime.warn_reference_once(op, device)
        return True
    return False


def dot_input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 follows torch.get_float32_matmul_precision() ('highest'
    is IEEE fp32, else TF32); float64 is IEEE; 16-bit types ignore it."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "ieee" if dtype == torch.float64 else "tf32"


def padded_dim(d: int) -> int:
    """A dim padded to a power of two, at least 16 (the smallest tl.dot): attention's head dims."""
    return max(16, triton.next_power_of_2(d))
