"""Search strategies behind one ask/tell interface.

    strategy = make_strategy("bayes", configs, start=default, neighbours=space.neighbours, max_evals=40)
    while (config := strategy.ask()) is not None:
        strategy.tell(config, time_ms_or_None_if_it_failed)

Each has a budget in evaluations (`max_evals`) and/or seconds (`max_seconds`), is
deterministic for a `seed`, and asks only for configs of its list, each at most once.
Every strategy but "exhaustive" asks for the start config (the heuristic default)
first, so what it finds is never slower than the default. `pending()` names configs
a strategy expects to ask next (a tuner compiles them ahead of timing).

DEFAULT_STRATEGY is chosen by measurement: `python3 -m perf.replay --table` over real,
brute-forced GPU timing tables (perf/data/kerneltuner), README's autotune section.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from .config import Config


class Strategy:
    name = "base"
    seeded = True  # the seed changes what it asks for (replays run it once per seed)
    # The evaluations a strategy without a natural end makes when given no budget at all.
    default_max_evals: int | None = None

    def __init__(self, configs: Sequence[Config], *, start: Config | None = None,
                 neighbours: Callable[[Config], list[Config]] | None = None,
                 max_evals: int | None = None, max_seconds: float | None = None, seed: int = 0):
        self.configs = list(configs)
        self.allowed = set(self.configs)
        self.start = start if start in self.allowed else (self.configs[0] if self.configs else None)
        self.neighbours = neighbours
        if max_evals is None and max_seconds is None:
            max_evals = self.default_max_evals
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

    def pending(self) -> list[Config]:
        """Configs this strategy currently expects to ask next, most likely first (may be
        empty; what it is told may change them): a tuner compiles them ahead of timing."""
        return []

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
    seeded = False

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

    def pending(self):
        return [c for c in self._order[:len(self.results) + 8] if c not in self.results]


class CoordinateDescent(Strategy):
    """Local search: from the start config, time every untried neighbour (one parameter one
    step away), move to the best, and stop when no neighbour is faster. A failed start falls
    back to the next config in the space's order."""

    name = "local"
    seeded = False

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


def _fields(config: Config) -> dict:
    return {**config.meta, **config.host, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _differences(a: dict, b: dict) -> int:
    return sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class IteratedLocalSearch(Strategy):
    """Local search that does not stop at the first local minimum. It descends from the
    start: the first faster neighbour of the current config becomes current. At a local
    minimum it kicks the best config found so far: an untried config of the list that
    differs from it in KICK fields, chosen at random, from which it descends again
    (whether or not the kick is faster). Without a neighbours function, neighbours are
    the configs of the list that differ in one field."""

    name = "ils"
    default_max_evals = 50  # as "bayes": without a budget it would kick on through the whole list
    KICK = (2, 3)  # fields a kick changes: 1 is a neighbour (already tried at a minimum), more a restart

    def __init__(self, configs, **kwargs):
        super().__init__(configs, **kwargs)
        self._fields = {c: _fields(c) for c in self.configs}
        self._current: Config | None = None  # where the descent is
        self._queue: list[Config] = []  # the current config's neighbours, to try in order
        self._kicked: Config | None = None  # the last kick, not yet told

    def _neighbours(self, config: Config) -> list[Config]:
        if self.neighbours is not None:
            return [n for n in self.neighbours(config) if n in self.allowed]
        mine = self._fields[config]
        return [c for c in self.configs if _differences(mine, self._fields[c]) == 1]

    def tell(self, config, ms):
        super().tell(config, ms)
        if config not in self.allowed:  # told of a config outside the list: recorded, never descended from
            return
        kicked = self._kicked is not None and config == self._kicked
        if kicked:
            self._kicked = None
        if ms is None:
            return
        here = self.results.get(self._current) if self._current is not None else None
        if kicked or here is None or ms < here:
            self._current = config
            self._queue = self._neighbours(config)

    def _next(self):
        if self._current is None and self._kicked is None:  # nothing has worked yet: the start, then in order
            return next((c for c in [self.start, *self.configs] if c is not None and c not in self.results), None)
        self._queue = [c for c in self._queue if c not in self.results]
        if self._queue:
            return self._queue[0]
        return self._kick()

    def _kick(self) -> Config | None:
        untried = [c for c in self.configs if c not in self.results]
        best = self.best()
        if not untried or best is None:
            return untried[0] if untried else None
        mine, want = _fields(best[0]), self.rng.choice(self.KICK)
        by_distance: dict[int, list[Config]] = {}
        for c in untried:
            by_distance.setdefault(_differences(mine, self._fields[c]), []).append(c)
        # the wanted distance, else the nearest one that has untried configs (a small list)
        distance = min(by_distance, key=lambda d: (abs(d - want), d))
        self._kicked = self.rng.choice(by_distance[distance])
        return self._kicked

    def pending(self):
        return [c for c in self._queue if c not in self.results]


class BayesianSearch(Strategy):
    """Model-based search: a Gaussian process over the list's configs, asked where the
    next config most likely beats the best so far.

    It times the start config and INITIAL - 1 configs drawn at random, then, each step,
    fits the process to what it has timed and asks for the untried config of the lowest
    lower confidence bound (predicted time minus BETA standard deviations).
      * Similarity: exp(-distance / LENGTH), where the distance sums, over the fields that
        vary, the step between two values in the field's sorted value list divided by the
        list's span (numbers), or 1 for unequal values (anything else).
      * What is fitted is each config's rank among those timed, as a fraction, capped at
        CLIP: only the fastest CLIP of the configs are told apart (the slow majority's
        exact times would otherwise dominate the fit), and a config that failed ranks last.
    Cost per step: one Cholesky of the timed configs' kernel and a pass over the list,
    milliseconds for lists of thousands (numpy).
    """

    name = "bayes"
    default_max_evals = 50  # its median to within 5% of the best on the replay tables
    INITIAL = 5
    LENGTH = 1.0
    BETA = 1.0
    CLIP = 0.3
    NOISE = 1e-3  # jitter on the kernel's diagonal: equal configs never make it singular
    CHUNK = 512  # candidates whose uncertainty is computed at a time

    def __init__(self, configs, **kwargs):
        super().__init__(configs, **kwargs)
        import numpy as np

        self._np = np
        self._index = {c: i for i, c in enumerate(self.configs)}
        self._numeric, self._categorical = _coordinates(self.configs)
        rest = [c for c in self.configs if c != self.start]
        first = self.rng.sample(rest, min(len(rest), self.INITIAL - (self.start is not None)))
        self._initial = ([self.start] if self.start is not None else []) + first
        self._timed: list[int] = []  # indices into configs, in the order they were told
        self._similarity = np.empty((len(self.configs), 0), dtype=np.float32)  # configs x timed
        self._tried = np.zeros(len(self.configs), dtype=bool)
        self._ranked: list[Config] = []  # the last fit's next candidates

    def tell(self, config, ms):
        new = config not in self.results
        super().tell(config, ms)
        i = self._index.get(config)
        if i is None or not new:
            return
        np = self._np
        distance = np.abs(self._numeric - self._numeric[i]).sum(1) + (self._categorical != self._categorical[i]).sum(1)
        column = np.exp(-distance / self.LENGTH).astype(np.float32)[:, None]
        if self._similarity.shape[1] == len(self._timed):  # grow by doubling: no copy per step
            grown = np.empty((len(self.configs), max(16, 2 * len(self._timed))), dtype=np.float32)
            grown[:, :len(self._timed)] = self._similarity[:, :len(self._timed)]
            self._similarity = grown
        self._similarity[:, len(self._timed)] = column[:, 0]
        self._timed.append(i)
        self._tried[i] = True

    def _next(self):
        for c in self._initial:
            if c not in self.results:
                return c
        if all(ms is None for ms in self.results.values()):  # nothing ran: nothing to learn from yet
            return next((c for c in self.configs if c not in self.results), None)
        if self._tried.all():
            return None
        self._ranked = self._fit()
        return self._ranked[0] if self._ranked else None

    def _fit(self) -> list[Config]:
        np = self._np
        n = len(self._timed)
        times = np.array([self.results[self.configs[i]] if self.results[self.configs[i]] is not None else np.inf
                          for i in self._timed])
        ranks = np.empty(n)
        ranks[np.argsort(times, kind="stable")] = np.arange(n) / n
        y = np.minimum(ranks, self.CLIP)
        y = y - y.mean()
        scale = y.std() or 1.0
        S = self._similarity[:, :n].astype(np.float64)
        L = np.linalg.cholesky(S[self._timed] + self.NOISE * np.eye(n))
        alpha = np.linalg.solve(L.T, np.linalg.solve(L, y))
        mean = S @ alpha
        # the bound is at least mean - BETA * scale (the prior deviation): compute the exact
        # deviation for the candidates of the lowest such floors only, until none can win
        floor = np.where(self._tried, np.inf, mean - self.BETA * scale)
        order = np.argsort(floor, kind="stable")
        best_scores: list[tuple[float, int]] = []
        for start in range(0, len(order), self.CHUNK):
            chunk = order[start:start + self.CHUNK]
            chunk = chunk[np.isfinite(floor[chunk])]
            if not len(chunk) or (len(best_scores) >= 4 and floor[chunk[0]] >= best_scores[3][0]):
                break
            V = np.linalg.solve(L, S[chunk].T)
            sd = np.sqrt(np.maximum(1.0 - (V * V).sum(0), 0.0))
            bound = mean[chunk] - self.BETA * scale * sd
            best_scores = sorted(best_scores + list(zip(bound.tolist(), chunk.tolist())))[:4]
        return [self.configs[i] for _, i in best_scores]

    def pending(self):
        ahead = [c for c in self._initial if c not in self.results]
        return ahead or [c for c in self._ranked[1:] if c not in self.results]


def _coordinates(configs: Sequence[Config]):
    """Each config as coordinates for BayesianSearch: (numeric, categorical) arrays, one
    column per field whose value varies. A field of numbers (not bools) maps to its value's
    position in the field's sorted values over the span (0..1); any other field to a code,
    compared for equality only. A field a config lacks is a value of its own (None)."""
    import numpy as np

    rows = [_fields(c) for c in configs]
    names = sorted({k for r in rows for k in r})
    numeric, categorical = [], []
    for name in names:
        values = [r.get(name) for r in rows]
        distinct = set(values)
        if len(distinct) < 2:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            position = {v: i / (len(distinct) - 1) for i, v in enumerate(sorted(distinct))}
            numeric.append([position[v] for v in values])
        else:
            code = {v: i for i, v in enumerate(sorted(distinct, key=repr))}
            categorical.append([code[v] for v in values])
    n = len(configs)
    return (np.array(numeric, dtype=np.float64).T.reshape(n, len(numeric)),
            np.array(categorical, dtype=np.int64).T.reshape(n, len(categorical)))


STRATEGIES = {cls.name: cls for cls in (Exhaustive, RandomSample, CoordinateDescent, IteratedLocalSearch,
                                        BayesianSearch)}
DEFAULT_STRATEGY = "bayes"


def make_strategy(name: str, configs: Sequence[Config], **kwargs) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}") from None
    return cls(configs, **kwargs)
