"""Config choice of the softmax kernels (softmax and log_softmax, forward and backward): the
key, the heuristic defaults, the search space, the tuning runners, the Tuners and the
`autotune` ops."""

from typing import NamedTuple

import torch

from autotune import Config, Space, TunableOp, Tuner, bucket, register, register_tuner

from ..kernels.softmax import _softmax_bwd_kernel, _softmax_fwd_kernel
from .common import ITEMSIZE, SHIPPED_CONFIGS, check_dtype, dtype_name, tuning_device
from .rows import (COL_BLOCKS, LLM_ROWS_COLS, ROW_BLOCKS, ROW_STAGES, ROW_WARPS, TUNE_DTYPES, WHOLE_ROW_BWD,
                   WHOLE_ROW_FWD, row_tile_config, row_tile_rules)


class SoftmaxKey(NamedTuple):
    """A problem of the softmax kernels (forward and backward share it).

    Bucketing loses nothing the heuristic uses: a power-of-two BLOCK_N covers N exactly
    when it covers next_pow2(N), so one pass or a loop is decided by the key alone."""

    N: int  # bucketed length of the reduced dim
    ROWS: int  # bucketed number of rows
    dtype: str  # the output's
    strided: bool  # the reduced dim is not the unit-stride one
    log: bool  # log_softmax


def softmax_key(n_cols: int, n_rows: int, dtype: torch.dtype | str, strided: bool, log: bool) -> SoftmaxKey:
    return SoftmaxKey(bucket(n_cols), bucket(n_rows), dtype_name(dtype), bool(strided), bool(log))


def softmax_heuristic(key: SoftmaxKey) -> Config:
    """The default config of _softmax_fwd_kernel: row_tile_config, whole rows up to
    WHOLE_ROW_FWD (32K 2-byte elements over 32 warps)."""
    return row_tile_config(key.N, key.ROWS, ITEMSIZE[key.dtype], key.strided, WHOLE_ROW_FWD)


def softmax_bwd_heuristic(key: SoftmaxKey) -> Config:
    """The default config of _softmax_bwd_kernel. log_softmax's holds whole rows as far as
    the forward (compiled for sm90 at 32K 2-byte elements over 32 warps: 64 registers, no
    spill); softmax's keeps y and dy (fp32) alive across its row sum and spills there, so it
    holds rows up to WHOLE_ROW_BWD (16K) and loops beyond."""
    whole_row_max = WHOLE_ROW_FWD if key.log else WHOLE_ROW_BWD
    return row_tile_config(key.N, key.ROWS, ITEMSIZE[key.dtype], key.strided, whole_row_max)


def _problem(key: SoftmaxKey) -> dict:
    return {"N": key.N, "ROWS": key.ROWS, "itemsize": ITEMSIZE[key.dtype]}


SOFTMAX_SPACE = Space(
    {"BLOCK_R": ROW_BLOCKS, "BLOCK_N": COL_BLOCKS}, num_warps=ROW_WARPS, num_stages=ROW_STAGES,
    block_dims={"BLOCK_R": "ROWS", "BLOCK_N": "N"}, constraints=row_tile_rules(), version=2)


def _inputs(key: SoftmaxKey):
    """x for a key, read over dim 1: (rows, N), or (1, N, rows) when strided."""
    dt = getattr(torch, key.dtype)
    shape = (1, key.N, key.ROWS) if key.strided else (key.ROWS, key.N)
    return torch.randn(shape, device=tuning_device(), dtype=dt) * 3, dt


def _runner(key: SoftmaxKey):
    """A launch of the forward kernel, on inputs built for `key`, into a fresh output."""
    from ..ops.softmax import launch_softmax_fwd  # the ops import this module for the Tuners

    x, dt = _inputs(key)
    return lambda config: launch_softmax_fwd(x, 1, key.log, dt, config=config)


def _bwd_runner(key: SoftmaxKey):
    """A launch of the backward kernel on y (the forward's output) and a random dy."""
    from ..ops.softmax import launch_softmax_bwd, launch_softmax_fwd

    x, dt = _inputs(key)
    y = launch_softmax_fwd(x, 1, key.log, dt)
    dy = torch.randn_like(y)
    return lambda config: launch_softmax_bwd(y, dy, 1, key.log, dt, config=config)


SOFTMAX_TUNER = register_tuner(Tuner(
    "softmax", SOFTMAX_SPACE, softmax_heuristic, runner=_runner, problem=_problem, key_type=SoftmaxKey,
    sources=[_softmax_fwd_kernel], shipped=SHIPPED_CONFIGS))

SOFTMAX_BWD_TUNER = register_tuner(Tuner(
    "softmax_bwd", SOFTMAX_SPACE, softmax_bwd_heuristic, runner=_bwd_runner, problem=_problem,
    key_type=SoftmaxKey,
    sources=[_softmax_bwd_kernel], shipped=SHIPPED_CONFIGS))


# --------------------------------------------------------------------------- the `autotune` command


def _tune_keys(log: bool):
    def keys(shape: tuple, dtype: str):
        """Forward and backward over the last dim of a contiguous (rows, cols): one key."""
        check_dtype(dtype, TUNE_DTYPES)
        rows, cols = shape
        key = softmax_key(cols, rows, dtype, False, log)
        return [(SOFTMAX_TUNER, key), (SOFTMAX_BWD_TUNER, key)]
    return keys


register(TunableOp("softmax", "ROWSxCOLS", _tune_keys(False), {"llm": LLM_ROWS_COLS, "smoke": [(33, 100)]},
                   help="softmax over the last dim of (ROWS, COLS), forward and backward"))
register(TunableOp("log_softmax", "ROWSxCOLS", _tune_keys(True), {"llm": LLM_ROWS_COLS, "smoke": [(33, 100)]},
                   help="log_softmax over the last dim of (ROWS, COLS), forward and backward"))
