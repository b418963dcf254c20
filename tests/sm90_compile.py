"""Compile every kernel family for Hopper (sm90) on a machine without a GPU, as the JIT would.

    python -m tests.sm90_compile [matmul softmax norm attention]   the compile check
    python -m tests.sm90_compile --report [op ...]                 the structural report

Run in a process without TRITON_INTERPRET (the module drops it before importing Triton).
Each op's real launcher runs on empty CPU tensors of GPU-sized problems with its heuristic
defaults (AUTOTUNE_MODE=off); every Triton launch it makes is captured, not run
(`autotune.precompile.capture_launches`), specialised by Triton's own binder exactly as
`JITFunction.run` specialises it (pointers and integers divisible by 16, integers equal to
1: `autotune.precompile.compile_job`) and compiled for sm90 (GPUTarget("cuda", 90, 32),
sm_90a) with the bundled ptxas. Without that specialisation the binary differs (scalar loads,
no cp.async, no multi-buffering, spills), so this is the binary a GPU would run.

One JSON object per compiled kernel, with the fields
    op, case, kernel, config (its constexpr block sizes, num_warps, num_stages), grid (CTAs),
    wgmma, mma_sync (static PTX counts of warpgroup and Ampere MMAs), cp_async (Ampere async
    copies), tma_loads, tma_stores (cp.async.bulk.tensor), regs, spills (bytes stored plus
    loaded, from ptxas -v), smem (bytes of shared memory), ok, error.
`ok` is false when the compile fails or the kernel needs more than the H100's 227 KB of
shared memory. The check exits non-zero when any kernel is not ok; the report always
exits 0 after printing (tests/test_gpu_compile.py asserts the structural targets on it).
The check covers each family's paths broadly (dtypes, masks, epilogues, the looped rows);
the report covers the problems the structural targets name.
"""

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["AUTOTUNE_MODE"] = "off"  # the heuristic defaults: what users get untuned (wins over TRITONOPS_AUTOTUNE)
# A fresh cache of its own: nothing it compiles lands in the user's.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tritonops-sm90-")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from autotune.precompile import capture_launches, compile_job  # noqa: E402
from tritonops import runtime  # noqa: E402
from tritonops.ops import attention as attention_ops  # noqa: E402
from tritonops.ops import matmul as matmul_ops  # noqa: E402
from tritonops.ops import norm as norm_ops  # noqa: E402
from tritonops.ops import softmax as softmax_ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED = 232448  # bytes of shared memory a block may use on an H100 / H200 (227 KB)
knobs.nvidia.dump_ptxas_log = True
knobs.compilation.always_compile = True  # ptxas runs, and logs, for every kernel, even one whose hash repeats
runtime.POISON = False
E = torch.empty
BF16 = torch.bfloat16
_compiled: dict[str, dict] = {}  # job identity -> measures: a kernel launched twice alike compiles once


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def measure(kernel, ptxas_log: str) -> dict:
    """The structural counts of a compiled kernel."""
    ptx = kernel.asm.get("ptx", "")
    regs = re.findall(r"Used (\d+) registers", ptxas_log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return {
        "wgmma": _count(r"wgmma\.mma_async", ptx),
        "mma_sync": _count(r"\bmma\.sync\.", ptx),
        "cp_async": _count(r"cp\.async\.c[ag]\.", ptx),
        "tma_loads": _count(r"cp\.async\.bulk\.tensor\.[1-5]d\.shared::\w+\.global", ptx),
        "tma_stores": _count(r"cp\.async\.bulk\.tensor\.[1-5]d\.global\.shared", ptx),
        "regs": int(regs[-1]) if regs else None,
        "spills": int(spills[-1][0]) + int(spills[-1][1]) if spills else None,
        "smem": kernel.metadata.shared,
    }


def compile_launch(launch) -> dict:
    """Compile one captured launch for sm90 as JITFunction.run would; its measures, or the error."""
    job = compile_job(launch, TARGET)
    ident = job.identity()
    if ident not in _compiled:
        src = job.source(launch.fn)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=TARGET, options=dict(job.options))
            row = measure(kernel, log.getvalue())
            row["ok"] = row["smem"] <= H100_SHARED
            row["error"] = None if row["ok"] else f"needs {row['smem']} B of shared memory > {H100_SHARED}"
        except Exception as e:  # noqa: BLE001 - the check reports every failure
            text = str(e).strip()
            row = {"ok": False, "error": f"{type(e).__name__}: {text[-1500:]}"}
        _compiled[ident] = row
    return dict(_compiled[ident])


def _config(launch) -> dict:
    """The launch's tuned constexprs (upper-case scalars) and launch options."""
    out = {k: v for k, v in launch.kwargs.items()
           if k.isupper() and isinstance(v, (bool, int)) and not k.startswith(("HAS_", "STORE_", "EVEN_"))}
    out.update({k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs})
    return out


def _grid(launch) -> int | None:
    grid = launch.grid
    if callable(grid):
        grid = grid(dict(zip(launch.fn.arg_names, launch.args), **launch.kwargs))
    n = 1
    for g in grid or ():
        n *= g
    return n


def run_case(op: str, case: str, call) -> list[dict]:
    """The rows of every kernel `call()` launches."""
    t0 = time.time()
    try:
        launches = capture_launches(call)
    except Exception as e:  # noqa: BLE001 - a launcher that breaks before its launch
        return [{"op": op, "case": case, "kernel": "launcher", "ok": False, "error": f"{type(e).__name__}: {e}"}]
    rows = []
    for launch in launches:
        row = {"op": op, "case": case, "kernel": launch.fn.__name__, "config": _config(launch), "grid": _grid(launch)}
        row.update(compile_launch(launch))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        t0 = time.time()
    return rows


# --------------------------------------------------------------------------- the report


def report_cases():
    """(op, case, call): the problems the structural targets name, bf16, heuristic defaults."""
    n = 8192
    a, b = E(1, n, n, dtype=BF16), E(1, n, n, dtype=BF16)
    w = E(n, n, dtype=BF16)
    yield "matmul", "bf16 8192x8192x8192", lambda: matmul_ops.launch_matmul(a, b)
    yield "linear", "bf16 8192x8192x8192", lambda: matmul_ops.launch_matmul(a, w.t()[None])
    yield "linear", "bf16 8192x8192x8192 bias gelu", \
        lambda: matmul_ops.launch_matmul(a, w.t()[None], E(n, dtype=BF16), "gelu", store_preact=True)
    for m in (16, 64):
        x, wd = E(1, m, 4096, dtype=BF16), E(4096, 4096, dtype=BF16)
        yield "linear", f"bf16 {m}x4096x4096 decode", lambda: matmul_ops.launch_matmul(x, wd.t()[None])
    Z, H, L, D = 4, 16, 4096, 128
    q, k, v = (E(Z, H, L, D, dtype=BF16) for _ in range(3))
    for causal in (False, True):
        c = "causal" if causal else "full"
        yield "attention_fwd", f"bf16 d128 B4 H16 L=S=4096 {c}", \
            lambda: attention_ops.launch_attention_fwd(q, k, v, None, causal)
        o, lse = E(Z, H, L, D, dtype=BF16), E(Z * H, L, dtype=torch.float32)
        yield "attention_bwd", f"bf16 d128 B4 H16 L=S=4096 {c}", \
            lambda: attention_ops.launch_attention_bwd(torch.empty_like(o), q, k, v, None, o, lse, causal)
    qd, kd, vd = E(1, 32, 1, D, dtype=BF16), E(1, 8, 8192, D, dtype=BF16), E(1, 8, 8192, D, dtype=BF16)
    yield "attention_decode", "bf16 d128 B1 H32 Hkv8 L1 S8192", \
        lambda: attention_ops.launch_attention_fwd(qd, kd, vd, None, False)
    for rows, cols in ((4096, 4096), (1024, 32768)):
        x, dy = E(rows, cols, dtype=BF16), E(rows, cols, dtype=BF16)
        shape = f"bf16 {rows}x{cols}"
        yield "softmax_fwd", shape, lambda: softmax_ops.launch_softmax_fwd(x, 1, False)
        yield "softmax_bwd", shape, lambda: softmax_ops.launch_softmax_bwd(x, dy, 1, False, BF16)
        wn = E(cols, dtype=BF16)
        yield "rms_norm_fwd", shape, lambda: norm_ops.launch_norm_fwd(x, wn, None, 1e-6, True)
        yield "rms_norm_bwd", shape, lambda: norm_ops.launch_norm_bwd(dy, x, wn, None, E(rows), True, False)


# --------------------------------------------------------------------------- the check


def matmul_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a, b = E(1, 4096, 4096, dtype=dtype), E(1, 4096, 4096, dtype=dtype)
        yield "matmul", f"{dtype} 4096^3", lambda: matmul_ops.launch_matmul(a, b)
        yield "matmul", f"{dtype} 4096^3 A^T B^T", \
            lambda: matmul_ops.launch_matmul(a.mT, b.mT)  # both operands M- / N-minor: transposed descriptors
    yield "matmul", "bf16 batched 2x4096^3 (pointer kernel)", \
        lambda: matmul_ops.launch_matmul(E(2, 4096, 4096, dtype=BF16), E(2, 4096, 4096, dtype=BF16))
    x, w, bias = E(1, 1000, 4096, dtype=BF16), E(1, 4096, 11008, dtype=BF16), E(11008, dtype=BF16)
    for activation in ("relu", "gelu", "gelu_tanh", "silu"):
        yield "linear", f"bias {activation}", \
            lambda: matmul_ops.launch_matmul(x, w, bias, activation, store_preact=True)
        yield "linear", f"epilogue backward {activation}", \
            lambda: matmul_ops.launch_epilogue_bwd(E(1000, 11008, dtype=BF16), E(1000, 11008, dtype=BF16),
                                                   activation, True)
    xl = E(1, 2048, 4096, dtype=BF16)
    yield "linear", "2048x11008x4096 bias gelu preact (descriptor kernel)", \
        lambda: matmul_ops.launch_matmul(xl, w, bias, "gelu", store_preact=True)
    for dtype in (torch.float16, torch.float32):
        yield "matmul", f"{dtype} decode 16x4096x4096 bias silu", \
            lambda: matmul_ops.launch_matmul(E(1, 16, 4096, dtype=dtype), E(1, 4096, 4096, dtype=dtype),
                                             E(4096, dtype=dtype), "silu", store_preact=True)
    yield "matmul", "float64", lambda: matmul_ops.launch_matmul(E(1, 64, 64, dtype=torch.float64),
                                                                E(1, 64, 64, dtype=torch.float64))


def softmax_cases():
    for cols in (4096, 32768, 65536, 131072):  # one pass, and the looped path beyond it
        x = E(64, cols, dtype=torch.bfloat16)
        for log in (False, True):
            yield "softmax", f"{cols} log={log}", lambda: softmax_ops.launch_softmax_bwd(
                softmax_ops.launch_softmax_fwd(x, 1, log), E(64, cols, dtype=torch.bfloat16), 1, log, x.dtype)
    yield "softmax", "reduced dim not unit-stride", \
        lambda: softmax_ops.launch_softmax_fwd(E(8, 1024, 512, dtype=torch.float16), 1, False)


def norm_cases():
    for cols in (4096, 32768, 65536, 131072):
        x = E(256, cols, dtype=torch.bfloat16)
        w, b = E(cols, dtype=torch.bfloat16), E(cols, dtype=torch.bfloat16)
        for rms in (False, True):
            def call(x=x, w=w, b=b, rms=rms, cols=cols):
                y, mean, rstd = norm_ops.launch_norm_fwd(x, w, None if rms else b, 1e-5, rms)
                norm_ops.launch_norm_bwd(E(256, cols, dtype=torch.bfloat16), x, w, mean, rstd, True, not rms)
            yield "norm", f"{cols} rms={rms}", call


def attention_cases():
    for dtype, d, causal, mask, p in [(torch.bfloat16, 64, True, None, 0.0), (torch.float16, 128, False, "bool", 0.1),
                                      (torch.bfloat16, 256, False, "add", 0.0), (torch.float32, 80, True, None, 0.0),
                                      (torch.float16, 128, True, None, 0.0)]:
        L = S = 2048
        q, k, v = E(2, 8, L, d, dtype=dtype), E(2, 4, S, d, dtype=dtype), E(2, 4, S, d, dtype=dtype)
        m = None
        if mask == "bool":
            m = E(L, S, dtype=torch.bool).expand(2, 8, L, S)
        elif mask == "add":
            m = E(L, S, dtype=dtype).expand(2, 8, L, S)

        def call(q=q, k=k, v=v, m=m, causal=causal, p=p, mask=mask):
            o, lse = attention_ops.launch_attention_fwd(q, k, v, m, causal, None, p, 123)
            for exact in (False, True):  # FlashAttention-2's delta, and the one the dQ kernel forms
                attention_ops.launch_attention_bwd(torch.empty_like(o), q, k, v, m, o, lse, causal, None, p, 123,
                                                   mask_grad=mask == "add", exact_delta=exact)
        yield "attention", f"{dtype} d{d} causal={causal} mask={mask} p={p}", call
    for dtype, d, L in [(torch.float16, 64, 1), (torch.float32, 128, 16)]:
        qd, kd = E(2, 8, L, d, dtype=dtype), E(2, 2, 4096, d, dtype=dtype)
        yield "attention", f"{dtype} d{d} decode L={L}", \
            lambda: attention_ops.launch_attention_fwd(qd, kd, kd, None, False)  # the split-key forward


def main(argv: list[str]) -> int:
    report = "--report" in argv
    names = [a for a in argv if a != "--report"]
    # Generators, read lazily: each case's call takes its loop's values at the time it runs.
    if report:
        cases = (c for c in report_cases() if not names or c[0] in names)
    else:
        cases = (c for family in (names or ["matmul", "softmax", "norm", "attention"])
                 for c in globals()[f"{family}_cases"]())
    rows = []
    for op, case, call in cases:
        for row in run_case(op, case, call):
            print(json.dumps(row), flush=True)
            rows.append(row)
    failed = [r for r in rows if not r["ok"]]
    print(f"sm90 compile (triton {triton.__version__}): {len(rows) - len(failed)} of {len(rows)} kernels compile "
          f"and fit", file=sys.stderr)
    return 0 if report else 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
