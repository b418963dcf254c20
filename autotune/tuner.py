"""Tuner: problem key -> config, remembered in memory, on disk and across machines.

`Tuner.select(key)` looks in turn at
  1. this process's memory (a dict lookup: the hot path),
  2. the user cache ($TRITONOPS_CACHE_DIR),
  3. configs shipped with the package (bundles, one per GPU),
  4. mode "on": tunes now and stores the winner; mode "cached": the nearest tuned key,
  5. the heuristic default,
and remembers the answer.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import device as _device
from .cache import CacheDir, bundle_entries, decode_key, encode_key
from .config import Config
from .search import make_strategy
from .space import Space
from .timing import GPUTimer, WallClockTimer

MODES = ("on", "cached", "off")
MODE_ENV = "TRITONOPS_AUTOTUNE"
RECORD_ENV = "TRITONOPS_RECORD"


def distributed_active() -> bool:
    """A torch.distributed process group of more than one rank is initialised."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never imported here just to ask
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def record_key(kernel: str, key: tuple) -> None:
    """With $TRITONOPS_RECORD set, append (kernel, key) as a JSON line: a trace for
    `autotune tune --from-trace`. Called once per new key per process."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    import json

    line = json.dumps({"kernel": kernel, "key": list(key)}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # one write per line: no interleaving
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def default_mode() -> str:
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV}={mode!r}; expected one of {MODES}")
        return mode
    return "on" if _device.gpu_available() else "off"


def bucket(n: int) -> int:
    """Run-time-varying dims (M = batch x sequence, ...) are keyed by the next power of two."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def source_hash(*objects: Any) -> str:
    """A hash of the source of functions, Triton kernels, modules or plain strings."""
    h = hashlib.sha256()
    for obj in objects:
        if isinstance(obj, str):
            text = obj
        else:
            obj = getattr(obj, "fn", obj)  # a Triton JITFunction / InterpretedFunction wraps .fn
            text = inspect.getsource(obj)
        h.update(text.encode())
    return h.hexdigest()[:16]


def _versions() -> dict:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "driver": _device.device_properties().get("driver", "unknown")}


def default_check(out: Any, ref: Any) -> bool:
    """Outputs of two configs agree: same shapes, same non-finite places, close values."""
    import torch

    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return False
        o64, r64 = o.detach().double(), r.detach().double()
        if not torch.equal(torch.isnan(o64), torch.isnan(r64)):
            return False
        finite = torch.isfinite(r64)
        if not torch.equal(o64[~finite & ~torch.isnan(r64)], r64[~finite & ~torch.isnan(r64)]):
            return False
        if finite.any():
            rtol = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-2}.get(o.dtype, 1e-8)
            scale = r64[finite].abs().max().item() or 1.0
            if (o64[finite] - r64[finite]).abs().max().item() > rtol * scale:
                return False
    return True


class Tuner:
    """Chooses the config of one kernel per problem key.

    name:     the kernel's name (files and CLI use it).
    space:    a Space of candidates.
    default:  key -> the heuristic config (used when nothing is tuned, and as the reference
              every candidate's output is compared with).
    runner:   key -> launch, where launch(config) runs the kernel once on inputs built for
              `key`, writing into scratch outputs, and returns the outputs. Needed to tune.
    problem:  key -> {dim name: size} for Space pruning (optional).
    sources:  what identifies the kernel's code (functions, kernels, modules, strings):
              hashed, with the space's version, into the cache file's name.
    shipped:  bundle files (from `autotune export`) shipped with the package.
    check:    (candidate outputs, default outputs) -> bool; a config failing it never wins.
    timer:    (run, config, key) -> Timing; do_bench on a GPU. Tests inject their own.
    tie:      relative margin within which medians tie; ties go to the first config in
              the space's order, so two runs or two ranks choose alike.
    """

    def __init__(self, name: str, space: Space, default: Callable[[tuple], Config], *,
                 runner: Callable[[tuple], Callable[[Config], Any]] | None = None,
                 problem: Callable[[tuple], dict] | None = None,
                 sources: Sequence[Any] = (), shipped: Iterable[str | os.PathLike] = (),
                 check: Callable[[Any, Any], bool] = default_check, timer=None, mode: str | None = None,
                 cache_dir: str | os.PathLike | None = None, strategy: str = "local",
                 max_evals: int | None = None, max_seconds: float | None = None, tie: float = 0.01):
        self.name = name
        self.space = space
        self.default = default
        self.runner = runner
        self.problem = problem
        self.identity = f"{name}-{source_hash(*sources) if sources else 'nosource'}-v{space.version}"
        self.shipped = [Path(p) for p in shipped]
        self.check = check
        self.timer = timer
        self.mode = mode
        self.cache_dir = cache_dir
        self.strategy = strategy
        self.max_evals = max_evals
        self.max_seconds = max_seconds
        self.tie = tie
        self.reset()

    # ------------------------------------------------------------------ lookup
    def reset(self) -> None:
        """Forget what this process chose (after a change of mode, cache dir or device)."""
        self._memo: dict[tuple, Config] = {}
        self.sources: dict[tuple, str] = {}  # key -> where its config came from
        self.pending: set[tuple] = set()  # keys waiting for autotune.distributed.sync()
        self._user: dict[str, dict] | None = None
        self._user_mtime = None
        self._shipped: dict[str, dict] | None = None
        self._file = None

    def select(self, key: tuple) -> Config:
        """The config for `key`; after the first call for a key, one dict lookup."""
        try:
            return self._memo[key]
        except KeyError:
            return self._select_slow(key)

    def _select_slow(self, key: tuple) -> Config:
        key = tuple(key)
        enc = encode_key(key)
        mode = self.mode or default_mode()
        config, source = None, "default"
        record_key(self.name, key)
        if mode != "off":
            entry = self.user_entries().get(enc)
            if entry is not None:
                config, source = Config.from_dict(entry["winner"]), "user-cache"
            elif (entry := self.shipped_entries().get(enc)) is not None:
                config, source = Config.from_dict(entry["winner"]), "shipped"
            elif mode == "on" and self.runner is not None and distributed_active():
                # Ranks must agree: tuning waits for autotune.distributed.sync(), which every
                # rank calls; until then every rank uses the same default.
                self.pending.add(key)
                source = "pending-sync"
            elif mode == "on" and self.runner is not None:
                entry = self.tune(key)
                if entry is not None:
                    config, source = Config.from_dict(entry["winner"]), "tuned"
            elif mode == "cached":
                near = self.nearest(key)
                if near is not None:
                    config, source = near, "nearest"
        if config is None:
            config = self.default(key)
        self._memo[key] = config
        self.sources[key] = source
        return config

    def adopt(self, key: tuple, entry: dict, store: bool = True) -> Config:
        """Use `entry` (tuned elsewhere: another rank, another process) for `key`."""
        key = tuple(key)
        if store:
            self._user = self.kernel_file().update({encode_key(key): entry})
            self._user_mtime = self.kernel_file().mtime()
        config = Config.from_dict(entry["winner"])
        self._memo[key] = config
        self.sources[key] = "adopted"
        self.pending.discard(key)
        return config

    # ------------------------------------------------------------------ files
    def fingerprint(self) -> str:
        return _device.device_fingerprint()

    def kernel_file(self):
        cache = CacheDir(self.cache_dir)  # resolved each time: $TRITONOPS_CACHE_DIR may change
        if self._file is None or self._file.path.parent.parent != cache.root:
            self._file = cache.kernel_file(self.fingerprint(), self.name, self.identity)
            self._user = None
        return self._file

    def user_entries(self) -> dict[str, dict]:
        f = self.kernel_file()
        mtime = f.mtime()
        if self._user is None or mtime != self._user_mtime:
            self._user, self._user_mtime = f.read(), mtime
        return self._user

    def shipped_entries(self) -> dict[str, dict]:
        if self._shipped is None:
            self._shipped = bundle_entries(self.shipped, self.fingerprint(), self.identity)
        return self._shipped

    def nearest(self, key: tuple) -> Config | None:
        """The winner of the closest tuned key: every non-integer field equal, integer fields
        closest in log2 distance; ties go to the smaller key."""
        best = None
        for enc, entry in {**self.shipped_entries(), **self.user_entries()}.items():
            other = decode_key(enc)
            if len(other) != len(key):
                continue
            dist = 0.0
            for a, b in zip(key, other):
                if isinstance(a, bool) or not isinstance(a, int):
                    if a != b:
                        break
                elif isinstance(b, int) and not isinstance(b, bool):
                    dist += abs(math.log2(a + 1) - math.log2(b + 1))
                else:
                    break
            else:
                cand = (dist, enc, entry)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return Config.from_dict(best[2]["winner"]) if best is not None else None

    # ------------------------------------------------------------------ tuning
    def _timer(self):
        if self.timer is not None:
            return self.timer
        return GPUTimer() if _device.gpu_available() else WallClockTimer()

    def candidates(self, key: tuple) -> list[Config]:
        problem = self.problem(key) if self.problem else None
        configs = self.space.configs(problem, _device.device_properties())
        default = self.default(key)
        if default not in configs:
            configs.append(default)
        return configs

    def tune(self, key: tuple, strategy: str | None = None, max_evals: int | None = None,
             max_seconds: float | None = None, progress: Callable[[Config, dict], None] | None = None,
             store: bool = True) -> dict | None:
        """Search the space for `key`, store and return the entry (None if nothing ran)."""
        if self.runner is None:
            raise RuntimeError(f"autotune: kernel {self.name!r} has no runner, so it cannot be tuned")
        key = tuple(key)
        timer = self._timer()
        launch = self.runner(key)
        default = self.default(key)
        configs = self.candidates(key)
        name = strategy or self.strategy
        search = make_strategy(name, configs, start=default, neighbours=self.space.neighbours,
                               max_evals=max_evals if max_evals is not None else self.max_evals,
                               max_seconds=max_seconds if max_seconds is not None else self.max_seconds)
        try:
            reference = launch(default)
        except Exception as e:  # noqa: BLE001 - the default itself does not run: nothing to compare with
            warnings.warn(f"autotune: {self.name} default config {default} fails for key {key}: {e}",
                          RuntimeWarning, stacklevel=2)
            return None
        known = {Config.from_dict(t["config"]): t for t in self._stored_timings(key)}
        results: dict[Config, dict] = {}
        while (config := search.ask()) is not None:
            if config in known and "timing" in known[config]:
                record = known[config]
            else:
                record = self._measure(launch, config, key, reference, timer)
            results[config] = record
            search.tell(config, record["timing"]["p50"] if "timing" in record else None)
            if progress is not None:
                progress(config, record)
        if default not in results:
            results[default] = self._measure(launch, default, key, reference, timer)
        entry = self._entry(key, results, default, name, search.evaluations, timer)
        if entry is None:
            return None
        if store:
            self._user = self.kernel_file().update({encode_key(key): entry})
            self._user_mtime = self.kernel_file().mtime()
        self._memo[key] = Config.from_dict(entry["winner"])
        self.sources[key] = "tuned"
        return entry

    def _stored_timings(self, key: tuple) -> list[dict]:
        entry = self.user_entries().get(encode_key(key))
        return entry.get("timings", []) if entry else []

    def _measure(self, launch, config: Config, key: tuple, reference, timer) -> dict:
        record: dict[str, Any] = {"config": config.to_dict()}
        try:
            out = launch(config)
            if not self.check(out, reference):
                record["error"] = "wrong result: output differs from the default config's"
                return record
            record["timing"] = timer(lambda: launch(config), config, key).to_dict()
        except Exception as e:  # noqa: BLE001 - compile errors, out of resources, launch errors
            record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return record

    def _entry(self, key, results: dict[Config, dict], default: Config, strategy: str, evaluations: int,
               timer) -> dict | None:
        ok = [(r["timing"]["p50"], c) for c, r in results.items() if "timing" in r]
        if not ok:
            return None
        best_ms = min(ms for ms, _ in ok)
        tied = [c for ms, c in ok if ms <= best_ms * (1.0 + self.tie)]
        winner = min(tied, key=self.space.order)
        ranked = sorted(ok, key=lambda t: (t[0], self.space.order(t[1])))
        return {
            "winner": winner.to_dict(),
            "timing": results[winner]["timing"],
            "default": {"config": default.to_dict(), **({"timing": results[default]["timing"]}
                                                       if "timing" in results[default] else {})},
            "runners_up": [{"config": c.to_dict(), "timing": results[c]["timing"]}
                           for _, c in ranked if c != winner][:5],
            "timings": list(results.values()),
            "provenance": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": _device.device_properties()["name"],
                "gpu_timing": bool(getattr(timer, "is_gpu", False)),
                "strategy": strategy,
                "evaluations": evaluations,
                **_versions(),
            },
        }
