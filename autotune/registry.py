"""Tunable ops that the `autotune` command knows by name.

A package fills the registry when imported; the command imports the packages
named by the entry point group `autotune.plugins` (and by $AUTOTUNE_PLUGINS,
comma-separated module names) before it looks an op up.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator

from . import settings
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
    names += [n.strip() for n in (settings.get("plugins") or "").split(",") if n.strip()]
    failed = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported by the command
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed


@contextlib.contextmanager
def override(tuners: Iterable[Tuner | str] | None = None, **fields: Any) -> Iterator[list[Tuner]]:
    """`Tuner.override(**fields)` on several tuners at once, for a `with` block:

        with autotune.override(mode="off"):        # every registered tuner
            ...
        with autotune.override([MY_TUNER, "matmul"], cache_dir=tmp, max_evals=4):
            ...

    tuners: Tuner objects or registered names; None: every tuner in TUNERS at entry.
    Fields are checked as Tuner.override checks them, before any tuner changes.
    """
    Tuner.check_override(fields)  # also when no tuner is chosen: a typo is an error everywhere
    if tuners is None:
        chosen = list(TUNERS.values())
    else:
        chosen = []
        for t in tuners:
            if isinstance(t, str):
                if t not in TUNERS:
                    raise KeyError(f"no registered tuner {t!r}; known: {sorted(TUNERS)}")
                t = TUNERS[t]
            chosen.append(t)
    chosen = list(dict.fromkeys(chosen))  # a tuner named twice is overridden once
    with contextlib.ExitStack() as stack:  # on exit, or on an error entering one, every entered one is restored
        for t in chosen:
            stack.enter_context(t.override(**fields))
        yield chosen
