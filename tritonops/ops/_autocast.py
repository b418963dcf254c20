"""torch's autocast policy for our ops: what torch.autocast would do to the same call.

Under `torch.autocast(device_type, dtype)` torch casts the inputs of some ops before they run:
matmul, linear and scaled_dot_product_attention run in the autocast dtype ("lower precision");
softmax, log_softmax, layer_norm and rms_norm run in float32 on CUDA; ops it does not list run
in their inputs' dtypes (on CPU that is softmax and the norms). Our public ops apply the same
casts before validating, so a patched model under autocast gets torch's dtypes: a bf16
activation meeting an fp32 weight in linear is legal, as in torch.

Which ops torch lists for a device type is read from torch's own dispatcher (an autocast
kernel registered for the aten op), so it follows the installed torch. The casts happen in
the public functions rather than through torch.library.register_autocast, which fixes one
target dtype at registration and so cannot follow the autocast region's dtype.
"""

from __future__ import annotations

import torch

LOWER_PRECISION = "lower_precision_fp"  # cast to the autocast dtype
FLOAT32 = "fp32"  # cast to float32 (softmax: run with dtype=float32 unless one is given)

# op -> (torch's aten op whose autocast registration decides, policy)
_POLICY = {
    "matmul": ("aten::matmul", LOWER_PRECISION),
    "linear": ("aten::linear", LOWER_PRECISION),
    "attention": ("aten::scaled_dot_product_attention", LOWER_PRECISION),
    "softmax": ("aten::softmax.int", FLOAT32),
    "log_softmax": ("aten::log_softmax.int", FLOAT32),
    "layer_norm": ("aten::layer_norm", FLOAT32),
    "rms_norm": ("aten::rms_norm", FLOAT32),
}
_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _registered(aten_op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, key)
    except RuntimeError:  # an op this torch does not have (rms_norm before 2.4)
        return False


# (op, device type) -> policy, for the pairs torch autocasts; read once, at import, so that a
# traced call (torch.compile) sees constants
_APPLIES = {(op, device_type): policy
            for op, (aten_op, policy) in _POLICY.items()
            for device_type, key in _DISPATCH_KEYS.items() if _registered(aten_op, key)}


def autocast_dtype(op: str, t) -> torch.dtype | None:
    """The dtype torch's autocast casts `op`'s floating inputs to when `t` (its first tensor)
    is the input, or None: autocast is off for t's device type, or torch leaves the op alone."""
    if not isinstance(t, torch.Tensor):
        return None
    device_type = t.device.type
    policy = _APPLIES.get((op, device_type))
    if policy is None or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if policy == LOWER_PRECISION else torch.float32


def autocast_eligible(t, device_type: str) -> bool:
    """Whether autocast casts `t`: a floating tensor on the region's device type, not float64."""
    return (isinstance(t, torch.Tensor) and t.device.type == device_type and t.is_floating_point()
            and t.dtype != torch.float64)


def autocast_inputs(op: str, first, *rest):
    """(first, *rest) with autocast's casts applied, as torch casts the inputs of `op`;
    unchanged when autocast is off or does not apply. Non-tensors pass through."""
    dtype = autocast_dtype(op, first)
    if dtype is None:
        return (first, *rest)
    device_type = first.device.type
    return tuple(t.to(dtype) if autocast_eligible(t, device_type) else t for t in (first, *rest))
