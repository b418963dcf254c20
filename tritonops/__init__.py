"""tritonops: Triton GPU kernels for PyTorch, tuned per GPU.

Functional ops with the signatures of their torch twins:
    tritonops.matmul(a, b)                           # torch.matmul
    tritonops.linear(x, w, b, activation="gelu")     # F.linear + fused activation
"""

from . import reference, runtime
from .ops.matmul import linear, matmul

__version__ = "0.1.0"
__all__ = ["matmul", "linear", "reference", "runtime"]
