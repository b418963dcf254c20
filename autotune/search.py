"""Search strategies behind one ask/tell interface.

    strategy = make_strategy("local", configs, start=default, neighbours=space.neighbours, max_evals=40)
    while (config := strategy.ask()) is not None:
        strategy.tell(config, time_ms_or_None_if_it_failed)

Each has a budget in evaluations (`max_evals`) and/or seconds (`max_seconds`).
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from .config import Config


class Strategy:
    name = "base"

    def __init__(self, configs: Sequence[Config], *, start: Config | None = None,
                 neighbours: Callable[[Config], list[Config]] | None = None,
                 max_evals: int | None = None, max_seconds: float | None = None, seed: int = 0):
        self.configs = list(configs)
        self.allowed = set(self.configs)
        self.start = start if start in self.allowed else (self.configs[0] if self.configs else None)
        self.neighbours = neighbours
        self.max_evals = max_evals
        self.max_seconds = max_seconds
        self.rng = random.Random(seed)
        self.results: dict[Config, float | None] = {}  # config -> ms, None if it failed
        self._t0 = time.monotonic()

    # ask/tell ------------------------------------------------------------
    def ask(self) -> Config | None:
        if self.max_evals is not None and len(self.results) >= self.max_evals:
            return None
        if self.max_seconds is not None and time.monotonic() - self._t0 >= self.max_seconds:
            return None
        return self._next()

    def tell(self, config: Config, ms: float | None) -> None:
        self.results[config] = ms

    def _next(self) -> Config | None:
        raise NotImplementedError

    # results -------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        return len(self.results)

    def best(self) -> tuple[Config, float] | None:
        ok = [(ms, c) for c, ms in self.results.items() if ms is not None]
        if not ok:
            return None
        ms, config = min(ok, key=lambda t: t[0])
        return config, ms


class Exhaustive(Strategy):
    """Every config, in the space's order."""

    name = "exhaustive"

    def _next(self):
        return next((c for c in self.configs if c not in self.results), None)


class RandomSample(Strategy):
    """A seeded random sample; the start config (the heuristic default) first."""

    name = "random"

    def __init__(self, configs, **kwargs):
        super().__init__(configs, **kwargs)
        rest = [c for c in self.configs if c != self.start]
        self.rng.shuffle(rest)
        self._order = ([self.start] if self.start is not None else []) + rest

    def _next(self):
        return next((c for c in self._order if c not in self.results), None)


class CoordinateDescent(Strategy):
    """Local search: from the start config, time every untried neighbour (one parameter one
    step away), move to the best, and stop when no neighbour is faster. A failed start falls
    back to the next config in the space's order."""

    name = "local"

    def __init__(self, configs, **kwargs):
        super().__init__(configs, **kwargs)
        if self.neighbours is None:
            raise ValueError("the local search needs a neighbours function (Space.neighbours)")

    def _next(self):
        best = self.best()
        if best is None:  # nothing has run yet, or everything so far failed
            return next((c for c in [self.start, *self.configs] if c is not None and c not in self.results), None)
        for n in self.neighbours(best[0]):
            if n in self.allowed and n not in self.results:
                return n
        return None  # a local minimum: every neighbour of the best has been timed


STRATEGIES = {cls.name: cls for cls in (Exhaustive, RandomSample, CoordinateDescent)}


def make_strategy(name: str, configs: Sequence[Config], **kwargs) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}") from None
    return cls(configs, **kwargs)
