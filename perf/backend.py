"""Where the kernels of a perf command run: the GPU, or Triton's CPU interpreter."""

from __future__ import annotations

import os


def prepare_backend() -> bool:
    """True with a usable GPU; otherwise sets TRITON_INTERPRET=1. Call it before anything
    imports triton: the interpreter is chosen when a kernel is decorated."""
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    return False
