"""A search space: value lists per parameter, constraints, and pruning for a device."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

from .config import Config

Problem = Mapping[str, Any]
Constraint = Callable[[Config, Problem], bool]


class Space:
    """The candidate configs of one kernel.

    params:        meta-parameter -> values, in the order that breaks ties (smaller first).
    num_warps, num_stages: launch option values.
    host_params:   host parameter -> values (see Config: used by the launcher, never passed
                   to the kernel, e.g. PROGRAMS_PER_SM); tie-broken after params.
    constraints:   predicates (config, problem) -> bool; a config failing one is dropped.
    smem_bytes:    (config, problem) -> shared memory the config needs; dropped above the device's limit.
    block_dims:    meta-parameter -> problem dim it tiles; a block more than the next power of
                   two of that dim (the smallest block covering it) is dropped.
    dot_params:    meta-parameters that are `tl.dot` operand sizes: must be at least 16.
    version:       bump it when the meaning of a config changes; cached winners of an
                   older version are then ignored. Editing value lists needs no bump.
    """

    def __init__(self, params: Mapping[str, Sequence[Any]], num_warps: Sequence[int] = (4, 8),
                 num_stages: Sequence[int] = (3,), constraints: Sequence[Constraint] = (),
                 smem_bytes: Callable[[Config, Problem], int] | None = None,
                 block_dims: Mapping[str, str] | None = None, dot_params: Sequence[str] = (),
                 version: int = 1, host_params: Mapping[str, Sequence[Any]] | None = None):
        self.params = {k: list(v) for k, v in params.items()}
        self.host_params = {k: list(v) for k, v in (host_params or {}).items()}
        both = sorted(set(self.params) & set(self.host_params))
        if both:
            raise ValueError(f"{both} cannot be both meta-parameters and host parameters")
        self.num_warps = list(num_warps)
        self.num_stages = list(num_stages)
        self.constraints = list(constraints)
        self.smem_bytes = smem_bytes
        self.block_dims = dict(block_dims or {})
        self.dot_params = list(dot_params)
        self.version = version

    def all_configs(self) -> list[Config]:
        names, host_names = list(self.params), list(self.host_params)
        out = []
        for values in itertools.product(*self.params.values(), *self.host_params.values(), self.num_warps,
                                        self.num_stages):
            *tuned, warps, stages = values
            meta, host = tuned[:len(names)], tuned[len(names):]
            out.append(Config(dict(zip(names, meta)), num_warps=warps, num_stages=stages,
                              host=dict(zip(host_names, host))))
        return out

    def valid(self, config: Config, problem: Problem | None = None, limits: Mapping[str, Any] | None = None) -> bool:
        """The config passes the space's rules for `problem` on a device with `limits`."""
        return self.broken_rule(config, problem, limits) is None

    def broken_rule(self, config: Config, problem: Problem | None = None,
                    limits: Mapping[str, Any] | None = None) -> str | None:
        """The first rule the config breaks for `problem` on a device with `limits`, or None."""
        problem = problem or {}
        for name in self.dot_params:
            if config[name] < 16:
                return f"{name} {config[name]} is under 16, the smallest tl.dot"
        for name, dim in self.block_dims.items():
            if dim in problem and config[name] > max(16, _next_pow2(problem[dim])):
                return f"{name} {config[name]} is past {dim} = {problem[dim]}"
        if self.smem_bytes is not None and limits is not None:
            if self.smem_bytes(config, problem) > limits["max_shared_mem"]:
                return f"it needs more shared memory than the device's {limits['max_shared_mem']} bytes"
        if limits is not None and config.num_warps * limits.get("warp_size", 32) > 1024:
            return f"{config.num_warps} warps are more threads than a block may have"
        for rule in self.constraints:
            if not rule(config, problem):
                return f"it breaks the rule {getattr(rule, '__name__', rule)!r}"
        return None

    def check(self, config: Config, problem: Problem | None = None,
              limits: Mapping[str, Any] | None = None, rules: bool = True) -> str | None:
        """Why `config` (read from a file, say) is not one of this space's for `problem`, or None:
        exactly the space's parameter names, each value one of its list's, of the same type (64,
        never 64.0, "64" or true), and, with `rules`, the rules (`broken_rule`). Without them
        for a config of another device, whose rules (capability, SM count) this one cannot judge."""
        why = self._check_fields(config)
        if why is not None or not rules:
            return why
        try:
            return self.broken_rule(config, problem, limits)
        except Exception as e:  # noqa: BLE001 - a rule the values make fail: the config is not one of ours
            return f"the space's rules cannot judge it ({type(e).__name__}: {e})"

    def _check_fields(self, config: Config) -> str | None:
        for group, have, want in (("meta-parameter", config.meta, self.params),
                                  ("host parameter", config.host, self.host_params)):
            unknown, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            if unknown:
                return f"unknown {group}(s) {unknown}"
            if missing:
                return f"missing {group}(s) {missing}"
        return self._check_values(config)

    def _check_values(self, config: Config) -> str | None:
        axes = {**self.params, **self.host_params, "num_warps": self.num_warps, "num_stages": self.num_stages}
        for name, values in axes.items():
            value = config.get(name)
            if value is None:  # a field this config lacks (a config list's configs may differ in fields)
                continue
            if not any(type(value) is type(v) and value == v for v in values):
                return f"{name} = {value!r} is not one of {values}"
        return None

    def configs(self, problem: Problem | None = None, limits: Mapping[str, Any] | None = None) -> list[Config]:
        """The configs that can run `problem` on a device with `limits`, in tie-break order."""
        return sorted((c for c in self.all_configs() if self.valid(c, problem, limits)), key=self.order)

    def order(self, config: Config) -> tuple:
        """The fixed tie-break order: parameters as listed (smaller first), then host parameters,
        then warps, then stages."""
        return (tuple(config[name] for name in self.params) + tuple(config[name] for name in self.host_params)
                + (config.num_warps, config.num_stages))

    def neighbours(self, config: Config) -> list[Config]:
        """Configs that differ from `config` in one parameter (of any group) by one step of its value list."""
        out = []
        axes = {**self.params, **self.host_params, "num_warps": self.num_warps, "num_stages": self.num_stages}
        for name, values in axes.items():
            try:
                i = values.index(config[name])
            except (ValueError, KeyError):
                continue
            for j in (i - 1, i + 1):
                if 0 <= j < len(values):
                    out.append(config.replace(**{name: values[j]}))
        return out


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class ConfigList(Space):
    """A space given as an explicit list of configs (as `triton.autotune` takes them).

    The list's order is the tie-break order; neighbours differ in one field.
    """

    def __init__(self, configs, version: int = 1, **kwargs):
        configs = [as_config(c) for c in configs]
        if not configs:
            raise ValueError("a config list needs at least one config")
        names = sorted({n for c in configs for n in c.meta})
        host_names = sorted({n for c in configs for n in c.host})
        values = lambda n: sorted({c.get(n) for c in configs if c.get(n) is not None})  # noqa: E731
        super().__init__({n: values(n) for n in names},
                         num_warps=sorted({c.num_warps for c in configs}),
                         num_stages=sorted({c.num_stages for c in configs}), version=version,
                         host_params={n: values(n) for n in host_names}, **kwargs)
        self._configs = configs
        self._index = {c: i for i, c in enumerate(configs)}

    def all_configs(self):
        return list(self._configs)

    def _check_fields(self, config):
        """One of the listed configs: the only ones the list's author vouched for (a mix of
        listed values may not compile or may compute something else)."""
        if config in self._index:
            return None
        return "it is not one of the listed configs"

    def order(self, config):
        return (self._index.get(config, len(self._index)),) + super().order(config)

    def neighbours(self, config):
        fields = lambda c: {**c.meta, **c.host, "num_warps": c.num_warps, "num_stages": c.num_stages}  # noqa: E731
        mine = fields(config)
        return [c for c in self._configs
                if sum(1 for k, v in fields(c).items() if mine.get(k) != v) == 1]


def as_config(c) -> Config:
    """An autotune.Config from itself, a dict (as `Config.to_dict` writes it), or a triton.Config."""
    if isinstance(c, Config):
        return c
    if isinstance(c, dict):
        return Config.from_dict(c)
    if hasattr(c, "kwargs") and hasattr(c, "num_warps"):  # triton.Config
        return Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
    raise TypeError(f"not a config: {c!r}")
