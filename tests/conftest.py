"""Test setup: without a CUDA device the kernels run under Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before
anything imports a kernel module. Outputs are poisoned (NaN-filled) before each
launch so an element a kernel fails to write shows up as an error.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITONOPS_POISON", "1")

import pytest  # noqa: E402

import tritonops  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh but reproducible inputs: each test gets its own seed, printed on failure.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
