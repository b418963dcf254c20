"""`python -m tritonops`: run each op once against torch and print the error and backend.

Without a GPU, run it as `TRITON_INTERPRET=1 python -m tritonops` so the Triton
kernels run under the CPU interpreter (otherwise the torch reference runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import tritonops
from tritonops import reference, runtime


def _cases(device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    a, b = randn(8, 96, 80), randn(80, 72)
    yield "matmul", tritonops.matmul, torch.matmul, (a, b), {}
    x, w, bias = randn(4, 33, 96), randn(120, 96) / 10, randn(120)
    yield "linear", tritonops.linear, F.linear, (x, w, bias), {}
    yield "linear + gelu (fused)", tritonops.linear, reference.linear, (x, w, bias), {"activation": "gelu"}


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
        ref_kwargs = {"activation_name": kwargs["activation"]} if kwargs else {}
        expected = theirs(*(t.double() for t in inputs), **ref_kwargs)
        torch_out = theirs(*inputs, **ref_kwargs)
        err = (out.double() - expected).abs().max().item()
        torch_err = (torch_out.double() - expected).abs().max().item()
        print(f"  {name:22s} shape {str(tuple(out.shape)):16s} max error {err:.3e}  (torch {args.dtype}: {torch_err:.3e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
