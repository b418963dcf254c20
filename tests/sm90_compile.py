"""Compile every kernel family for Hopper (sm90) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (tests/test_gpu_compile.py does):
each op's real launcher runs on empty CPU tensors of GPU-sized problems, but every
`kernel[grid](...)` launch is captured and compiled for sm90 with the bundled ptxas
instead of run. What the interpreter lets pass and a GPU refuses shows up here:
plain globals in jit code, dots under 16, API removed in a Triton version, and
configs whose shared memory exceeds the H100's 227 KB.

Prints one JSON line per compile and exits non-zero if any failed.
"""

import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["AUTOTUNE_MODE"] = "off"  # the heuristic defaults: what users get untuned (wins over TRITONOPS_AUTOTUNE)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tritonops import runtime  # noqa: E402
from tritonops.ops import attention as attention_ops  # noqa: E402
from tritonops.ops import matmul as matmul_ops  # noqa: E402
from tritonops.ops import norm as norm_ops  # noqa: E402
from tritonops.ops import softmax as softmax_ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED = 232448
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.uint8: "u8", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64"}
results = []
seen = set()


class Capture:
    """Stands in for a JITFunction: `kernel[grid](...)` compiles for sm90 instead of running."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.__name__ = fn.__name__

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = self.fn
            values = dict(zip(fn.arg_names, args))
            values.update(kwargs)
            options = {"num_warps": values.pop("num_warps", 4), "num_stages": values.pop("num_stages", 3)}
            signature, constants = {}, {}
            for param, name in zip(fn.params, fn.arg_names):
                v = values[name]
                if param.is_constexpr:
                    signature[name], constants[name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    signature[name] = "*" + TYPES[v.dtype]
                elif isinstance(v, bool):
                    signature[name] = "i1"
                elif isinstance(v, int):
                    signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                elif isinstance(v, float):
                    signature[name] = "fp32"
                elif v is None:
                    signature[name] = "constexpr"
                    constants[name] = None
                else:
                    raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
            ident = (fn.__name__, json.dumps(signature, sort_keys=True), repr(sorted(constants.items())),
                     tuple(sorted(options.items())))
            if ident in seen:
                return
            seen.add(ident)
            shown = {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
                     for k, v in constants.items()}
            t0 = time.time()
            try:
                kernel = triton.compile(ASTSource(fn, signature, constants), target=TARGET, options=options)
                shared = kernel.metadata.shared
                ok = shared <= H100_SHARED
                results.append({"kernel": fn.__name__, "ok": ok, "shared": shared, "constants": shown, **options,
                                "seconds": round(time.time() - t0, 1),
                                **({} if ok else {"error": f"needs {shared} B of shared memory > {H100_SHARED}"})})
            except Exception as e:  # noqa: BLE001
                results.append({"kernel": fn.__name__, "ok": False, "constants": shown, **options,
                                "error": f"{type(e).__name__}: {str(e)[-1500:]}"})
        return launch


for module in (matmul_ops, softmax_ops, norm_ops, attention_ops):
    for name, value in list(vars(module).items()):
        if isinstance(value, JITFunction):
            setattr(module, name, Capture(value))

runtime.POISON = False
E = torch.empty


def matmul_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a, b = E(1, 4096, 4096, dtype=dtype), E(1, 4096, 4096, dtype=dtype)
        matmul_ops.launch_matmul(a, b)
    x, w, bias = E(1, 1000, 4096, dtype=torch.bfloat16), E(1, 4096, 11008, dtype=torch.bfloat16), E(11008, dtype=torch.bfloat16)
    for activation in ("relu", "gelu", "gelu_tanh", "silu"):
        matmul_ops.launch_matmul(x, w, bias, activation, store_preact=True)
        matmul_ops.launch_epilogue_bwd(E(1000, 11008, dtype=torch.bfloat16), E(1000, 11008, dtype=torch.bfloat16),
                                       activation, True)
    matmul_ops.launch_matmul(E(1, 16, 4096, dtype=torch.float16), E(1, 4096, 4096, dtype=torch.float16))  # decode
    matmul_ops.launch_matmul(E(1, 64, 64, dtype=torch.float64), E(1, 64, 64, dtype=torch.float64))


def softmax_cases():
    for cols in (4096, 65536):  # one pass, and the looped path
        x = E(64, cols, dtype=torch.bfloat16)
        for log in (False, True):
            y = softmax_ops.launch_softmax_fwd(x, 1, log)
            softmax_ops.launch_softmax_bwd(y, E(64, cols, dtype=torch.bfloat16), 1, log, x.dtype)
    softmax_ops.launch_softmax_fwd(E(8, 1024, 512, dtype=torch.float16), 1, False)  # reduced dim not unit-stride


def norm_cases():
    for cols in (4096, 65536):
        x = E(256, cols, dtype=torch.bfloat16)
        w, b = E(cols, dtype=torch.bfloat16), E(cols, dtype=torch.bfloat16)
        for rms in (False, True):
            y, mean, rstd = norm_ops.launch_norm_fwd(x, w, None if rms else b, 1e-5, rms)
            mean = mean if mean is not None else None
            norm_ops.launch_norm_bwd(E(256, cols, dtype=torch.bfloat16), x, w, mean, rstd, True, not rms)


def attention_cases():
    for dtype, d, causal, mask, p in [(torch.bfloat16, 64, True, None, 0.0), (torch.float16, 128, False, "bool", 0.1),
                                      (torch.bfloat16, 256, False, "add", 0.0), (torch.float32, 80, True, None, 0.0)]:
        L = S = 2048
        q, k, v = E(2, 8, L, d, dtype=dtype), E(2, 4, S, d, dtype=dtype), E(2, 4, S, d, dtype=dtype)
        m = None
        if mask == "bool":
            m = E(L, S, dtype=torch.bool).expand(2, 8, L, S)
        elif mask == "add":
            m = E(L, S, dtype=dtype).expand(2, 8, L, S)
        o, lse = attention_ops.launch_attention_fwd(q, k, v, m, causal, None, p, 123)
        for exact in (False, True):  # FlashAttention-2's delta, and the one the dQ kernel forms
            attention_ops.launch_attention_bwd(torch.empty_like(o), q, k, v, m, o, lse, causal, None, p, 123,
                                               mask_grad=mask == "add", exact_delta=exact)


def main() -> int:
    families = sys.argv[1:] or ["matmul", "softmax", "norm", "attention"]
    for family in families:
        try:
            globals()[f"{family}_cases"]()
        except Exception as e:  # noqa: BLE001 - a launcher that breaks before its launch
            results.append({"kernel": f"{family} launcher", "ok": False, "error": f"{type(e).__name__}: {e}"})
    for r in results:
        print(json.dumps(r))
    failed = [r for r in results if not r["ok"]]
    print(f"sm90 compile: {len(results) - len(failed)} of {len(results)} kernels compile and fit", file=sys.stderr)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
