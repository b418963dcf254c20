"""Long 2-byte rows (16K-64K columns) held whole in one tile: softmax, log_softmax, layer_norm
and rms_norm, forward and backward, against torch; the defaults that take that path, and the
looped variant on the same shapes."""

import pytest
import torch
import torch.nn.functional as F
import triton

from autotune import Config
from tritonops.ops import norm as norm_ops
from tritonops.ops import softmax as softmax_ops
from tritonops.ops.norm import layer_norm, rms_norm
from tritonops.ops.softmax import log_softmax, softmax
from tritonops.tuning import norm as norm_tuning
from tritonops.tuning import rows as row_tiling
from tritonops.tuning import softmax as softmax_tuning

from .utils import check_op

HALF_DTYPES = [torch.float16, torch.bfloat16]
OPS = ["softmax", "log_softmax", "layer_norm", "rms_norm"]
LONG = 20001  # past the 16K tile of 4-byte rows, under 32K: one pass for 2-byte rows; a ragged tail
LONGEST = 65533  # one 64K tile, a tail of 3


class _LaunchSpy:
    """Stands in for a kernel in its ops module: records each launch's meta-parameters, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({k: kwargs[k] for k in ("ONE_PASS", "BLOCK_N", "num_warps")})
            return self.kernel[grid](*args, **kwargs)
        return launch


def spy_kernels(monkeypatch, op):
    """(forward spy, backward spy) on the kernels `op` launches."""
    mod, names = ((softmax_ops, ("_softmax_fwd_kernel", "_softmax_bwd_kernel")) if "softmax" in op
                  else (norm_ops, ("_norm_fwd_kernel", "_norm_bwd_kernel")))
    spies = []
    for name in names:
        spy = _LaunchSpy(getattr(mod, name))
        monkeypatch.setattr(mod, name, spy)
        spies.append(spy)
    return spies


def force_config(monkeypatch, op, block_n, num_warps, num_stages):
    """Every launch of `op`'s kernels, forward and backward, with one BLOCK_R = 1 tile."""
    cfg = Config({"BLOCK_R": 1, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
    if "softmax" in op:
        monkeypatch.setattr(softmax_tuning.SOFTMAX_TUNER, "select", lambda key: cfg)
        monkeypatch.setattr(softmax_tuning.SOFTMAX_BWD_TUNER, "select", lambda key: cfg)
    else:
        bwd = Config(cfg.meta, cfg.num_warps, cfg.num_stages, host={"PROGRAMS_PER_SM": 2})
        monkeypatch.setattr(norm_tuning.NORM_TUNER, "select", lambda key: cfg)
        monkeypatch.setattr(norm_tuning.NORM_BWD_TUNER, "select", lambda key: bwd)


def check_long_rows(op, rows, cols, dtype, device):
    """`op` of (rows, cols) against torch (float64 reference, torch at dtype), output and every
    gradient (input, weight, bias)."""
    x = torch.randn(rows, cols, device=device, dtype=dtype) * 3
    if op in ("softmax", "log_softmax"):
        ours, ref = (softmax, F.softmax) if op == "softmax" else (log_softmax, F.log_softmax)
        check_op(lambda t: ours(t, -1), lambda t: ref(t, -1), x)
        return
    x = x * (2 / 3) + 0.5
    w = torch.randn(cols, device=device, dtype=dtype)
    if op == "rms_norm":
        check_op(lambda t, w: rms_norm(t, (cols,), w), lambda t, w: F.rms_norm(t, (cols,), w), x, w)
    else:
        b = torch.randn(cols, device=device, dtype=dtype)
        check_op(lambda t, w, b: layer_norm(t, (cols,), w, b), lambda t, w, b: F.layer_norm(t, (cols,), w, b),
                 x, w, b)


def _defaults(op, cols, dtype):
    """(forward default, backward default) of `op` for a contiguous (4096, cols) input."""
    if "softmax" in op:
        key = softmax_tuning.softmax_key(cols, 4096, dtype, False, op == "log_softmax")
        return softmax_tuning.SOFTMAX_TUNER.default(key), softmax_tuning.SOFTMAX_BWD_TUNER.default(key)
    rms = op == "rms_norm"
    return (norm_tuning.NORM_TUNER.default(norm_tuning.norm_key(cols, 4096, dtype, rms, True)),
            norm_tuning.NORM_BWD_TUNER.default(norm_tuning.norm_bwd_key(cols, 4096, dtype, rms, True, True)))


# Backwards whose default holds a 32K row whole: the others spill there on sm90 and loop.
ONE_PASS_BWD = {"log_softmax"}


@pytest.mark.parametrize("op", OPS)
def test_long_row_defaults(op):
    """2-byte rows up to 32K columns: the forward default is one whole-row tile over 32 warps
    (log_softmax's backward too; the others loop over 4096-column chunks); 64K rows loop by
    default, yet the space holds a whole-row 64K tile beside the looped one; 4-byte rows keep
    their 16K limit."""
    for dtype in HALF_DTYPES:
        for cols in (LONG, 32768):
            fwd, bwd = _defaults(op, cols, dtype)
            assert (fwd["BLOCK_R"], fwd["BLOCK_N"], fwd.num_warps, fwd.num_stages) == (1, 32768, 32, 1)
            if op in ONE_PASS_BWD:
                assert (bwd["BLOCK_R"], bwd["BLOCK_N"], bwd.num_warps, bwd.num_stages) == (1, 32768, 32, 1)
            else:
                assert bwd["BLOCK_N"] == row_tiling.LOOP_BLOCK_N and bwd.num_stages == 2
        for config in _defaults(op, 65536, dtype):
            assert config["BLOCK_N"] == row_tiling.LOOP_BLOCK_N and config.num_stages == 2
        if "softmax" in op:
            key = softmax_tuning.softmax_key(65536, 4096, dtype, False, op == "log_softmax")
            spaces = [(softmax_tuning.SOFTMAX_SPACE, softmax_tuning._problem(key))]
        else:
            key = norm_tuning.norm_bwd_key(65536, 4096, dtype, op == "rms_norm", True, True)
            spaces = [(norm_tuning.NORM_SPACE, norm_tuning._problem(key)),
                      (norm_tuning.NORM_BWD_SPACE, norm_tuning._problem(key))]
        for space, problem in spaces:
            tiles = {(c["BLOCK_R"], c["BLOCK_N"], c.num_warps, c.num_stages) for c in space.configs(problem)}
            assert (1, 65536, 32, 1) in tiles and (1, row_tiling.LOOP_BLOCK_N, 8, 2) in tiles
            assert not any(n == 65536 and w < 32 for _, n, w, _ in tiles)  # 64 fp32 values a thread at most
    for fwd in _defaults(op, LONG, torch.float32):
        assert fwd["BLOCK_N"] == row_tiling.LOOP_BLOCK_N


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_long_rows_by_default(device, monkeypatch, op, dtype):
    """(2, 20001) under the defaults: the forward takes the one-pass path (the backward as its
    default says), forward and backward match torch."""
    fwd_spy, bwd_spy = spy_kernels(monkeypatch, op)
    check_long_rows(op, 2, LONG, dtype, device)
    # check_op runs ours once, forward then backward
    assert fwd_spy.launches == [{"ONE_PASS": True, "BLOCK_N": 32768, "num_warps": 32}]
    assert [launch["ONE_PASS"] for launch in bwd_spy.launches] == [op in ONE_PASS_BWD]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_longest_rows_one_pass(device, monkeypatch, op, dtype):
    """(2, 65533) in one 64K tile over 32 warps, forward and backward (the backward too, as
    the tuner may choose it)."""
    force_config(monkeypatch, op, 65536, 32, 1)
    fwd_spy, bwd_spy = spy_kernels(monkeypatch, op)
    check_long_rows(op, 2, LONGEST, dtype, device)
    assert [launch["ONE_PASS"] for launch in fwd_spy.launches + bwd_spy.launches] == [True, True]


@pytest.mark.parametrize("op", OPS)
def test_long_rows_looped(device, monkeypatch, op):
    """The looped variant on the shape the defaults hold whole: 4096-column chunks, a tail."""
    force_config(monkeypatch, op, row_tiling.LOOP_BLOCK_N, 8, 2)
    fwd_spy, bwd_spy = spy_kernels(monkeypatch, op)
    check_long_rows(op, 2, LONG, torch.bfloat16, device)
    assert [launch["ONE_PASS"] for launch in fwd_spy.launches + bwd_spy.launches] == [False, False]
    assert triton.cdiv(LONG, row_tiling.LOOP_BLOCK_N) > 1
