"""Where kernels run: a CUDA GPU, Triton's CPU interpreter, or the torch reference.

`TRITON_INTERPRET=1` must be set before `triton` decorates our kernels (it is read
at decoration time), so it is read here once, at import.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton

from autotune.device import device_fingerprint, device_properties, interpreter_active  # noqa: F401

INTERPRETER = interpreter_active()

# With TRITONOPS_POISON=1 every output buffer starts as NaN (or the dtype's
# extreme value), so an element a kernel forgot to write shows up in tests.
POISON = os.environ.get("TRITONOPS_POISON", "0") not in ("", "0")

BACKEND_GPU = "triton-gpu"
BACKEND_INTERPRETER = "triton-interpreter"
BACKEND_REFERENCE = "torch-reference"


def backend_for(device: torch.device) -> str:
    """The backend an op uses for tensors on `device`."""
    if device.type == "cuda":
        return BACKEND_INTERPRETER if INTERPRETER else BACKEND_GPU
    if device.type == "cpu" and INTERPRETER:
        return BACKEND_INTERPRETER
    return BACKEND_REFERENCE


_warned_reference: set[str] = set()


def warn_reference_once(op: str, device: torch.device) -> None:
    if op in _warned_reference:
        return
    _warned_reference.add(op)
    warnings.warn(
        f"tritonops.{op}: tensors on {device.type} and the Triton interpreter is off "
        f"(TRITON_INTERPRET is not set), so the torch reference runs instead of a Triton kernel",
        RuntimeWarning,
        stacklevel=3,
    )


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer; NaN-filled when TRITONOPS_POISON=1."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    return poisoned(torch.empty(shape, dtype=dtype, device=device))


def poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU that runs launches on `device`, which sizes
    persistent grids; off a GPU (the interpreter, the sm90 compile check), the stand-in
    device's 132 (an H100's)."""
    if device.type != "cuda" or INTERPRETER:
        return device_properties()["multiprocessor_count"]
    return device_properties(device.index if device.index is not None else torch.cuda.current_device()
                             )["multiprocessor_count"]


# Bytes a tensor descriptor's base address and non-unit strides must be multiples of (TMA).
TMA_ALIGN = 16
# The dtypes our kernels read through tensor descriptors. 16-bit only: compiled for sm90,
# float32 at torch's default precision (exact fp32 dots, no tensor cores) spills on every
# attention tile, and more on descriptor loads than on pointer loads.
TMA_DTYPES = (torch.float16, torch.bfloat16)


def supports_tma(device: torch.device) -> bool:
    """Whether launches on `device` may use tensor descriptors: a Hopper or newer NVIDIA GPU;
    off a GPU (the interpreter, or compiling for sm90 without one) the layout alone decides."""
    if device.type != "cuda" or INTERPRETER:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.version.hip is None and device_properties(index)["capability"][0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_descriptor_allocator(device: torch.device) -> None:
    """Kernels that build tensor descriptors on the device take global scratch memory from
    the allocator of `triton.set_allocator`, which Triton keeps per context (thread): set
    one backed by torch's caching allocator where none is, before such a launch on a GPU.
    An allocator the caller set stays."""
    if device.type != "cuda" or INTERPRETER:
        return
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)
