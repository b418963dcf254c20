"""A kernel configuration: meta-parameters plus launch options, stored as data."""

from __future__ import annotations

import json
from typing import Any, Mapping

LAUNCH_FIELDS = ("num_warps", "num_stages")


class Config:
    """Meta-parameters (constexpr kernel arguments) plus `num_warps` and `num_stages`.

    Immutable and hashable; round-trips through JSON by field names, e.g.
    ``{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}``.
    """

    __slots__ = ("_meta", "num_warps", "num_stages", "_key")

    def __init__(self, meta: Mapping[str, Any] | None = None, num_warps: int = 4, num_stages: int = 3):
        meta = dict(meta or {})
        for name in LAUNCH_FIELDS:
            if name in meta:
                raise ValueError(f"{name} is a launch option, not a meta-parameter")
        object.__setattr__(self, "_meta", meta)
        object.__setattr__(self, "num_warps", int(num_warps))
        object.__setattr__(self, "num_stages", int(num_stages))
        object.__setattr__(self, "_key", (tuple(sorted(meta.items())), self.num_warps, self.num_stages))

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable")

    @property
    def meta(self) -> dict:
        """The meta-parameters, as a fresh dict (safe to pass as **kwargs)."""
        return dict(self._meta)

    def __getitem__(self, name: str) -> Any:
        if name in LAUNCH_FIELDS:
            return getattr(self, name)
        return self._meta[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def replace(self, **changes: Any) -> "Config":
        meta = dict(self._meta)
        launch = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        for name, value in changes.items():
            (launch if name in LAUNCH_FIELDS else meta)[name] = value
        return Config(meta, **launch)

    def launch_kwargs(self) -> dict:
        """Keyword arguments for `kernel[grid](..., **config.launch_kwargs())`."""
        return {**self._meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_dict(self) -> dict:
        return self.launch_kwargs()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        data = dict(data)
        num_warps = data.pop("num_warps", 4)
        num_stages = data.pop("num_stages", 3)
        for name, value in data.items():
            if not isinstance(value, (int, float, str, bool)) or value is None:
                raise ValueError(f"config field {name!r} has a non-scalar value {value!r}")
        return cls(data, num_warps=num_warps, num_stages=num_stages)

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
        return f"Config({fields}, num_warps={self.num_warps}, num_stages={self.num_stages})"
