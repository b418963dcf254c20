import copy

import pytest
import torch

import tritonops.nn as tnn
from tritonops import testing

PAIRS = {
    "LayerNorm": (tnn.LayerNorm, torch.nn.LayerNorm),
    "RMSNorm": (tnn.RMSNorm, torch.nn.RMSNorm),
    "Softmax": (tnn.Softmax, torch.nn.Softmax),
    "LogSoftmax": (tnn.LogSoftmax, torch.nn.LogSoftmax),
}

# (module, constructor args, kwargs, input shape)
CASES = [
    ("LayerNorm", (24,), {}, (3, 5, 24)),
    ("LayerNorm", ([4, 6],), {"eps": 1e-3}, (2, 4, 6)),
    ("LayerNorm", (24,), {"bias": False}, (7, 24)),
    ("LayerNorm", (24,), {"elementwise_affine": False}, (7, 24)),
    ("RMSNorm", (24,), {}, (3, 5, 24)),
    ("RMSNorm", ([4, 6],), {"eps": 1e-4}, (2, 4, 6)),
    ("RMSNorm", (24,), {"elementwise_affine": False}, (7, 24)),
    ("Softmax", (), {"dim": 1}, (3, 5, 7)),
    ("LogSoftmax", (), {"dim": -1}, (3, 5, 7)),
]


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("name,args,kwargs,shape", CASES, ids=lambda v: str(v))
def test_module_matches_torch(device, name, args, kwargs, shape):
    ours_cls, torch_cls = PAIRS[name]
    theirs = torch_cls(*args, **kwargs, device=device) if name.endswith("Norm") else torch_cls(*args, **kwargs)
    _randomise(theirs)
    ours = ours_cls(*args, **kwargs, device=device) if name.endswith("Norm") else ours_cls(*args, **kwargs)
    assert isinstance(ours, torch_cls)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert repr(ours) == repr(theirs)

    x = torch.randn(shape, device=device)
    x64 = x.double().requires_grad_()
    ref = type(theirs)(*args, **kwargs, dtype=torch.float64) if name.endswith("Norm") else theirs
    if name.endswith("Norm"):
        ref.load_state_dict(theirs.state_dict())
    outs = []
    for module, inp in ((ours, x.clone().requires_grad_()), (theirs, x.clone().requires_grad_()), (ref, x64)):
        out = module(inp)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out)
        params = list(module.parameters())
        outs.append((out, torch.autograd.grad(out, [inp, *params], g)))
    (o, og), (t, tg), (r, rg) = outs
    testing.assert_close(o, r, t)
    for a, b, c in zip(og, tg, rg):
        testing.assert_close(a, c, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_dtype_argument(device, dtype):
    ln = tnn.LayerNorm(16, device=device, dtype=dtype)
    rms = tnn.RMSNorm(16, device=device, dtype=dtype)
    x = torch.randn(4, 16, device=device, dtype=dtype)
    for m, ref in ((ln, torch.nn.LayerNorm(16, dtype=dtype)), (rms, torch.nn.RMSNorm(16, dtype=dtype))):
        assert all(p.dtype == dtype for p in m.parameters())
        out = m(x)
        assert out.dtype == dtype
        testing.assert_close(out, copy.deepcopy(ref).double()(x.double()), ref(x))


def test_softmax_module_without_dim_warns_like_torch(device):
    x = torch.randn(2, 3, 4, device=device)
    for ours, theirs in ((tnn.Softmax(), torch.nn.Softmax()), (tnn.LogSoftmax(), torch.nn.LogSoftmax())):
        with pytest.warns(UserWarning, match="Implicit dimension"):
            want = theirs(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            got = ours(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            ref = theirs(x.double())
        testing.assert_close(got, ref, want)


def test_torch_model_state_dict_loads_into_ours(device):
    """A model built from torch modules loads into the same model built from ours."""
    def model(norm, act):
        return torch.nn.Sequential(torch.nn.Linear(8, 12), norm(12), torch.nn.Linear(12, 12), tnn.RMSNorm(12)
                                   if norm is tnn.LayerNorm else torch.nn.RMSNorm(12), act(dim=-1))

    theirs = model(torch.nn.LayerNorm, torch.nn.LogSoftmax).to(device)
    ours = model(tnn.LayerNorm, tnn.LogSoftmax).to(device)
    for m in theirs.modules():
        _randomise(m)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 8, device=device)
    ref = copy.deepcopy(theirs).double()
    testing.assert_close(ours(x), ref(x.double()), theirs(x))
