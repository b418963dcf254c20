"""Timing a config: a GPU timer, and the interface a test can inject instead.

A timer is called as `timer(run, config, key) -> Timing`, where `run()` launches
the kernel once with `config` into scratch outputs. A timer that also takes
`bound_ms` (the tuner passes the best median so far, when it has one) may stop
early: when a short probe shows the config clearly slower than the bound (see
EARLY_STOP_MARGIN), it returns the probe's times in a Timing marked `stopped_early`.
Such a timing is real but rough: the tuner records it, never lets it win, and
reuses it later only as "known slower" (see Tuner.tune).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .config import Config

# A probe's fastest run must exceed the best median so far by this fraction for the config
# to be stopped early. The fastest of a few runs sits at or below the median a full timing
# would find, so the test already leans towards timing in full; what can still push a whole
# probe up is what a few runs cannot average out (clocks ramping up after the idle of a
# compile, another process on the GPU): a few percent, up to ~10-20% for kernels of tens of
# microseconds. 25% is beyond that, and far beyond the 1% within which medians tie: a config
# stopped early would not have won.
EARLY_STOP_MARGIN = 0.25


def is_clearly_slower(times_ms: list[float], bound_ms: float | None, margin: float = EARLY_STOP_MARGIN) -> bool:
    """The fastest of `times_ms` exceeds `bound_ms` by more than `margin`."""
    return bound_ms is not None and bool(times_ms) and min(times_ms) > bound_ms * (1.0 + margin)


@dataclass(frozen=True)
class Timing:
    """Milliseconds: 20th, 50th (the median, what ranks configs) and 80th percentiles.
    stopped_early: the times of a short probe, which showed the config clearly slower than
    the best so far; never stored inside the timing itself (the tuner's record says it)."""

    p20: float
    p50: float
    p80: float
    stopped_early: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        return {"p20": self.p20, "p50": self.p50, "p80": self.p80}

    @classmethod
    def from_dict(cls, data: dict) -> "Timing":
        return cls(float(data["p20"]), float(data["p50"]), float(data["p80"]))

    @classmethod
    def of(cls, times_ms: list[float], stopped_early: bool = False) -> "Timing":
        """The 20th, 50th and 80th percentiles of some times (nearest rank)."""
        times = sorted(times_ms)

        def rank(q: float) -> float:
            return times[min(len(times) - 1, max(0, round(q * (len(times) - 1))))]

        return cls(rank(0.2), rank(0.5), rank(0.8), stopped_early)


class Timer(Protocol):
    def __call__(self, run: Callable[[], Any], config: Config, key: tuple) -> Timing: ...


class GPUTimer:
    """triton.testing.do_bench: warm-up, an L2 flush before every run, p20/p50/p80.

    With `bound_ms`, a probe of a few runs (do_bench with ~1 ms of warm-up and repetition)
    comes first; when its fastest run is clearly slower than the bound (is_clearly_slower),
    the probe's times are returned, marked stopped_early, and the full measurement is skipped."""

    is_gpu = True

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 100, probe_ms: int = 1,
                 margin: float = EARLY_STOP_MARGIN):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.probe_ms = probe_ms
        self.margin = margin

    def __call__(self, run, config, key, bound_ms: float | None = None) -> Timing:
        if bound_ms is not None:
            times = self.probe(run)
            if is_clearly_slower(times, bound_ms, self.margin):
                return Timing.of(times, stopped_early=True)
        return self.measure(run)

    def probe(self, run) -> list[float]:
        """Times of a few runs, each after an L2 flush: at least one, more for short kernels."""
        from triton.testing import do_bench

        return list(do_bench(run, warmup=self.probe_ms, rep=self.probe_ms, return_mode="all"))

    def measure(self, run) -> Timing:
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(p20, p50, p80)


class WallClockTimer:
    """time.perf_counter medians: the only timer without a GPU. Under the interpreter its
    numbers say nothing about a GPU; it exists so the CLI can run end to end there.
    With `bound_ms`, a first run clearly slower than the bound ends the timing there."""

    is_gpu = False

    def __init__(self, reps: int = 3, margin: float = EARLY_STOP_MARGIN):
        self.reps = reps
        self.margin = margin

    def __call__(self, run, config, key, bound_ms: float | None = None) -> Timing:
        import time

        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) == 1 and self.reps > 1 and is_clearly_slower(times, bound_ms, self.margin):
                return Timing.of(times, stopped_early=True)
        times.sort()
        return Timing(times[0], times[len(times) // 2], times[-1])
