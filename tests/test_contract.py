"""The contract every public op keeps, checked over one table (OPS), a row per op:

- fallback: CPU tensors with the interpreter off run torch's own function, with exactly one
  RuntimeWarning per op, and give torch's result;
- opcheck: torch.library.opcheck of each custom op, forward and backward;
- compile: torch.compile(fullgraph=True) gives exactly eager's outputs and gradients;
- spaces: sampled configs of each Tuner's space, through the launchers' `config=`, give the
  default config's results (autotune's own agreement check);
- command: `autotune tune <op>` stores winners that `show --json` lists and the op then selects.

Behaviour only one op has stays in that op's file.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch._library.custom_ops import CustomOpDef

import autotune
import tritonops
from autotune import Config, cli
from autotune.cache import decode_key
from autotune.registry import REGISTRY, TUNERS
from autotune.tuner import default_check
from tritonops import reference, runtime
from tritonops.ops import attention as attn_ops
from tritonops.ops import matmul as matmul_ops
from tritonops.ops import norm as norm_ops
from tritonops.ops import softmax as softmax_ops
from tritonops.tuning import attention as attn_tuning
from tritonops.tuning import matmul as matmul_tuning
from tritonops.tuning import norm as norm_tuning
from tritonops.tuning import softmax as softmax_tuning

from .utils import assert_compiles_like_eager

F64 = torch.float64


def randn(*shape, dtype=torch.float32, device="cpu", grad=False):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)


def _bits(flags):
    """(True, False, True) -> "101", for test ids."""
    return "".join("1" if f else "0" for f in flags)


# --------------------------------------------------------------------------- the table's columns


@dataclass(frozen=True)
class Call:
    """One call of the public op on small awkward inputs.

    inputs(device): fresh inputs, float tensors requiring grad (a bool mask does not);
    apply(f, *inputs): calls f, the row's function or its torch twin, on them;
    fallback: False where apply does not call f (the custom op called directly, with a
    seed): compiled, but with no reference fallback to compare."""

    id: str
    inputs: Callable[[torch.device], tuple]
    apply: Callable
    fallback: bool = True


@dataclass(frozen=True)
class Opcheck:
    """torch.library.opcheck(op, args(device))."""

    id: str
    op: CustomOpDef
    args: Callable[[torch.device], tuple]


@dataclass(frozen=True)
class Spaces:
    """build(device, monkeypatch) -> [(tuner, key, launch, musts)]: launch(config) runs the
    tuner's kernel through the launcher's `config=` on float64 inputs (config None: the
    launcher selects, for the key it computes itself); musts are predicates on configs,
    each met by one sampled config where the space has such a config."""

    id: str
    build: Callable


@dataclass(frozen=True)
class Tune:
    """`autotune tune <op> --shapes <shape> --dtype float32` stores `entries` (kernel -> the
    keys `show --json` lists); call(device) runs the op forward and backward on that shape."""

    shape: str
    entries: dict[str, list[str]]
    call: Callable[[torch.device], None]


@dataclass(frozen=True)
class Op:
    name: str  # tritonops.<name>, and the op's name for `autotune tune`
    fn: Callable  # the public function
    twin: Callable  # torch's, with the public function's signature
    custom_ops: tuple[CustomOpDef, ...]
    calls: list[Call]
    opchecks: list[Opcheck]
    tuners: tuple  # the Tuners whose configs the op's kernels launch with
    spaces: list[Spaces]
    tune: Tune


# --------------------------------------------------------------------------- matmul, linear


def _matmul_call(id, sa, sb):
    return Call(id, lambda d: (randn(*sa, device=d, grad=True), randn(*sb, device=d, grad=True)),
                lambda f, a, b: f(a, b))


def _opcheck_matmul(sa, sb):
    return Opcheck(f"fwd-{list(sa)}x{list(sb)}", matmul_ops.matmul_op,
                   lambda d: (randn(*sa, device=d, grad=True), randn(*sb, device=d, grad=True)))


def _opcheck_matmul_backward(sa, sb, need):
    def args(d):
        a, b = randn(*sa, device=d), randn(*sb, device=d)
        return (torch.randn_like(torch.matmul(a, b)), a, b, *need)
    return Opcheck(f"bwd-{list(sa)}x{list(sb)}-need{_bits(need)}",
                   matmul_ops.matmul_backward_op, args)


def _opcheck_linear(activation, with_bias):
    def args(d):
        x, w = randn(2, 3, 7, device=d, grad=True), randn(5, 7, device=d, grad=True)
        b = randn(5, device=d, grad=True) if with_bias else None
        return (x, w, b, activation, activation is not None)
    return Opcheck(f"fwd-{activation}-{'bias' if with_bias else 'nobias'}", matmul_ops.linear_op, args)


def _opcheck_linear_backward(need):
    def args(d):
        return (randn(3, 5, device=d), randn(3, 7, device=d), randn(5, 7, device=d), randn(3, 5, device=d),
                "silu", *need)
    return Opcheck(f"bwd-silu-need{_bits(need)}", matmul_ops.linear_backward_op, args)


def _matmul_spaces(id, a_t=False, b_t=False, epilogue=False):
    """A (37, 29) @ (29, 53) problem, operands row-major or transposed, with the epilogue
    (bias, gelu, the pre-activation stored) for linear."""
    M, N, K = 37, 53, 29

    def build(device, monkeypatch):
        a = randn(K, M, dtype=F64, device=device).t() if a_t else randn(M, K, dtype=F64, device=device)
        b = randn(N, K, dtype=F64, device=device).t() if b_t else randn(K, N, dtype=F64, device=device)
        a, b = a.unsqueeze(0), b.unsqueeze(0)
        bias = randn(N, dtype=F64, device=device) if epilogue else None
        act = "gelu" if epilogue else None

        def launch(config):
            c, z = matmul_ops.launch_matmul(a, b, bias, act, store_preact=epilogue, config=config)
            return [c, z] if epilogue else [c]

        key = matmul_tuning.matmul_key(a, b, epilogue)
        musts = [lambda c: c["BLOCK_K"] < K, lambda c: c["BLOCK_M"] < M and c["BLOCK_N"] < N]
        return [(matmul_tuning.MATMUL_TUNER, key, launch, musts)]

    return Spaces(id, build)


def _tuned_matmul(device):
    a, b = randn(9, 20, device=device, grad=True), randn(20, 17, device=device, grad=True)
    tritonops.matmul(a, b).backward(randn(9, 17, device=device))


def _tuned_linear(device):
    x, w, b = (randn(*s, device=device, grad=True) for s in ((9, 20), (17, 20), (17,)))
    tritonops.linear(x, w, b, activation="gelu").backward(randn(9, 17, device=device))
    tritonops.linear(x, w).backward(randn(9, 17, device=device))  # no epilogue: the other forward key


MATMUL = Op(
    "matmul", tritonops.matmul, torch.matmul, (matmul_ops.matmul_op, matmul_ops.matmul_backward_op),
    calls=[_matmul_call("batch_folded", (2, 5, 7), (7, 3)), _matmul_call("vector_x_batched", (7,), (2, 7, 3)),
           _matmul_call("broadcast_batch", (2, 1, 5, 7), (3, 7, 4))],
    opchecks=[*(_opcheck_matmul(sa, sb) for sa, sb in [((5, 7), (7, 3)), ((2, 5, 7), (7, 3)), ((7,), (2, 7, 3)),
                                                       ((2, 1, 5, 7), (3, 7, 4))]),
              *(_opcheck_matmul_backward((2, 5, 7), (7, 3), need) for need in [(True, True), (True, False),
                                                                              (False, True)]),
              _opcheck_matmul_backward((7,), (2, 7, 3), (True, True))],
    tuners=(matmul_tuning.MATMUL_TUNER,),
    spaces=[_matmul_spaces("row_major"), _matmul_spaces("transposed", a_t=True, b_t=True)],
    tune=Tune("9x17x20", {"matmul": ['[16, 17, 20, "float32", true, false, false]',
                                     '[16, 20, 17, "float32", true, true, false]',
                                     '[32, 17, 9, "float32", false, false, false]']}, _tuned_matmul),
)


def _linear_twin(input, weight, bias=None, activation=None):
    return reference.linear(input, weight, bias, activation_name=activation)


LINEAR = Op(
    "linear", tritonops.linear, _linear_twin, (matmul_ops.linear_op, matmul_ops.linear_backward_op),
    calls=[Call("bias_gelu", lambda d: (randn(2, 5, 7, device=d, grad=True), randn(11, 7, device=d, grad=True),
                                        randn(11, device=d, grad=True)),
                lambda f, x, w, b: f(x, w, b, activation="gelu")),
           Call("no_bias", lambda d: (randn(3, 7, device=d, grad=True), randn(5, 7, device=d, grad=True)),
                lambda f, x, w: f(x, w))],
    opchecks=[*(_opcheck_linear(a, b) for a in (None, "gelu") for b in (True, False)),
              *(_opcheck_linear_backward(n) for n in [(True, False, False), (False, True, True), (False, False, True),
                                                      (True, True, True)])],
    tuners=(matmul_tuning.MATMUL_TUNER,),
    spaces=[_matmul_spaces("bias_gelu", epilogue=True)],
    tune=Tune("9x17x20", {"matmul": ['[16, 17, 20, "float32", true, true, false]',
                                     '[16, 17, 20, "float32", true, true, true]',
                                     '[16, 20, 17, "float32", true, false, false]',
                                     '[32, 20, 9, "float32", false, false, false]']}, _tuned_linear),
)


# --------------------------------------------------------------------------- softmax, log_softmax


def _softmax_opchecks(op, log):
    def fwd(shape, dim, dtype, layout):
        def args(d):
            x = randn(*shape, dtype=torch.float16 if dtype else torch.float32, device=d)
            if layout == "transposed":
                x = x.t()
            elif layout == "permuted":  # outer dims no single stride walks: the op works on a copy
                x = x.permute(2, 0, 3, 1)
            return (x.requires_grad_(), dim, dtype)
        return Opcheck(f"fwd-{list(shape)}-dim{dim}-{dtype}-{layout}", op, args)

    def bwd_3d(d):
        y = op(randn(4, 7, 5, device=d), 1, None)
        return (randn(4, 7, 5, device=d), y, 1, log, torch.float32)

    def bwd_transposed(d):  # a transposed gradient and output, the input in float16
        y = op(randn(4, 7, 5, device=d), 1, None)
        return (randn(7, 5, device=d).t(), y[0].t(), -1, log, torch.float16)

    return [*(fwd(*c) for c in [((5, 7), -1, None, None), ((4, 7, 5), 1, None, None), ((6, 9), 0, None, "transposed"),
                                ((3, 4, 5, 6), 1, None, "permuted"), ((5, 7), 1, torch.float32, None),
                                ((), 0, None, None), ((0, 3), 1, None, None)]),
            Opcheck("bwd-3d", softmax_ops.softmax_backward_op, bwd_3d),
            Opcheck("bwd-transposed-half", softmax_ops.softmax_backward_op, bwd_transposed)]


def _softmax_spaces(log):
    """Both spaces (one-pass and looped), over a contiguous and a strided reduced dim."""
    def case(shape, dim):
        def build(device, monkeypatch):
            x, dy = randn(*shape, dtype=F64, device=device) * 3, randn(*shape, dtype=F64, device=device)
            n = x.shape[dim]
            key = softmax_tuning.softmax_key(n, x.numel() // n, x.dtype, x.stride(dim) != 1, log)
            y = softmax_ops.launch_softmax_fwd(x, dim, log, config=softmax_tuning.SOFTMAX_TUNER.default(key))
            looped = [lambda c: c["BLOCK_N"] < n]
            return [(softmax_tuning.SOFTMAX_TUNER, key,
                     lambda c: softmax_ops.launch_softmax_fwd(x, dim, log, config=c), looped),
                    (softmax_tuning.SOFTMAX_BWD_TUNER, key,
                     lambda c: softmax_ops.launch_softmax_bwd(y, dy, dim, log, x.dtype, config=c), looped)]
        return Spaces(f"{list(shape)}-dim{dim}", build)
    return [case((5, 100), 1), case((2, 100, 3), 1)]


def _tuned_rows(fn):
    def call(device):
        x = randn(8, 40, device=device, grad=True)
        fn(x, -1).backward(randn(8, 40, device=device))
    return call


SOFTMAX_TUNERS = (softmax_tuning.SOFTMAX_TUNER, softmax_tuning.SOFTMAX_BWD_TUNER)

SOFTMAX = Op(
    "softmax", tritonops.softmax, F.softmax, (softmax_ops.softmax_op, softmax_ops.softmax_backward_op),
    calls=[Call("middle_dim", lambda d: (randn(2, 6, 5, device=d, grad=True),), lambda f, x: f(x, 1)),
           Call("first_dim", lambda d: (randn(3, 7, device=d, grad=True),), lambda f, x: f(x, 0))],
    opchecks=_softmax_opchecks(softmax_ops.softmax_op, False),
    tuners=SOFTMAX_TUNERS,
    spaces=_softmax_spaces(False),
    tune=Tune("8x40", {"softmax": ['[64, 8, "float32", false, false]'],
                       "softmax_bwd": ['[64, 8, "float32", false, false]']}, _tuned_rows(tritonops.softmax)),
)

LOG_SOFTMAX = Op(
    "log_softmax", tritonops.log_softmax, F.log_softmax,
    (softmax_ops.log_softmax_op, softmax_ops.softmax_backward_op),
    calls=[Call("last_dim", lambda d: (randn(2, 6, 5, device=d, grad=True),), lambda f, x: f(x, -1)),
           Call("transposed_to_float64", lambda d: (randn(2, 6, 5, device=d, grad=True),),
                lambda f, x: f(x.transpose(1, 2), -1, dtype=torch.float64))],
    opchecks=_softmax_opchecks(softmax_ops.log_softmax_op, True),
    tuners=SOFTMAX_TUNERS,
    spaces=_softmax_spaces(True),
    tune=Tune("8x40", {"softmax": ['[64, 8, "float32", false, true]'],
                       "softmax_bwd": ['[64, 8, "float32", false, true]']}, _tuned_rows(tritonops.log_softmax)),
)


# --------------------------------------------------------------------------- layer_norm, rms_norm

AFFINE = ["weight_bias", "weight", "bias", "none"]


def _norm_args(shape, norm_shape, affine, device, grad=False):
    x = randn(*shape, device=device, grad=grad)
    w = randn(*norm_shape, device=device, grad=grad) if affine in ("weight_bias", "weight") else None
    b = randn(*norm_shape, device=device, grad=grad) if affine in ("weight_bias", "bias") else None
    return x, w, b


def _opcheck_layer_norm(shape, norm_shape, affine):
    def args(d):
        x, w, b = _norm_args(shape, norm_shape, affine, d, grad=True)
        return (x, list(norm_shape), w, b, 1e-5)
    return Opcheck(f"fwd-{list(shape)}-{affine}", norm_ops.layer_norm_op, args)


def _opcheck_rms_norm(shape, norm_shape, with_weight):
    def args(d):
        x, w, _ = _norm_args(shape, norm_shape, "weight" if with_weight else "none", d, grad=True)
        return (x, list(norm_shape), w, 1e-6)
    return Opcheck(f"fwd-{list(shape)}-{'weight' if with_weight else 'none'}", norm_ops.rms_norm_op, args)


def _opcheck_layer_norm_backward(need, x_dtype=torch.float32):
    """x in x_dtype, weight and bias float32 (torch's mixed dtype for a 16-bit x)."""
    def args(d):
        x, w, b = _norm_args((2, 3, 20), (3, 20), "weight_bias", d)
        x = x.to(x_dtype)
        _, mean, rstd = norm_ops.layer_norm_op(x, [3, 20], w, b, 1e-5)
        return (randn(2, 3, 20, device=d).to(x_dtype), x, [3, 20], w, mean, rstd, *need, w.dtype)
    return Opcheck(f"bwd-need{_bits(need)}-{x_dtype}", norm_ops.layer_norm_backward_op, args)


def _opcheck_rms_norm_backward(with_weight, need, x_dtype=torch.float32):
    """x in x_dtype, the weight float32."""
    def args(d):
        x, w, _ = _norm_args((2, 3, 20), (20,), "weight" if with_weight else "none", d)
        x = x.to(x_dtype)
        _, rstd = norm_ops.rms_norm_op(x, [20], w, 1e-6)
        return (randn(2, 3, 20, device=d).to(x_dtype), x, [20], w, rstd, *need)
    return Opcheck(f"bwd-{'weight' if with_weight else 'none'}-need{_bits(need)}-{x_dtype}",
                   norm_ops.rms_norm_backward_op, args)


def _few_sms(monkeypatch, sms):
    """Pretend the device has `sms` SMs, so each backward program loops over several row blocks."""
    props = dict(runtime.device_properties(), multiprocessor_count=sms)
    monkeypatch.setattr(runtime, "device_properties", lambda *a: props)


def _norm_spaces(rms):
    """Both spaces (one-pass and looped), PROGRAMS_PER_SM over 2 SMs: backward programs loop
    over row blocks."""
    def build(device, monkeypatch):
        _few_sms(monkeypatch, 2)
        x, w, b = _norm_args((9, 100), (100,), "weight_bias", device)
        x, w, b = x.double() * 2 + 0.5, w.double(), None if rms else b.double()
        dy = randn(9, 100, dtype=F64, device=device)
        fwd_key = norm_tuning.norm_key(100, 9, x.dtype, rms, True)
        bwd_key = norm_tuning.norm_bwd_key(100, 9, x.dtype, rms, True, True)
        _, mean, rstd = norm_ops.launch_norm_fwd(x, w, b, 1e-5, rms, config=norm_tuning.NORM_TUNER.default(fwd_key))
        looped = [lambda c: c["BLOCK_N"] < 100]

        def fwd(config):
            return [t for t in norm_ops.launch_norm_fwd(x, w, b, 1e-5, rms, config=config) if t is not None]

        def bwd(config):
            return [t for t in norm_ops.launch_norm_bwd(dy, x, w, mean, rstd, True, not rms, config=config)
                    if t is not None]

        return [(norm_tuning.NORM_TUNER, fwd_key, fwd, looped), (norm_tuning.NORM_BWD_TUNER, bwd_key, bwd, looped)]

    return [Spaces("9x100", build)]


def _tuned_norm(rms):
    def call(device):
        x, w, b = _norm_args((8, 40), (40,), "weight_bias", device, grad=True)
        out = tritonops.rms_norm(x, (40,), w) if rms else tritonops.layer_norm(x, (40,), w, b)
        out.backward(randn(8, 40, device=device))
    return call


NORM_TUNERS = (norm_tuning.NORM_TUNER, norm_tuning.NORM_BWD_TUNER)

LAYER_NORM = Op(
    "layer_norm", tritonops.layer_norm, F.layer_norm, (norm_ops.layer_norm_op, norm_ops.layer_norm_backward_op),
    calls=[Call("weight_bias", lambda d: _norm_args((3, 5, 19), (19,), "weight_bias", d, grad=True),
                lambda f, x, w, b: f(x, (19,), w, b)),
           Call("two_dims_eps", lambda d: _norm_args((3, 5, 19), (5, 19), "none", d, grad=True)[:1],
                lambda f, x: f(x, (5, 19), eps=1e-3))],
    opchecks=[*(_opcheck_layer_norm(s, n, a) for s, n in [((7, 33), (33,)), ((2, 3, 20), (3, 20)), ((0, 8), (8,))]
                for a in AFFINE),
              *(_opcheck_layer_norm_backward(n) for n in [(True, True, True), (True, False, False),
                                                          (False, True, False)]),
              _opcheck_layer_norm_backward((True, True, True), torch.bfloat16)],
    tuners=NORM_TUNERS,
    spaces=_norm_spaces(False),
    tune=Tune("8x40", {"norm": ['[64, 8, "float32", false, true]'],
                       "norm_bwd": ['[64, 8, "float32", false, true, true]']}, _tuned_norm(False)),
)

RMS_NORM = Op(
    "rms_norm", tritonops.rms_norm, F.rms_norm, (norm_ops.rms_norm_op, norm_ops.rms_norm_backward_op),
    calls=[Call("weight_default_eps", lambda d: _norm_args((3, 5, 19), (19,), "weight", d, grad=True)[:2],
                lambda f, x, w: f(x, (19,), w)),
           Call("size_shape_eps", lambda d: _norm_args((3, 5, 19), (19,), "none", d, grad=True)[:1],
                lambda f, x: f(x, x.shape[-1:], eps=1e-3))],
    opchecks=[*(_opcheck_rms_norm(s, n, w) for s, n in [((7, 33), (33,)), ((2, 3, 20), (3, 20))]
                for w in (True, False)),
              _opcheck_rms_norm_backward(False, (True, False)), _opcheck_rms_norm_backward(True, (True, True)),
              _opcheck_rms_norm_backward(True, (False, True)),
              _opcheck_rms_norm_backward(True, (True, True), torch.bfloat16)],
    tuners=NORM_TUNERS,
    spaces=_norm_spaces(True),
    tune=Tune("8x40", {"norm": ['[64, 8, "float32", true, true]'],
                       "norm_bwd": ['[64, 8, "float32", true, true, true]']}, _tuned_norm(True)),
)


# --------------------------------------------------------------------------- attention


def _qkv(B, H, L, S, E, EV=None, dtype=torch.float32, device="cpu", HK=None, grad=False):
    HK = HK or H
    return (randn(B, H, L, E, dtype=dtype, device=device, grad=grad),
            randn(B, HK, S, E, dtype=dtype, device=device, grad=grad),
            randn(B, HK, S, EV or E, dtype=dtype, device=device, grad=grad))


def _sdpa_twin(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _attention_op_args(case, device):
    """Arguments of tritonops::attention for one opcheck case (inputs requiring grad)."""
    q, k, v = _qkv(2, 4, 9, 11, 16, 24, device=device)
    mask, p, causal, gqa = None, 0.0, False, False
    if case == "causal":
        causal = True
    elif case == "bool_mask":
        mask = torch.rand(9, 11, device=device) > 0.3
    elif case == "additive_mask_grad":
        mask = randn(4, 1, 11, device=device, grad=True)  # broadcast over batch and rows: summed back
    elif case == "gqa":
        k, v, gqa = k[:, :2], v[:, :2], True
    elif case == "gqa_distinct_kv":
        k, v, gqa = k[:1, :2], v[:, :1], True
    elif case == "dropout":
        p = 0.3
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, p, causal, 0.25, 1234, gqa)


def _opcheck_attention_backward(need):
    def args(d):
        q, k, v, mask, *rest = _attention_op_args("additive_mask_grad", d)
        out, lse = attn_ops.attention_op(q, k, v, mask, *rest)
        g = torch.randn_like(out).mT.contiguous().mT  # a gradient in another layout
        return (g, q.detach(), k.detach(), v.detach(), mask.detach(), out.detach(), lse, *rest, *need)
    return Opcheck(f"bwd-additive_mask_grad-need{_bits(need)}",
                   attn_ops.attention_backward_op, args)


ATTENTION_TUNERS = {"fwd": attn_tuning.ATTENTION_TUNER, "dkdv": attn_tuning.ATTENTION_BWD_DKDV_TUNER,
                    "dq": attn_tuning.ATTENTION_BWD_DQ_TUNER, "preprocess": attn_tuning.ATTENTION_BWD_PREPROCESS_TUNER}


def _attention_spaces(case):
    """The four spaces over L 70, S 61, E 24, Ev 40 in float64: causal with dropout and GQA, or
    an additive mask with its gradient; blocks unlike the defaults (BLOCK_M < BLOCK_N and
    BLOCK_M > BLOCK_N on the causal diagonal) among the samples."""
    def build(device, monkeypatch):
        Z, H, HK, L, S, E, EV = 1, 2, 2, 70, 61, 24, 40
        causal, mask, p, mask_grad = False, None, 0.0, False
        if case == "causal_dropout_gqa":
            H, causal, p = 4, True, 0.3
        else:
            mask, mask_grad = randn(L, S, dtype=F64, device=device).expand(Z, H, L, S), True
        q = randn(Z, H, L, E, dtype=F64, device=device)
        k, v = randn(Z, HK, S, E, dtype=F64, device=device), randn(Z, HK, S, EV, dtype=F64, device=device)
        mask_kind = "none" if mask is None else "add"
        fwd_key = attn_tuning.attention_key(E, EV, L, S, F64, causal, mask_kind, p > 0)
        dq_key = attn_tuning.attention_dq_key(E, EV, L, S, F64, causal, mask_kind, p > 0, mask_grad)
        pre_key = attn_tuning.attention_preprocess_key(EV, L, F64)
        args = dict(causal=causal, scale=0.3, dropout_p=p, seed=99)
        o, lse = attn_ops.launch_attention_fwd(q, k, v, mask, **args, config=ATTENTION_TUNERS["fwd"].default(fwd_key))
        do = torch.randn_like(o)
        delta = attn_ops.launch_attention_bwd_preprocess(o, do, config=ATTENTION_TUNERS["preprocess"].default(pre_key))
        bwd = (do, q, k, v, mask, lse, delta, causal, 0.3, p, 99)

        def dq(config):
            return [t for t in attn_ops.launch_attention_bwd_dq(*bwd, mask_grad=mask_grad, config=config)
                    if t is not None]

        diagonal = [lambda c: "BLOCK_N" in c.meta and c["BLOCK_M"] < c["BLOCK_N"],
                    lambda c: "BLOCK_N" in c.meta and c["BLOCK_M"] > c["BLOCK_N"]]
        return [(ATTENTION_TUNERS["fwd"], fwd_key,
                 lambda c: attn_ops.launch_attention_fwd(q, k, v, mask, **args, config=c), diagonal),
                (ATTENTION_TUNERS["preprocess"], pre_key,
                 lambda c: attn_ops.launch_attention_bwd_preprocess(o, do, config=c), []),
                (ATTENTION_TUNERS["dkdv"], fwd_key, lambda c: attn_ops.launch_attention_bwd_dkdv(*bwd, config=c),
                 diagonal),
                (ATTENTION_TUNERS["dq"], dq_key, dq, diagonal)]

    return Spaces(case, build)


def _tuned_attention(device):
    q, k, v = _qkv(1, 2, 20, 16, 16, device=device, grad=True)
    for causal in (False, True):  # the command tunes both
        tritonops.attention(q, k, v, is_causal=causal).backward(randn(1, 2, 20, 16, device=device))


_FWD_KEYS = ['[16, false, "float32", 32, 16, "none", false]', '[16, true, "float32", 32, 16, "none", false]']

ATTENTION = Op(
    "attention", tritonops.attention, _sdpa_twin, (attn_ops.attention_op, attn_ops.attention_backward_op),
    calls=[Call("causal", lambda d: _qkv(2, 3, 9, 11, 24, 16, device=d, grad=True),
                lambda f, q, k, v: f(q, k, v, is_causal=True)),
           Call("additive_mask_grad", lambda d: (*_qkv(2, 3, 9, 11, 24, 16, device=d, grad=True),
                                                 randn(3, 1, 11, device=d, grad=True)),
                lambda f, q, k, v, m: f(q, k, v, m)),
           Call("bool_mask", lambda d: (*_qkv(2, 3, 9, 11, 24, 16, device=d, grad=True),
                                        torch.rand(9, 11, device=d) > 0.3),
                lambda f, q, k, v, m: f(q, k, v, attn_mask=m)),
           Call("gqa_scale", lambda d: _qkv(2, 4, 9, 11, 24, 16, HK=2, device=d, grad=True),
                lambda f, q, k, v: f(q, k, v, enable_gqa=True, scale=0.2)),
           Call("op_with_seeded_dropout", lambda d: _qkv(2, 4, 9, 11, 16, device=d, grad=True),
                lambda f, q, k, v: attn_ops.attention_op(q, k, v, None, 0.3, False, 0.25, 1234, False)[0],
                fallback=False)],
    opchecks=[*(Opcheck(f"fwd-{c}", attn_ops.attention_op, lambda d, c=c: _attention_op_args(c, d))
                for c in ["plain", "causal", "bool_mask", "additive_mask_grad", "gqa", "gqa_distinct_kv", "dropout"]),
              *(_opcheck_attention_backward(n) for n in [(True, True, True, True), (False, True, False, False),
                                                         (True, False, False, True)])],
    tuners=tuple(ATTENTION_TUNERS.values()),
    spaces=[_attention_spaces("causal_dropout_gqa"), _attention_spaces("additive_mask_grad")],
    tune=Tune("20x16x16", {"attention": _FWD_KEYS, "attention_bwd_dkdv": _FWD_KEYS,
                           "attention_bwd_dq": [k[:-1] + ", false]" for k in _FWD_KEYS],
                           "attention_bwd_preprocess": ['[16, "float32", 32]']}, _tuned_attention),
)


OPS = [MATMUL, LINEAR, SOFTMAX, LOG_SOFTMAX, LAYER_NORM, RMS_NORM, ATTENTION]


def _cases(column, keep=lambda case: True):
    return [pytest.param(row, case, id=f"{row.name}-{case.id}") for row in OPS for case in getattr(row, column)
            if keep(case)]


ROWS = [pytest.param(row, id=row.name) for row in OPS]


# --------------------------------------------------------------------------- the table itself


def test_the_table_covers_every_op():
    """A row per public op, every custom op opchecked, every tuner's space sampled, every
    `autotune tune` op of tritonops round-tripped: a new op cannot miss the contract."""
    public = {n for n in tritonops.__all__ if getattr(getattr(tritonops, n), "__module__", "").startswith("tritonops.ops.")}
    assert sorted(row.name for row in OPS) == sorted(public)
    for row in OPS:
        assert row.fn is getattr(tritonops, row.name)
        assert {c.op for c in row.opchecks} == set(row.custom_ops), row.name
        assert any(c.fallback for c in row.calls), row.name
    modules = (matmul_ops, softmax_ops, norm_ops, attn_ops)
    custom = {v for m in modules for v in vars(m).values() if isinstance(v, CustomOpDef)}
    assert custom == {op for row in OPS for op in row.custom_ops}
    ours = {t for t in TUNERS.values() if t.runner is not None and t.runner.__module__.startswith("tritonops.")}
    assert ours == {t for row in OPS for t in row.tuners}
    commands = {n for n, op in REGISTRY.items() if op.keys.__module__.startswith("tritonops.")}
    assert commands == {row.name for row in OPS}


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("row", ROWS)
def test_cpu_without_interpreter_falls_back_with_one_warning(monkeypatch, row):
    """Every call gives exactly torch's result; the first warns that the torch reference runs, the
    others of the same op are silent."""
    monkeypatch.setattr(runtime, "INTERPRETER", False)
    monkeypatch.setattr(runtime, "_warned_reference", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in row.calls:
            if not call.fallback:
                continue
            inputs = call.inputs("cpu")
            got, want = call.apply(row.fn, *inputs), call.apply(row.twin, *inputs)
            assert torch.equal(got, want), call.id
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"tritonops.{row.name}:") and "torch reference" in messages[0]


# --------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("row,check", _cases("opchecks"))
def test_opcheck(device, row, check):
    torch.library.opcheck(check.op, check.args(device))


@pytest.mark.parametrize("row,call", _cases("calls"))
def test_compile_fullgraph_matches_eager(device, row, call):
    assert_compiles_like_eager(lambda *t: call.apply(row.fn, *t), call.inputs(device))


# --------------------------------------------------------------------------- tuning


def sample_configs(tuner, key, rng, k, musts=()):
    """k candidates of `key` with blocks (meta-parameters) unlike the default's and, as far as the
    space allows, unlike each other's: first one meeting each of `musts` (where one does), then
    random ones."""
    default = tuner.default(key)
    groups = {}
    for c in tuner.candidates(key):
        if c.meta != default.meta:
            groups.setdefault(tuple(sorted(c.meta.items())), []).append(c)
    chosen = []
    for must in musts:
        fits = [(blocks, must) for blocks in sorted(groups) if blocks not in dict(chosen)
                and any(must(c) for c in groups[blocks])]
        if fits:
            chosen.append(rng.choice(fits))
    rest = [blocks for blocks in sorted(groups) if blocks not in dict(chosen)]
    chosen += [(blocks, None) for blocks in rng.sample(rest, min(len(rest), max(0, k - len(chosen))))]
    return [rng.choice([c for c in groups[blocks] if must is None or must(c)]) for blocks, must in chosen]


@pytest.mark.parametrize("row,case", _cases("spaces"))
def test_space_configs_agree_with_the_default(device, monkeypatch, row, case):
    """Sampled configs of every Tuner of the op give, through the launchers' `config=`, what the
    launcher runs when it selects (the default, untuned): the spaces hold configs the kernels
    handle, not just the default. The launcher selects for the very key sampled."""
    rng = random.Random(f"{row.name}-{case.id}")
    seen = set()
    with autotune.override(mode="off"):  # a fresh memory: each select is recorded with its key
        for tuner, key, launch, musts in case.build(device, monkeypatch):
            seen.add(tuner)
            want = launch(None)
            assert tuner.sources.get(key) == "default", (tuner.name, key, tuner.sources)
            assert default_check(want, launch(tuner.default(key))), (tuner.name, key)
            configs = sample_configs(tuner, key, rng, 4, musts)
            assert configs, (tuner.name, key)  # the space holds blocks other than the default's
            for config in configs:
                assert default_check(launch(config), want), (tuner.name, key, config)
    assert seen == set(row.tuners)


@pytest.mark.parametrize("row", ROWS)
def test_autotune_command_round_trip(tmp_path, monkeypatch, capsys, device, row):
    """`autotune tune` stores a winner per key, `show --json` lists those keys, and the op,
    reading the cache through tritonops' own variables, selects the stored winners."""
    cache = str(tmp_path)
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", cache)
    with autotune.override(mode="off"):  # a fresh memory; the winners timed by the interpreter forgotten after
        assert cli.main(["--cache-dir", cache, "tune", row.name, "--shapes", row.tune.shape, "--dtype", "float32",
                         "--budget", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["--cache-dir", cache, "show", "--json"]) == 0
    files = json.loads(capsys.readouterr().out)
    assert sorted((f["kernel"], sorted(f["entries"])) for f in files) == sorted(
        (kernel, sorted(keys)) for kernel, keys in row.tune.entries.items())

    monkeypatch.delenv("AUTOTUNE_CACHE_DIR")
    monkeypatch.delenv("AUTOTUNE_MODE", raising=False)
    monkeypatch.setenv("TRITONOPS_CACHE_DIR", cache)
    monkeypatch.setenv("TRITONOPS_AUTOTUNE", "cached")
    with autotune.override():  # a fresh memory, forgotten again after
        row.tune.call(device)
        for f in files:
            tuner = TUNERS[f["kernel"]]
            for enc, entry in f["entries"].items():
                key = tuner.make_key(decode_key(enc))
                assert tuner.sources.get(key) == "user-cache", (f["kernel"], enc, tuner.sources)
                assert tuner.select(key) == Config.from_dict(entry["winner"])

