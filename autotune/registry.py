"""Tunable ops that the `autotune` command knows by name.

A package fills the registry when imported; the command imports the packages
named by the entry point group `autotune.plugins` (and by $AUTOTUNE_PLUGINS,
comma-separated module names) before it looks an op up.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

from .tuner import Tuner


@dataclass
class TunableOp:
    """name:    what the command calls it (`autotune tune matmul`).
    dims:       the shape's dims as written on the command line, e.g. "MxNxK".
    keys:       (shape tuple, dtype name) -> [(tuner, key), ...] to tune for that shape.
    presets:    preset name -> shapes.
    dtypes:     the dtypes tuned when none is given.
    help:       one line for `autotune tune --help`.
    """

    name: str
    dims: str
    keys: Callable[[tuple, str], list[tuple[Tuner, tuple]]]
    presets: dict[str, list[tuple]] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    help: str = ""


REGISTRY: dict[str, TunableOp] = {}
TUNERS: dict[str, Tuner] = {}


def register(op: TunableOp) -> None:
    REGISTRY[op.name] = op


def register_tuner(tuner: Tuner) -> Tuner:
    """Make a tuner known (for `show`, trace replay and rank sharing); returns it."""
    TUNERS[tuner.name] = tuner
    return tuner


def load_plugins() -> list[str]:
    """Import every plugin package; returns the names that failed to import, with why."""
    names = [ep.value for ep in metadata.entry_points(group="autotune.plugins")]
    names += [n.strip() for n in os.environ.get("AUTOTUNE_PLUGINS", "").split(",") if n.strip()]
    failed = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported by the command
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed
