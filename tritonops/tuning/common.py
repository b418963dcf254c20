"""What every op family's tuning shares: tritonops' names for autotune's settings, dtype
names, where runners run, shipped configs."""

from __future__ import annotations

from pathlib import Path

import torch

from autotune import settings

from ..ops._common import DTYPE_NAMES

# tritonops' own names for autotune's environment variables (autotune's AUTOTUNE_* win when
# both are set), and its own cache directory.
settings.alias("cache_dir", "TRITONOPS_CACHE_DIR")
settings.alias("mode", "TRITONOPS_AUTOTUNE")
settings.alias("record", "TRITONOPS_RECORD")
settings.set_default("cache_dir", Path.home() / ".cache" / "tritonops")

# Tuned configs shipped with the package: one `autotune export` bundle per GPU model.
SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))

ITEMSIZE = {name: getattr(torch, name).itemsize for name in DTYPE_NAMES.values()}


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name a key stores for a dtype ("float16", ...), from a torch dtype or a name."""
    if isinstance(dtype, str):
        if dtype not in ITEMSIZE:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(ITEMSIZE)}")
        return dtype
    return DTYPE_NAMES[dtype]


def check_dtype(dtype: str, allowed: tuple[str, ...]) -> None:
    """The `autotune` command's check of a dtype given on its command line."""
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(allowed)}")


def tuning_device() -> str:
    """Where a tuner's runner builds its scratch inputs: the GPU, or the interpreter's CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
