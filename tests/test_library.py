"""torch.library registration: opcheck for each op, and torch.compile without graph breaks."""

import pytest
import torch

import tritonops
from tritonops.ops import matmul as matmul_ops

from .utils import assert_compiles_like_eager


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 5, 7), (7, 3)), ((7,), (2, 7, 3)), ((2, 1, 5, 7), (3, 7, 4))])
def test_opcheck_matmul(shapes):
    a, b = randn(*shapes[0], requires_grad=True), randn(*shapes[1], requires_grad=True)
    torch.library.opcheck(matmul_ops.matmul_op, (a, b))


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_linear(activation, with_bias):
    x, w = randn(2, 3, 7, requires_grad=True), randn(5, 7, requires_grad=True)
    b = randn(5, requires_grad=True) if with_bias else None
    torch.library.opcheck(matmul_ops.linear_op, (x, w, b, activation, activation is not None))


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, False, True)])
def test_backward_ops_with_some_gradients(grads):
    """Gradients not asked for come back as distinct empty tensors (op outputs may not alias)."""
    x, w, b = (randn(*s, requires_grad=g) for s, g in zip([(3, 7), (5, 7), (5,)], grads))
    out = tritonops.linear(x, w, b, activation="silu")
    got = torch.autograd.grad(out.sum(), [t for t in (x, w, b) if t.requires_grad])
    assert all(g is not None for g in got)
    a, c = randn(4, 7, requires_grad=grads[0]), randn(7, 2, requires_grad=not grads[0])
    torch.autograd.grad(tritonops.matmul(a, c).sum(), [t for t in (a, c) if t.requires_grad])
    torch.library.opcheck(matmul_ops.linear_backward_op,
                          (torch.randn(3, 5), x.detach(), w.detach(), torch.randn(3, 5), "silu", *grads))


def test_compile_fullgraph_matches_eager():

    def block(x, w1, b1, w2):
        h = tritonops.linear(x, w1, b1, activation="gelu")
        return tritonops.matmul(h, w2).sum(-1)

    args = [randn(2, 5, 8, requires_grad=True), randn(12, 8, requires_grad=True), randn(12, requires_grad=True),
            randn(12, 4, requires_grad=True)]
    assert_compiles_like_eager(block, args)
