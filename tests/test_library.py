"""Backward through the torch.library ops when only some inputs take gradients (opcheck and
torch.compile of every op: tests/test_contract.py)."""

import pytest
import torch

import tritonops
from tritonops import reference
from tritonops.testing import assert_close


def _grads(fn, inputs, needs, dtype, g):
    """The gradients of fn(*inputs) (cast to dtype) for the inputs marked in `needs`."""
    leaves = [t.detach().to(dtype).requires_grad_(n) for t, n in zip(inputs, needs)]
    out = fn(*leaves)
    return torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g.to(dtype))


def _check_grads(ours, theirs, inputs, needs):
    """ours' gradients against theirs in float64 (the reference) and float32 (the bar)."""
    g = torch.randn(theirs(*inputs).shape, dtype=torch.float64)
    got = _grads(ours, inputs, needs, torch.float32, g)
    want = _grads(theirs, inputs, needs, torch.float64, g)
    bar = _grads(theirs, inputs, needs, torch.float32, g)
    for i, (o, r, t) in enumerate(zip(got, want, bar)):
        assert_close(o, r, t, torch.float32, what=f"gradient {i}")


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, False, True)])
def test_backward_ops_with_some_gradients(grads):
    """Only the gradients asked for are computed (the backward ops return distinct empty
    tensors for the others), and those equal torch's."""
    x, w, b = torch.randn(3, 7), torch.randn(5, 7), torch.randn(5)
    _check_grads(lambda *t: tritonops.linear(*t, activation="silu"),
                 lambda *t: reference.linear(*t, activation_name="silu"), (x, w, b), grads)
    a, c = torch.randn(4, 7), torch.randn(7, 2)
    _check_grads(tritonops.matmul, torch.matmul, (a, c), (grads[0], not grads[0]))
