"""The environment variables autotune reads, in one place.

    setting     variable             when unset
    cache_dir   AUTOTUNE_CACHE_DIR   ~/.cache/autotune
    mode        AUTOTUNE_MODE        "on" with a GPU, "off" without (see tuner.default_mode)
    record      AUTOTUNE_RECORD      no trace is written
    plugins     AUTOTUNE_PLUGINS     only the `autotune.plugins` entry points are imported

A package built on autotune can give a setting names of its own and a default:

    settings.alias("cache_dir", "MYPKG_CACHE_DIR")     # read after AUTOTUNE_CACHE_DIR
    settings.set_default("cache_dir", "~/.cache/mypkg")

The variables are read at every lookup, never once at import: a program (or a
test) may set them after importing autotune and the change takes effect at once.
An empty (or blank) value counts as unset.
"""

from __future__ import annotations

import os

VARIABLES = {
    "cache_dir": "AUTOTUNE_CACHE_DIR",
    "mode": "AUTOTUNE_MODE",
    "record": "AUTOTUNE_RECORD",
    "plugins": "AUTOTUNE_PLUGINS",
}

_BUILTIN_DEFAULTS: dict[str, str | None] = {"cache_dir": "~/.cache/autotune", "mode": None, "record": None,
                                            "plugins": None}
_aliases: dict[str, list[str]] = {name: [] for name in VARIABLES}
_defaults: dict[str, str | None] = dict(_BUILTIN_DEFAULTS)


def _known(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"autotune has no setting {name!r}; it has {sorted(VARIABLES)}")
    return name


def variable(name: str) -> str:
    """The AUTOTUNE_ variable of a setting: the one that wins over every alias."""
    return VARIABLES[_known(name)]


def variables(name: str) -> list[str]:
    """Every variable of a setting, in the order they are looked up."""
    return [VARIABLES[_known(name)], *_aliases[name]]


def alias(name: str, env_var: str) -> None:
    """Read `env_var` too for setting `name`, after the AUTOTUNE_ variable and any earlier alias.
    Registering the same alias twice changes nothing (a package may be imported twice)."""
    if env_var not in variables(name):
        _aliases[name].append(env_var)


def set_default(name: str, value: str | os.PathLike | None) -> None:
    """The value of setting `name` when none of its variables is set (None: autotune's own)."""
    name = _known(name)
    _defaults[name] = os.fspath(value) if value is not None else _BUILTIN_DEFAULTS[name]


def default(name: str) -> str | None:
    """The setting's value when none of its variables is set (a package's, else autotune's own)."""
    return _defaults[_known(name)]


def lookup(name: str) -> tuple[str | None, str | None]:
    """(value, the variable it came from); the variable is None when the value is the default."""
    for env_var in variables(name):
        value = os.environ.get(env_var, "")
        if value.strip():
            return value, env_var
    return _defaults[name], None


def get(name: str) -> str | None:
    """The setting's value: its first variable that is set, else its default (None if it has none)."""
    return lookup(name)[0]


def describe(name: str) -> str:
    """Where the setting is read from, for help texts: 'AUTOTUNE_MODE (or MYPKG_MODE)'."""
    first, *rest = variables(name)
    return f"{first} (or {', '.join(rest)})" if rest else first
