"""Where kernels run: a CUDA GPU, Triton's CPU interpreter, or the torch reference.

`TRITON_INTERPRET=1` must be set before `triton` decorates our kernels (it is read
at decoration time), so it is read here once, at import.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

# With TRITONOPS_POISON=1 every output buffer starts as NaN (or the dtype's
# extreme value), so an element a kernel forgot to write shows up in tests.
POISON = os.environ.get("TRITONOPS_POISON", "0") not in ("", "0")

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])

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


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """Like torch.empty_like (strides of a dense `t` kept); NaN-filled when poisoning."""
    out = torch.empty_like(t)
    return poisoned(out) if POISON else out


def poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)


@functools.lru_cache(maxsize=None)
def device_properties(device_index: int | None = None) -> dict:
    """Limits the tuner and heuristics need; a stand-in (an H100's numbers) under the interpreter."""
    if INTERPRETER or not torch.cuda.is_available():
        return {
            "name": "interpreter",
            "capability": (9, 0),
            "multiprocessor_count": 132,
            "max_shared_mem": 232448,
            "max_num_regs": 65536,
            "warp_size": 32,
        }
    index = torch.cuda.current_device() if device_index is None else device_index
    props = torch.cuda.get_device_properties(index)
    from triton.runtime import driver

    tprops = driver.active.utils.get_device_properties(index)
    return {
        "name": props.name,
        "capability": (props.major, props.minor),
        "multiprocessor_count": props.multi_processor_count,
        "max_shared_mem": tprops["max_shared_mem"],
        "max_num_regs": tprops["max_num_regs"],
        "warp_size": tprops.get("warpSize", 32),
    }


def device_fingerprint(device_index: int | None = None) -> str:
    """GPU name, compute capability and Triton major.minor: what a tuned config is valid for."""
    props = device_properties(device_index)
    name = "".join(c if c.isalnum() else "-" for c in props["name"]).strip("-").lower()
    major, minor = props["capability"]
    return f"{name}-sm{major}{minor}-triton{TRITON_VERSION[0]}.{TRITON_VERSION[1]}"
