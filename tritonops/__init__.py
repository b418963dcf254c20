"""tritonops: Triton GPU kernels for PyTorch, tuned per GPU.

Functional ops with the signatures of their torch twins:
    tritonops.matmul(a, b)                           # torch.matmul
    tritonops.linear(x, w, b, activation="gelu")     # F.linear + fused activation
    tritonops.softmax(x, dim), tritonops.log_softmax(x, dim)
    tritonops.layer_norm(x, normalized_shape, w, b), tritonops.rms_norm(x, normalized_shape, w)
    tritonops.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)   # F.scaled_dot_product_attention
drop-in modules in tritonops.nn; tritonops.patch(model) swaps them into a model in place;
tritonops.enable() routes torch's own calls to these ops in a scope; with transformers installed,
attn_implementation="tritonops" selects our attention.
"""

from . import reference, runtime
from .ops.attention import attention
from .ops.matmul import linear, matmul
from .ops.norm import layer_norm, rms_norm
from .ops.softmax import log_softmax, softmax
from . import nn  # noqa: E402 - after the ops it wraps
from .patching import PatchReport, patch, unpatch
from .routing import RoutingMode, disable, enable
from . import huggingface

huggingface.install()  # cheap: registers with transformers when (and if) transformers loads

__version__ = "0.1.0"
__all__ = ["matmul", "linear", "attention", "softmax", "log_softmax", "layer_norm", "rms_norm", "nn", "patch", "unpatch",
           "PatchReport", "enable", "disable", "RoutingMode", "huggingface", "reference", "runtime"]
