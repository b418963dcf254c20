"""Timing a config: a GPU timer, and the interface a test can inject instead.

A timer is called as `timer(run, config, key) -> Timing`, where `run()` launches
the kernel once with `config` into scratch outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

from .config import Config


@dataclass(frozen=True)
class Timing:
    """Milliseconds: 20th, 50th (the median, what ranks configs) and 80th percentiles."""

    p20: float
    p50: float
    p80: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Timing":
        return cls(float(data["p20"]), float(data["p50"]), float(data["p80"]))


class Timer(Protocol):
    def __call__(self, run: Callable[[], Any], config: Config, key: tuple) -> Timing: ...


class GPUTimer:
    """triton.testing.do_bench: warm-up, an L2 flush before every run, p20/p50/p80."""

    is_gpu = True

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 100):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def __call__(self, run, config, key) -> Timing:
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(p20, p50, p80)


class WallClockTimer:
    """time.perf_counter medians: the only timer without a GPU. Under the interpreter its
    numbers say nothing about a GPU; it exists so the CLI can run end to end there."""

    is_gpu = False

    def __init__(self, reps: int = 3):
        self.reps = reps

    def __call__(self, run, config, key) -> Timing:
        import time

        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return Timing(times[0], times[len(times) // 2], times[-1])
