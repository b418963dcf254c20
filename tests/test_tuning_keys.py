"""What `autotune tune` stores is what a call looks up.

Each case runs an op forward and backward with the trace on (every key a Tuner is asked
for is recorded), then tunes the same shape with the command and checks that the cache
holds exactly the recorded (kernel, key) pairs: no key a call never uses, none missing.
"""

import json

import pytest
import torch

import autotune
import tritonops
from autotune import cli
from autotune.cache import CacheDir, decode_key


def _randn(*shape, device):
    return torch.randn(shape, device=device)


def _matmul(M, N, K, device):
    a, b = _randn(M, K, device=device), _randn(K, N, device=device)
    return [lambda: tritonops.matmul(a.requires_grad_(), b.requires_grad_())]


def _linear(M, N, K, device):
    """With a bias and an activation (the fused epilogue), and without either (a bias-free
    projection): the command tunes both forward keys."""
    x, w, b = _randn(M, K, device=device), _randn(N, K, device=device), _randn(N, device=device)
    return [lambda: tritonops.linear(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), activation="gelu"),
            lambda: tritonops.linear(x.requires_grad_(), w.requires_grad_())]


def _rows(fn, rows, cols, device):
    x = _randn(rows, cols, device=device)
    return [lambda: fn(x.requires_grad_(), -1)]


def _norm(rms, rows, cols, device):
    x, w, b = _randn(rows, cols, device=device), _randn(cols, device=device), _randn(cols, device=device)
    if rms:
        return [lambda: tritonops.rms_norm(x.requires_grad_(), (cols,), w.requires_grad_())]
    return [lambda: tritonops.layer_norm(x.requires_grad_(), (cols,), w.requires_grad_(), b.requires_grad_())]


def _attention(L, S, E, device):
    q, k, v = _randn(1, 2, L, E, device=device), _randn(1, 2, S, E, device=device), _randn(1, 2, S, E, device=device)
    return [lambda causal=causal: tritonops.attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                                      is_causal=causal)
            for causal in (False, True)]  # the command tunes both


CASES = {  # op: (shape on the command line, calls that use it)
    "matmul": ((33, 17, 40), _matmul),
    "linear": ((33, 17, 40), _linear),
    "softmax": ((9, 100), lambda r, c, device: _rows(tritonops.softmax, r, c, device)),
    "log_softmax": ((9, 100), lambda r, c, device: _rows(tritonops.log_softmax, r, c, device)),
    "layer_norm": ((9, 100), lambda r, c, device: _norm(False, r, c, device)),
    "rms_norm": ((9, 100), lambda r, c, device: _norm(True, r, c, device)),
    "attention": ((40, 33, 24), _attention),
}


def _recorded(path) -> set:
    with open(path, encoding="utf-8") as fh:
        return {(item["kernel"], tuple(item["key"])) for item in map(json.loads, fh)}


def _stored(cache_dir) -> set:
    return {(f.header["kernel"], decode_key(enc)) for f in CacheDir(cache_dir).files() for enc in f.read()}


@pytest.mark.parametrize("op", sorted(CASES))
def test_command_tunes_exactly_the_keys_a_call_uses(tmp_path, monkeypatch, capsys, device, op):
    shape, calls = CASES[op]
    trace = tmp_path / "trace.jsonl"
    monkeypatch.delenv("AUTOTUNE_RECORD", raising=False)  # it would win over tritonops' name
    monkeypatch.setenv("TRITONOPS_RECORD", str(trace))
    with autotune.override(mode="off"):  # a fresh memory: every key is asked for, so recorded
        for call in calls(*shape, device=device):
            out = call()
            out.backward(torch.randn_like(out))
    monkeypatch.delenv("TRITONOPS_RECORD")
    used = _recorded(trace)
    assert used, "the calls recorded no key"

    cache = tmp_path / "cache"
    with autotune.override(mode="off"):
        assert cli.main(["--cache-dir", str(cache), "tune", op, "--shapes", "x".join(map(str, shape)),
                         "--dtype", "float32", "--budget", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert _stored(cache) == used


def test_llm_presets_list_the_largest_problems_first():
    """Under `--op-seconds` a preset's keys are tuned in its order: the problems that take the
    most GPU time come first."""
    from math import prod

    from autotune.registry import REGISTRY

    for name in CASES:
        shapes = REGISTRY[name].presets["llm"]
        sizes = [prod(shape) for shape in shapes]
        assert len(shapes) > 1 and sizes == sorted(sizes, reverse=True), name
