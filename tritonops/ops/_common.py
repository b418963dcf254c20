"""Validation and dtype helpers shared by every op."""

from __future__ import annotations

from pathlib import Path

import torch
import triton.language as tl

from .. import runtime

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

DTYPE_NAMES = {dt: str(dt).replace("torch.", "") for dt in FLOAT_DTYPES}

# Tuned configs shipped with the package: one `autotune export` bundle per GPU model.
SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tritonops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"tritonops.{op}: {name} has dtype {t.dtype}; supported are float16, bfloat16, float32 and float64")


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


def use_reference(op: str, device: torch.device) -> bool:
    """True (with a one-time warning) when no Triton backend can run on this device."""
    if runtime.backend_for(device) == runtime.BACKEND_REFERENCE:
        runtime.warn_reference_once(op, device)
        return True
    return False


def acc_dtype(dtype: torch.dtype):
    """The accumulator type: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 follows torch.get_float32_matmul_precision() ('highest'
    is IEEE fp32, else TF32); float64 is IEEE; 16-bit types ignore it."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "ieee" if dtype == torch.float64 else "tf32"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Under the interpreter 16-bit float arithmetic is wrong: kernels convert such loads to fp32."""
    return runtime.INTERPRETER and dtype in HALF_DTYPES


def tuning_device() -> str:
    """Where a tuner's runner builds its scratch inputs: the GPU, or the interpreter's CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
