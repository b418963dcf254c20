"""Config choice of the norm kernels (layer_norm and rms_norm, forward and backward): the
keys, the heuristic defaults, the search spaces, the tuning runners, the Tuners and the
`autotune` ops."""

from typing import NamedTuple

import torch
import triton

from autotune import Config, Space, TunableOp, Tuner, bucket, register, register_tuner

from .. import runtime
from ..kernels.norm import _norm_bwd_kernel, _norm_fwd_kernel
from .common import ITEMSIZE, SHIPPED_CONFIGS, check_dtype, dtype_name, tuning_device
from .rows import (COL_BLOCKS, LLM_ROWS_COLS, ROW_BLOCKS, ROW_STAGES, ROW_WARPS, TUNE_DTYPES, WHOLE_ROW_BWD,
                   WHOLE_ROW_FWD, row_tile_config, row_tile_rules)


class NormKey(NamedTuple):
    """A problem of the norm forward kernel."""

    N: int  # bucketed normalized size
    ROWS: int  # bucketed number of rows
    dtype: str
    rms: bool  # rms_norm (no mean, no bias)
    has_weight: bool


class NormBwdKey(NamedTuple):
    """A problem of the norm backward kernel: NormKey and whether weight / bias gradients are
    reduced (the part buffers and the persistent grid's height then matter)."""

    N: int
    ROWS: int
    dtype: str
    rms: bool
    has_weight: bool
    param_grads: bool


def norm_key(n_cols: int, n_rows: int, dtype: torch.dtype | str, rms: bool, has_weight: bool) -> NormKey:
    return NormKey(bucket(n_cols), bucket(n_rows), dtype_name(dtype), bool(rms), bool(has_weight))


def norm_bwd_key(n_cols: int, n_rows: int, dtype: torch.dtype | str, rms: bool, has_weight: bool,
                 param_grads: bool) -> NormBwdKey:
    return NormBwdKey(*norm_key(n_cols, n_rows, dtype, rms, has_weight), bool(param_grads))


def norm_heuristic(key: NormKey | NormBwdKey) -> Config:
    """The default config of _norm_fwd_kernel (layer_norm and rms_norm): row_tile_config
    for unit-stride rows (the launchers read rows through their strides, but the normalized
    dims are the inner ones), whole rows up to WHOLE_ROW_FWD (32K 2-byte elements over 32 warps)."""
    return row_tile_config(key.N, key.ROWS, ITEMSIZE[key.dtype], False, WHOLE_ROW_FWD)


DEFAULT_PROGRAMS_PER_SM = 2


def norm_bwd_heuristic(key: NormBwdKey) -> Config:
    """The default config of _norm_bwd_kernel: row_tile_config with whole rows up to
    WHOLE_ROW_BWD (16K: beyond it x, dy and the weight / bias column sums spill), and
    PROGRAMS_PER_SM = 2, which sets the persistent grid (min(row blocks, PROGRAMS_PER_SM x
    SMs) programs), hence the height of the fp32 weight/bias partial-sum buffers the second
    stage reduces."""
    tile = row_tile_config(key.N, key.ROWS, ITEMSIZE[key.dtype], False, WHOLE_ROW_BWD)
    return Config(tile.meta, tile.num_warps, tile.num_stages, host={"PROGRAMS_PER_SM": DEFAULT_PROGRAMS_PER_SM})


def _problem(key: NormKey | NormBwdKey) -> dict:
    return {"N": key.N, "ROWS": key.ROWS, "itemsize": ITEMSIZE[key.dtype],
            "sms": runtime.device_properties()["multiprocessor_count"]}


def _grid_changes(config: Config, problem: dict) -> bool:
    """PROGRAMS_PER_SM past the default only where it still adds programs (row blocks to share out)."""
    if config["PROGRAMS_PER_SM"] <= DEFAULT_PROGRAMS_PER_SM or "ROWS" not in problem:
        return True
    return triton.cdiv(problem["ROWS"], config["BLOCK_R"]) > config["PROGRAMS_PER_SM"] // 2 * problem["sms"]


NORM_SPACE = Space(
    {"BLOCK_R": ROW_BLOCKS, "BLOCK_N": COL_BLOCKS}, num_warps=ROW_WARPS, num_stages=ROW_STAGES,
    block_dims={"BLOCK_R": "ROWS", "BLOCK_N": "N"}, constraints=row_tile_rules(), version=3)

NORM_BWD_SPACE = Space(
    {"BLOCK_R": ROW_BLOCKS, "BLOCK_N": COL_BLOCKS}, host_params={"PROGRAMS_PER_SM": [1, 2, 4, 8]},
    num_warps=ROW_WARPS, num_stages=ROW_STAGES, block_dims={"BLOCK_R": "ROWS", "BLOCK_N": "N"},
    constraints=[*row_tile_rules(), _grid_changes], version=3)


def _inputs(key: NormKey | NormBwdKey):
    """x (rows, N), and weight / bias (N,) as the key has them (a bias only for layer_norm)."""
    device = tuning_device()
    dt = getattr(torch, key.dtype)
    x = torch.randn((key.ROWS, key.N), device=device, dtype=dt) * 2 + 0.5
    w = torch.randn(key.N, device=device, dtype=dt) if key.has_weight else None
    b = torch.randn(key.N, device=device, dtype=dt) if key.has_weight and not key.rms else None
    return x, w, b


def _runner(key: NormKey):
    """A launch of the forward kernel on inputs built for `key`, into fresh outputs."""
    from ..ops.norm import launch_norm_fwd  # the ops import this module for the Tuners

    x, w, b = _inputs(key)
    return lambda config: tuple(t for t in launch_norm_fwd(x, w, b, 1e-5, key.rms, config=config) if t is not None)


def _bwd_runner(key: NormBwdKey):
    """A launch of the backward kernel on the forward's statistics and a random dy;
    returns dx and, when the key asks for them, the weight / bias gradients."""
    from ..ops.norm import launch_norm_bwd, launch_norm_fwd

    x, w, b = _inputs(key)
    _, mean, rstd = launch_norm_fwd(x, w, b, 1e-5, key.rms)
    dy = torch.randn_like(x)
    weight_grad, bias_grad = key.param_grads and w is not None, key.param_grads and not key.rms

    def launch(config: Config):
        outs = launch_norm_bwd(dy, x, w, mean, rstd, weight_grad, bias_grad, config=config)
        return tuple(t for t in outs if t is not None)

    return launch


NORM_TUNER = register_tuner(Tuner(
    "norm", NORM_SPACE, norm_heuristic, runner=_runner, problem=_problem, key_type=NormKey,
    sources=[_norm_fwd_kernel], shipped=SHIPPED_CONFIGS))

NORM_BWD_TUNER = register_tuner(Tuner(
    "norm_bwd", NORM_BWD_SPACE, norm_bwd_heuristic, runner=_bwd_runner, problem=_problem, key_type=NormBwdKey,
    sources=[_norm_bwd_kernel], shipped=SHIPPED_CONFIGS))


# --------------------------------------------------------------------------- the `autotune` command


def _tune_keys(rms: bool):
    def keys(shape: tuple, dtype: str):
        """Forward and backward of (rows, cols) normalized over cols, with a weight (and for
        layer_norm a bias) that takes gradients."""
        check_dtype(dtype, TUNE_DTYPES)
        rows, cols = shape
        return [(NORM_TUNER, norm_key(cols, rows, dtype, rms, True)),
                (NORM_BWD_TUNER, norm_bwd_key(cols, rows, dtype, rms, True, True))]
    return keys


register(TunableOp("layer_norm", "ROWSxCOLS", _tune_keys(False), {"llm": LLM_ROWS_COLS, "smoke": [(33, 100)]},
                   help="layer_norm of (ROWS, COLS) over COLS with weight and bias, forward and backward"))
register(TunableOp("rms_norm", "ROWSxCOLS", _tune_keys(True), {"llm": LLM_ROWS_COLS, "smoke": [(33, 100)]},
                   help="rms_norm of (ROWS, COLS) over COLS with a weight, forward and backward"))
