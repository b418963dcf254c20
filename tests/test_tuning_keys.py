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


def _matmul(M, N, K):
    a, b = torch.randn(M, K), torch.randn(K, N)
    return [lambda: tritonops.matmul(a.requires_grad_(), b.requires_grad_())]


def _linear(M, N, K):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    return [lambda: tritonops.linear(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), activation="gelu")]


def _rows(fn, rows, cols):
    x = torch.randn(rows, cols)
    return [lambda: fn(x.requires_grad_(), -1)]


def _norm(rms, rows, cols):
    x, w, b = torch.randn(rows, cols), torch.randn(cols), torch.randn(cols)
    if rms:
        return [lambda: tritonops.rms_norm(x.requires_grad_(), (cols,), w.requires_grad_())]
    return [lambda: tritonops.layer_norm(x.requires_grad_(), (cols,), w.requires_grad_(), b.requires_grad_())]


def _attention(L, S, E):
    q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, E)
    return [lambda causal=causal: tritonops.attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                                      is_causal=causal)
            for causal in (False, True)]  # the command tunes both


CASES = {  # op: (shape on the command line, calls that use it)
    "matmul": ((33, 17, 40), _matmul),
    "linear": ((33, 17, 40), _linear),
    "softmax": ((9, 100), lambda r, c: _rows(tritonops.softmax, r, c)),
    "log_softmax": ((9, 100), lambda r, c: _rows(tritonops.log_softmax, r, c)),
    "layer_norm": ((9, 100), lambda r, c: _norm(False, r, c)),
    "rms_norm": ((9, 100), lambda r, c: _norm(True, r, c)),
    "attention": ((40, 33, 24), _attention),
}


def _recorded(path) -> set:
    with open(path, encoding="utf-8") as fh:
        return {(item["kernel"], tuple(item["key"])) for item in map(json.loads, fh)}


def _stored(cache_dir) -> set:
    return {(f.header["kernel"], decode_key(enc)) for f in CacheDir(cache_dir).files() for enc in f.read()}


@pytest.mark.parametrize("op", sorted(CASES))
def test_command_tunes_exactly_the_keys_a_call_uses(tmp_path, monkeypatch, capsys, op):
    shape, calls = CASES[op]
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TRITONOPS_RECORD", str(trace))
    with autotune.override(mode="off"):  # a fresh memory: every key is asked for, so recorded
        for call in calls(*shape):
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
