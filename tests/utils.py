"""Compare an op with its torch twin: ours at the input precision, torch at the
same precision (its error sets the bar) and a float64 reference, outputs and
gradients alike, through the tolerance table in tritonops.testing."""

from __future__ import annotations

import torch

from tritonops.testing import assert_close


def _cast(args, dtype, requires_grad):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype)
            if requires_grad:
                a.requires_grad_(True)
        out.append(a)
    return out


def check_op(ours, torch_fn, *args, backward=True, strided=None, **kwargs):
    """Check ours(*args, **kwargs) against torch_fn at float64 and at args' own precision.

    `strided`, if given, maps the list of cast inputs to the inputs actually passed
    (e.g. transposed or sliced views), applied alike to all three runs.
    """
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def run(fn, dt):
        leaves = _cast(args, dt, backward)
        inputs = strided(leaves) if strided else leaves
        out = fn(*inputs, **kwargs)
        if not backward:
            return out, []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
        grad_leaves = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out, grad_leaves, g, allow_unused=True)
        return out, list(grads)

    ref_out, ref_grads = run(torch_fn, torch.float64)
    ours_out, ours_grads = run(ours, dtype)
    torch_out, torch_grads = run(torch_fn, dtype) if dtype != torch.float64 else (ref_out, ref_grads)
    assert ours_out.dtype == torch_out.dtype, f"output dtype {ours_out.dtype} != torch's {torch_out.dtype}"
    assert ours_out.shape == torch_out.shape, f"output shape {tuple(ours_out.shape)} != torch's {tuple(torch_out.shape)}"
    assert_close(ours_out, ref_out, torch_out, dtype, what="output")
    for i, (o, r, t) in enumerate(zip(ours_grads, ref_grads, torch_grads)):
        if r is None:
            assert o is None or not o.any(), f"grad {i}: expected none"
            continue
        assert o is not None, f"grad {i} is missing"  # shapes: autograd's own check, and assert_close's
        assert_close(o, r, t, dtype, what=f"grad of input {i}")
    return ours_out


def assert_compiles_like_eager(fn, args):
    """torch.compile(fullgraph=True) of fn (aot_eager: our ops stay opaque custom ops) gives
    exactly eager's outputs and the gradients of the args that require grad: no graph break,
    nothing recomputed differently; and the graph holds one of our ops (not a fallback)."""
    torch._dynamo.reset()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert leaves, "nothing to differentiate"
    eager_out = fn(*args)
    eager_grads = torch.autograd.grad(eager_out.sum(), leaves)
    targets = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out = compiled(*args)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert any(t.startswith("tritonops.") for t in targets), f"no tritonops op in the graph: {targets}"
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def qkv(B, H, L, S, E, EV=None, dtype=torch.float32, device="cpu", HK=None):
    """Random q (B, H, L, E), k (B, HK, S, E) and v (B, HK, S, EV or E); HK defaults to H."""
    HK = HK or H
    return (torch.randn(B, H, L, E, dtype=dtype, device=device), torch.randn(B, HK, S, E, dtype=dtype, device=device),
            torch.randn(B, HK, S, EV or E, dtype=dtype, device=device))
