"""A kernel configuration: meta-parameters, launch options and host parameters, stored as data."""

from __future__ import annotations

import json
from typing import Any, Mapping

LAUNCH_FIELDS = ("num_warps", "num_stages")
HOST_FIELD = "host"  # the key of the host parameters in to_dict(); never a meta-parameter name


def _typed(values: Mapping[str, Any]) -> tuple:
    return tuple((name, value, type(value).__name__) for name, value in sorted(values.items()))


def _check_scalars(group: str, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float, str, bool)):
            raise ValueError(f"config {group} {name!r} has a non-scalar value {value!r}")


class Config:
    """Three groups of tuned values:

    meta:      constexpr kernel arguments, passed to the kernel (`launch_kwargs()`);
    launch:    `num_warps` and `num_stages`, passed to the kernel launch;
    host:      parameters the launcher uses on the host and never passes to the kernel,
               e.g. PROGRAMS_PER_SM, from which it computes a persistent grid's size.

    `config[name]` finds a name in any group. Immutable and hashable; round-trips through
    JSON by field names, e.g. ``{"BLOCK_M": 128, "num_warps": 4, "num_stages": 3,
    "host": {"PROGRAMS_PER_SM": 2}}`` (the "host" item only when there are host parameters).
    """

    __slots__ = ("_meta", "num_warps", "num_stages", "_host", "_key")

    def __init__(self, meta: Mapping[str, Any] | None = None, num_warps: int = 4, num_stages: int = 3,
                 host: Mapping[str, Any] | None = None):
        meta = dict(meta or {})
        host = dict(host or {})
        for name in LAUNCH_FIELDS:
            if name in meta or name in host:
                raise ValueError(f"{name} is a launch option, not a meta-parameter or host parameter")
        if HOST_FIELD in meta or HOST_FIELD in host:
            raise ValueError(f"{HOST_FIELD!r} names the host parameter group; it cannot be a parameter")
        both = sorted(set(meta) & set(host))
        if both:
            raise ValueError(f"{both} cannot be both meta-parameters and host parameters")
        object.__setattr__(self, "_meta", meta)
        object.__setattr__(self, "num_warps", int(num_warps))
        object.__setattr__(self, "num_stages", int(num_stages))
        object.__setattr__(self, "_host", host)
        # host last: configs without host parameters keep the order they always had. Each value
        # with its type: 64, 64.0 and true are three configs (a kernel takes only one of them).
        object.__setattr__(self, "_key", (_typed(meta), self.num_warps, self.num_stages, _typed(host)))

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable")

    @property
    def meta(self) -> dict:
        """The meta-parameters, as a fresh dict (safe to pass as **kwargs)."""
        return dict(self._meta)

    @property
    def host(self) -> dict:
        """The host parameters, as a fresh dict."""
        return dict(self._host)

    def __getitem__(self, name: str) -> Any:
        if name in LAUNCH_FIELDS:
            return getattr(self, name)
        if name in self._meta:
            return self._meta[name]
        return self._host[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def replace(self, **changes: Any) -> "Config":
        """A copy with `changes`; a name stays in the group it is in (a new name is a meta-parameter)."""
        meta = dict(self._meta)
        host = dict(self._host)
        launch = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        for name, value in changes.items():
            (launch if name in LAUNCH_FIELDS else host if name in host else meta)[name] = value
        return Config(meta, **launch, host=host)

    def launch_kwargs(self) -> dict:
        """Keyword arguments for `kernel[grid](..., **config.launch_kwargs())`: no host parameters."""
        return {**self._meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_dict(self) -> dict:
        out = self.launch_kwargs()
        if self._host:
            out[HOST_FIELD] = dict(self._host)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        data = dict(data)
        num_warps = data.pop("num_warps", 4)
        num_stages = data.pop("num_stages", 3)
        for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
            if isinstance(value, bool) or not isinstance(value, int):  # never 8.5 -> 8, "8" -> 8, true -> 1
                raise ValueError(f"config {name} must be a whole number, not {value!r}")
        host = data.pop(HOST_FIELD, None)
        if host is not None and not isinstance(host, Mapping):
            raise ValueError(f"config {HOST_FIELD!r} must map host parameter names to values, not {host!r}")
        host = dict(host or {})
        _check_scalars("field", data)
        _check_scalars("host parameter", host)
        return cls(data, num_warps=num_warps, num_stages=num_stages, host=host)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __lt__(self, other: "Config") -> bool:
        return self._key < other._key

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in sorted(self._meta.items()))
        host = f", host={dict(sorted(self._host.items()))!r}" if self._host else ""
        return f"Config({fields}, num_warps={self.num_warps}, num_stages={self.num_stages}{host})"
