"""The device a tuned config is valid for: its limits and its fingerprint.

Under Triton's interpreter (TRITON_INTERPRET=1) there is no device to ask: the
limits are a stand-in (an H100's) and the fingerprint says "interpreter".
"""

from __future__ import annotations

import functools
import os


def triton_version() -> tuple[int, int]:
    # imported here: `autotune` itself never imports triton, so a program can still set
    # TRITON_INTERPRET after importing it (the interpreter must be chosen before triton loads)
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() and not interpreter_active()


_STAND_IN = {
    "name": "interpreter",
    "capability": (9, 0),
    "multiprocessor_count": 132,
    "max_shared_mem": 232448,
    "max_num_regs": 65536,
    "warp_size": 32,
    "driver": "none",
}


@functools.lru_cache(maxsize=None)
def device_properties(device_index: int | None = None) -> dict:
    """name, capability, multiprocessor_count, max_shared_mem, max_num_regs, warp_size, driver."""
    if not gpu_available():
        return dict(_STAND_IN)
    import torch
    from triton.runtime import driver

    index = torch.cuda.current_device() if device_index is None else device_index
    props = torch.cuda.get_device_properties(index)
    tprops = driver.active.utils.get_device_properties(index)
    return {
        "name": props.name,
        "capability": (props.major, props.minor),
        "multiprocessor_count": props.multi_processor_count,
        "max_shared_mem": tprops["max_shared_mem"],
        "max_num_regs": tprops["max_num_regs"],
        "warp_size": tprops.get("warpSize", 32),
        "driver": _driver_version(),
    }


def _driver_version() -> str:
    try:
        import torch

        return str(torch._C._cuda_getDriverVersion()) if hasattr(torch._C, "_cuda_getDriverVersion") else (
            torch.version.cuda or "unknown")
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def device_slug(name: str) -> str:
    """A device name as a plain lowercase name, e.g. 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in text.split("-") if p)


def device_fingerprint(device_index: int | None = None) -> str:
    """GPU name, compute capability and Triton major.minor, e.g. 'nvidia-h100-80gb-hbm3-sm90-triton3.6'."""
    props = device_properties(device_index)
    major, minor = props["capability"]
    tmajor, tminor = triton_version()
    return f"{device_slug(props['name'])}-sm{major}{minor}-triton{tmajor}.{tminor}"
