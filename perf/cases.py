"""What perf.bench measures: per op, the shapes of each preset, the inputs, the
providers (tritonops and its torch twins) and the work (FLOPs or bytes) of one call.

Nothing here imports tritonops or triton at import time: perf.bench chooses the
interpreter (TRITON_INTERPRET=1) first, then `OpSpec.load()` imports an op's module.

Metrics
    matmul, linear   TFLOP/s, 2*M*N*K forward, backward 2x forward (dA and dB).
    attention        TFLOP/s, 4*B*H*L*S*E forward (QK^T and PV), halved when causal,
                     backward 2.5x forward.
    attention_decode GB/s of q, k, v read and o written (one query row, forward only).
    softmax, norms   GB/s of the fewest bytes an implementation must move: forward reads
                     x and writes y; backward reads y (softmax) or x (norms) and dy and
                     writes dx; weight and bias are read once and their grads written once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .schema import BASE_PROVIDERS, SDPA_BACKENDS

MODES = ("fwd", "bwd", "fwd_bwd")
PRESETS = ("smoke", "quick", "full")
PRESET_DTYPES = {"smoke": ("bfloat16",), "quick": ("bfloat16",), "full": ("float16", "bfloat16")}

LLM_NK = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
LLM_M = (1, 16, 64, 128, 1024, 4096, 8192)  # 1-64: decode shapes (split K)
SQUARE_8192 = {"M": 8192, "N": 8192, "K": 8192}  # the problem the matmul ceiling is measured on
ROW_COLS_FULL = tuple(256 << i for i in range(11))  # 256 .. 262144
QUICK_COLS = (2048, 32768, 65536)  # a few rows per program / the whole row in one pass / a loop over it
DECODE_KEYS = (8192, 32768)  # keys a single query row attends to in the decode benchmark
ATTN_TOKENS = 16384  # batch x sequence kept constant, so work grows only linearly with L
ATTN_WIDTH = 2048    # heads x head dim


def _row_shapes(rows: int, cols) -> list[dict]:
    return [{"rows": rows, "cols": c} for c in cols]


def _attn_shapes(head_dims, lengths, causal=(False, True), tokens=ATTN_TOKENS, width=ATTN_WIDTH) -> list[dict]:
    return [{"B": max(1, tokens // L), "H": max(1, width // E), "L": L, "S": L, "E": E, "causal": int(c)}
            for E in head_dims for c in causal for L in lengths]


@dataclass
class OpSpec:
    """One op to benchmark.

    module, attr:   where the tritonops function lives (imported lazily by `load`).
    metric:         "TFLOP/s" or "GB/s".
    x, group:       the shape dim on the plots' x axis, and the dims that make separate
                    curves (one subplot per distinct value of `group`).
    shapes:         preset -> list of {dim: size}.
    inputs:         (shape, dtype, device) -> list of tensors (all positional args).
    ours:           (fn, shape) -> callable(*inputs), fn being the imported tritonops function.
    torch_fn:       shape -> callable(*inputs), the eager torch twin.
    work:           (shape, dtype, mode) -> FLOPs or bytes of one call.
    params:         fixed arguments, recorded with each case.
    """

    name: str
    module: str
    attr: str
    metric: str
    x: str
    group: tuple[str, ...]
    shapes: dict[str, list[dict]]
    inputs: Callable[[dict, torch.dtype, torch.device], list[torch.Tensor]]
    ours: Callable[[Callable, dict], Callable]
    torch_fn: Callable[[dict], Callable]
    work: Callable[[dict, torch.dtype, str], float]
    params: dict = field(default_factory=dict)
    extra_providers: tuple[str, ...] = ()
    grad_args: int | None = None  # how many leading inputs take gradients (None: all)
    modes: tuple[str, ...] = MODES  # the modes it is measured in (of those asked for)

    def load(self) -> Callable:
        """The tritonops function; raises (ImportError, AttributeError) when it is not there."""
        return getattr(importlib.import_module(self.module), self.attr)

    def providers(self) -> tuple[str, ...]:
        return BASE_PROVIDERS + self.extra_providers

    def provider_fn(self, provider: str, shape: dict, ours: Callable | None) -> Callable:
        """The callable(*inputs) a provider runs. tritonops-default differs from tritonops only
        by the tuners' mode, which perf.bench sets around the case."""
        if provider in ("tritonops", "tritonops-default"):
            if ours is None:
                raise RuntimeError(f"tritonops.{self.name} did not import")
            return self.ours(ours, shape)
        if provider == "torch":
            return self.torch_fn(shape)
        if provider == "torch.compile":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no fallback to eager
            return torch.compile(self.torch_fn(shape), dynamic=False)
        if provider in SDPA_BACKENDS:
            return sdpa_backend_fn(SDPA_BACKENDS[provider], shape)
        raise ValueError(f"unknown provider {provider!r} for {self.name}")


# --------------------------------------------------------------------------- work


def matmul_flops(shape: dict, dtype=None, mode: str = "fwd") -> float:
    f = 2.0 * shape["M"] * shape["N"] * shape["K"]
    return f if mode == "fwd" else 2.0 * f


def attention_flops(shape: dict, dtype=None, mode: str = "fwd") -> float:
    f = 4.0 * shape["B"] * shape["H"] * shape["L"] * shape["S"] * shape["E"]
    if shape.get("causal"):
        f /= 2.0
    return f if mode == "fwd" else 2.5 * f


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype.itemsize


def softmax_bytes(shape: dict, dtype, mode: str = "fwd") -> float:
    n = shape["rows"] * shape["cols"]
    return float((2 * n if mode == "fwd" else 3 * n) * _itemsize(dtype))


def _norm_bytes(params_per_col: int):
    def work(shape: dict, dtype, mode: str = "fwd") -> float:
        n, c = shape["rows"] * shape["cols"], shape["cols"]
        if mode == "fwd":  # x, y; weight (+ bias) read once
            count = 2 * n + params_per_col * c
        else:  # x, dy, dx; weight read once; dweight (+ dbias) written once
            count = 3 * n + c + params_per_col * c
        return float(count * _itemsize(dtype))
    return work


layer_norm_bytes = _norm_bytes(2)
rms_norm_bytes = _norm_bytes(1)


def attention_decode_bytes(shape: dict, dtype, mode: str = "fwd") -> float:
    """Reads q, k and v, writes o: decoding is bound by reading the keys and values."""
    q = shape["B"] * shape["H"] * shape["L"] * shape["E"]
    kv = shape["B"] * shape["HKV"] * shape["S"] * shape["E"]
    return float((2 * q + 2 * kv) * _itemsize(dtype))


# --------------------------------------------------------------------------- inputs


def _randn(shape, dtype, device, scale: float = 1.0):
    t = torch.randn(shape, dtype=torch.float32, device=device)
    if scale != 1.0:
        t = t * scale
    return t.to(dtype)


def _matmul_inputs(shape, dtype, device):
    M, N, K = shape["M"], shape["N"], shape["K"]
    return [_randn((M, K), dtype, device), _randn((K, N), dtype, device, K ** -0.5)]


def _linear_inputs(shape, dtype, device):
    M, N, K = shape["M"], shape["N"], shape["K"]
    return [_randn((M, K), dtype, device), _randn((N, K), dtype, device, K ** -0.5), _randn((N,), dtype, device)]


def _rows_inputs(shape, dtype, device):
    return [_randn((shape["rows"], shape["cols"]), dtype, device)]


def _layer_norm_inputs(shape, dtype, device):
    c = shape["cols"]
    return [_randn((shape["rows"], c), dtype, device), 1.0 + _randn((c,), dtype, device, 0.1),
            _randn((c,), dtype, device, 0.1)]


def _rms_norm_inputs(shape, dtype, device):
    c = shape["cols"]
    return [_randn((shape["rows"], c), dtype, device), 1.0 + _randn((c,), dtype, device, 0.1)]


def _attention_inputs(shape, dtype, device):
    B, H, L, S, E = (shape[k] for k in ("B", "H", "L", "S", "E"))
    hkv = shape.get("HKV", H)  # fewer key / value heads: grouped-query attention
    return [_randn((B, H, L, E), dtype, device), _randn((B, hkv, S, E), dtype, device),
            _randn((B, hkv, S, E), dtype, device)]


# --------------------------------------------------------------------------- providers


def sdpa_backend_fn(backend_name: str, shape: dict) -> Callable:
    """F.scaled_dot_product_attention restricted to one backend (raises if that backend
    cannot run the case, or does not exist in this torch)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise RuntimeError(f"this torch ({torch.__version__}) has no SDPBackend.{backend_name}")
    kwargs = _sdpa_kwargs(shape)

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return run


def _sdpa_kwargs(shape: dict) -> dict:
    """is_causal, and enable_gqa where there are fewer key / value heads than query heads."""
    gqa = {"enable_gqa": True} if shape.get("HKV", shape["H"]) != shape["H"] else {}
    return {"is_causal": bool(shape["causal"]), **gqa}


def _attention_torch(shape):
    kwargs = _sdpa_kwargs(shape)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs)


def _attention_ours(fn, shape):
    kwargs = _sdpa_kwargs(shape)
    return lambda q, k, v: fn(q, k, v, **kwargs)


def _rms_norm_torch(shape):
    cols = (shape["cols"],)
    if hasattr(F, "rms_norm"):
        return lambda x, w: F.rms_norm(x, cols, w)

    def rms(x, w):  # torch < 2.4
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)).to(x.dtype) * w
    return rms


OPS: dict[str, OpSpec] = {}


def _add(spec: OpSpec) -> None:
    OPS[spec.name] = spec


_add(OpSpec(
    "matmul", "tritonops.ops.matmul", "matmul", "TFLOP/s", x="M", group=("N", "K"),
    shapes={"smoke": [{"M": m, "N": 48, "K": 32} for m in (16, 64)],
            "quick": [{"M": m, "N": 4096, "K": 4096} for m in (1, 16, 64, 1024, 8192)] + [SQUARE_8192],
            "full": [{"M": m, "N": n, "K": k} for n, k in LLM_NK for m in LLM_M] + [SQUARE_8192]},
    inputs=_matmul_inputs, ours=lambda fn, s: fn, torch_fn=lambda s: (lambda a, b: torch.matmul(a, b)),
    work=matmul_flops))

_add(OpSpec(
    "linear", "tritonops.ops.matmul", "linear", "TFLOP/s", x="M", group=("N", "K"),
    shapes={"smoke": [{"M": m, "N": 40, "K": 48} for m in (16, 64)],
            "quick": [{"M": m, "N": 14336, "K": 4096} for m in (16, 64, 4096)],
            "full": [{"M": m, "N": n, "K": k} for n, k in LLM_NK for m in LLM_M]},
    inputs=_linear_inputs,
    ours=lambda fn, s: (lambda x, w, b: fn(x, w, b, activation="gelu")),
    torch_fn=lambda s: (lambda x, w, b: F.gelu(F.linear(x, w, b))),
    work=matmul_flops, params={"bias": True, "activation": "gelu"}))

_add(OpSpec(
    "softmax", "tritonops.ops.softmax", "softmax", "GB/s", x="cols", group=("rows",),
    shapes={"smoke": _row_shapes(16, (64, 300)), "quick": _row_shapes(4096, QUICK_COLS),
            "full": _row_shapes(4096, ROW_COLS_FULL)},
    inputs=_rows_inputs, ours=lambda fn, s: (lambda x: fn(x, -1)),
    torch_fn=lambda s: (lambda x: torch.softmax(x, -1)), work=softmax_bytes, params={"dim": -1}))

_add(OpSpec(
    "log_softmax", "tritonops.ops.softmax", "log_softmax", "GB/s", x="cols", group=("rows",),
    shapes={"smoke": _row_shapes(16, (64, 300)), "quick": [],  # quick: softmax stands for the family
            "full": _row_shapes(4096, ROW_COLS_FULL)},
    inputs=_rows_inputs, ours=lambda fn, s: (lambda x: fn(x, -1)),
    torch_fn=lambda s: (lambda x: torch.log_softmax(x, -1)), work=softmax_bytes, params={"dim": -1}))

_add(OpSpec(
    "layer_norm", "tritonops.ops.norm", "layer_norm", "GB/s", x="cols", group=("rows",),
    shapes={"smoke": _row_shapes(16, (64, 300)), "quick": _row_shapes(4096, QUICK_COLS),
            "full": _row_shapes(4096, ROW_COLS_FULL)},
    inputs=_layer_norm_inputs,
    ours=lambda fn, s: (lambda x, w, b: fn(x, (s["cols"],), w, b)),
    torch_fn=lambda s: (lambda x, w, b: F.layer_norm(x, (s["cols"],), w, b)),
    work=layer_norm_bytes, params={"weight": True, "bias": True, "eps": 1e-5}))

_add(OpSpec(
    "rms_norm", "tritonops.ops.norm", "rms_norm", "GB/s", x="cols", group=("rows",),
    shapes={"smoke": _row_shapes(16, (64, 300)), "quick": _row_shapes(4096, QUICK_COLS),
            "full": _row_shapes(4096, ROW_COLS_FULL)},
    inputs=_rms_norm_inputs,
    ours=lambda fn, s: (lambda x, w: fn(x, (s["cols"],), w)),
    torch_fn=_rms_norm_torch, work=rms_norm_bytes, params={"weight": True, "eps": None}))

_add(OpSpec(
    "attention", "tritonops.ops.attention", "attention", "TFLOP/s", x="L", group=("E", "causal"),
    shapes={"smoke": _attn_shapes((32,), (32, 64), tokens=64, width=64),
            "quick": _attn_shapes((128,), (1024, 4096)),
            "full": _attn_shapes((64, 128), (512, 1024, 2048, 4096, 8192, 16384))},
    inputs=_attention_inputs, ours=_attention_ours, torch_fn=_attention_torch, work=attention_flops,
    extra_providers=tuple(SDPA_BACKENDS)))

_add(OpSpec(
    "attention_decode", "tritonops.ops.attention", "attention", "GB/s", x="S", group=("B", "E"),
    shapes={"smoke": [{"B": 1, "H": 4, "HKV": 2, "L": 1, "S": s, "E": 32, "causal": 0} for s in (64, 300)],
            "quick": [{"B": 1, "H": 32, "HKV": 8, "L": 1, "S": s, "E": 128, "causal": 0} for s in DECODE_KEYS],
            "full": [{"B": b, "H": 32, "HKV": 8, "L": 1, "S": s, "E": 128, "causal": 0}
                     for b in (1, 8) for s in DECODE_KEYS]},
    inputs=_attention_inputs, ours=_attention_ours, torch_fn=_attention_torch, work=attention_decode_bytes,
    params={"enable_gqa": True}, extra_providers=tuple(SDPA_BACKENDS), modes=("fwd",)))


# relative cost of one case per provider, for sharing a time budget between ops: compiling
# (torch.compile) and tuning (tritonops) cost more than the timing itself
PROVIDER_COST = {"tritonops": 2.0, "torch.compile": 3.0}


def cost(spec: OpSpec, shapes: list, modes, providers) -> float:
    return len(shapes) * len(op_modes(spec, modes)) * sum(PROVIDER_COST.get(p, 1.0) for p in providers)


def op_modes(spec: OpSpec, modes) -> list[str]:
    """The modes of `modes` an op is measured in."""
    return [m for m in modes if m in spec.modes]


def op_names() -> list[str]:
    return list(OPS)


def metric_value(spec: OpSpec, shape: dict, dtype, mode: str, ms: float) -> float:
    """TFLOP/s or GB/s of one call taking `ms` milliseconds (fwd_bwd: the work of both)."""
    if mode == "fwd_bwd":
        work = spec.work(shape, dtype, "fwd") + spec.work(shape, dtype, "bwd")
    else:
        work = spec.work(shape, dtype, mode)
    return work / (ms * 1e-3) / (1e12 if spec.metric == "TFLOP/s" else 1e9)


def grad_inputs(spec: OpSpec, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return inputs if spec.grad_args is None else inputs[: spec.grad_args]


def describe(spec: OpSpec) -> dict[str, Any]:
    """What perf.report needs to know of an op, stored in the results."""
    return {"metric": spec.metric, "x": spec.x, "group": list(spec.group), "params": spec.params,
            "providers": list(spec.providers())}

