"""`@autotune.autotune`: triton.autotune's interface, with this package's cache and search.

    @autotune.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4), ...], key=["n"])
    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr): ...

    add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n)

The grid callable sees the kernel's arguments, the config's meta-parameters and its
host parameters (a Space's `host_params`); the kernel gets no host parameter.

The key is the values of the `key` arguments (those named in `bucket` rounded up
to a power of two) and the dtypes of the tensor arguments. Tuning runs on copies
of the tensor arguments, so the caller's tensors are written only once, by the
winning config.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from .config import Config
from .registry import register_tuner
from .space import ConfigList, Space, as_config
from .tuner import Tuner, bucket, default_check


class Autotuned:
    def __init__(self, fn, configs, key, bucket_args, space, strategy, name, default, **tuner_kwargs):
        self.fn = fn
        self.arg_names = list(getattr(fn, "arg_names", None) or inspect.signature(getattr(fn, "fn", fn)).parameters)
        self.key_names = list(key)
        self.bucket_args = set(bucket_args)
        unknown = [k for k in [*self.key_names, *self.bucket_args] if k not in self.arg_names]
        if unknown:
            raise ValueError(f"autotune: {unknown} are not arguments of {self.arg_names}")
        if space is None:
            if not configs:
                raise ValueError("autotune: give configs= or space=")
            space = ConfigList(configs)
        self.space: Space = space
        first = space.configs()[0] if default is None else None
        self.tuner = register_tuner(Tuner(
            name or getattr(getattr(fn, "fn", fn), "__name__", "kernel"), space,
            default if default is not None else (lambda key: first),
            sources=[fn], strategy=strategy, **tuner_kwargs))

    def key(self, bound: dict) -> tuple:
        key = []
        for name in self.key_names:
            value = bound[name]
            key.append(bucket(value) if name in self.bucket_args else value)
        key += [str(v.dtype).replace("torch.", "") for v in bound.values() if hasattr(v, "dtype")]
        return tuple(key)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.arg_names, args))
            bound.update(kwargs)
            key = self.key(bound)
            config = self.tuner._memo.get(key)
            if config is None:  # first call for this key: tuning (if on) runs on copies of these arguments
                self.tuner.runner = lambda _key: self._scratch_launcher(grid, bound)
                config = self.tuner.select(key)
            return self._launch(grid, bound, config)

        return launch

    def _launch(self, grid, bound: dict, config: Config):
        # the grid sees host parameters (they size it, e.g. a persistent grid); the kernel never does
        meta = {**bound, **config.meta, **config.host}
        g = grid(meta) if callable(grid) else grid
        return self.fn[g](**bound, **config.launch_kwargs())

    def _scratch_launcher(self, grid, bound: dict):
        import torch

        scratch = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}
        originals = {k: v.clone() for k, v in scratch.items() if isinstance(v, torch.Tensor)}
        outputs = list(originals)

        def run(config: Config):
            for k in outputs:  # every run starts from the caller's values
                scratch[k].copy_(originals[k])
            self._launch(grid, scratch, config)
            return tuple(scratch[k] for k in outputs)

        return run


def autotune(configs: Sequence[Any] | None = None, key: Sequence[str] = (), *, bucket: Sequence[str] = (),
             space: Space | None = None, strategy: str = "exhaustive", name: str | None = None,
             default=None, check=default_check, **tuner_kwargs):
    """Decorate a @triton.jit kernel; `configs` may be triton.Config, autotune.Config or dicts."""
    configs = [as_config(c) for c in configs] if configs else None

    def decorator(fn):
        return Autotuned(fn, configs, key, bucket, space, strategy, name, default, check=check, **tuner_kwargs)

    return decorator
