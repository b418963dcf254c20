"""torch.library registration: opcheck for each op, and torch.compile without graph breaks."""

import pytest
import torch

import tritonops
from tritonops.ops import matmul as matmul_ops


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


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def block(x, w1, b1, w2):
        h = tritonops.linear(x, w1, b1, activation="gelu")
        return tritonops.matmul(h, w2).sum(-1)

    args = [randn(2, 5, 8, requires_grad=True), randn(12, 8, requires_grad=True), randn(12, requires_grad=True),
            randn(12, 4, requires_grad=True)]
    eager_out = block(*args)
    eager_grads = torch.autograd.grad(eager_out.sum(), args)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    grads = torch.autograd.grad(out.sum(), args)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
