"""`python -m tritonops`: run each op once against torch and print the error and backend.

Without a GPU, run it as `TRITON_INTERPRET=1 python -m tritonops` so the Triton
kernels run under the CPU interpreter (otherwise the torch reference runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import tritonops
from tritonops import runtime


def _cases(device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    a, b = randn(8, 96, 80), randn(80, 72)
    yield "matmul", tritonops.matmul, torch.matmul, (a, b), {}
    x, w, bias = randn(4, 33, 96), randn(120, 96) / 10, randn(120)
    yield "linear", tritonops.linear, F.linear, (x, w, bias), {}
    yield "linear + gelu (fused)", lambda *t: tritonops.linear(*t, activation="gelu"), \
        lambda *t: F.gelu(F.linear(*t)), (x, w, bias), {}
    rows = randn(64, 1000)
    yield "softmax", tritonops.softmax, F.softmax, (rows,), {"dim": -1}
    yield "layer_norm", lambda t, w, b: tritonops.layer_norm(t, (1000,), w, b), \
        lambda t, w, b: F.layer_norm(t, (1000,), w, b), (rows, randn(1000), randn(1000)), {}
    yield "rms_norm", lambda t, w: tritonops.rms_norm(t, (1000,), w), \
        lambda t, w: F.rms_norm(t, (1000,), w), (rows, randn(1000)), {}
    q, k, v = randn(2, 4, 100, 64), randn(2, 4, 120, 64), randn(2, 4, 120, 64)
    yield "attention (causal)", tritonops.attention, F.scaled_dot_product_attention, (q, k, v), {"is_causal": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonops", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = runtime.backend_for(device)
    print(f"tritonops {tritonops.__version__}: device {device}, dtype {args.dtype}, backend {backend}")
    if backend == runtime.BACKEND_REFERENCE:
        print("  (no GPU and TRITON_INTERPRET is not set: run `TRITON_INTERPRET=1 python -m tritonops` "
              "to run the Triton kernels under the interpreter)")
    for name, ours, theirs, inputs, kwargs in _cases(device, dtype):
        out = ours(*inputs, **kwargs)
        expected = theirs(*(t.double() for t in inputs), **kwargs)
        torch_out = theirs(*inputs, **kwargs)
        err = (out.double() - expected).abs().max().item()
        torch_err = (torch_out.double() - expected).abs().max().item()
        print(f"  {name:22s} shape {str(tuple(out.shape)):16s} max error {err:.3e}  (torch {args.dtype}: {torch_err:.3e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
