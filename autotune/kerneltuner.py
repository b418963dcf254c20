"""Kernel Tuner cache files as timing tables: a Space and config -> ms.

Kernel Tuner (https://github.com/KernelTuner/kernel_tuner) writes every config it times
to a cache file: JSON (often gzipped) with `tune_params` (name -> value list),
`tune_params_keys` (their order) and `cache` (the comma-joined values -> a record with
each parameter's value and `time` in ms). A brute-forced cache is a whole landscape, on
which any search strategy can be replayed without a GPU (perf.replay).

    table = read_cache("RTX_3090.json.gz")
    table.space, table.timings, table.best_ms

Read as data, never trusted: every record must give each parameter a value of its list
and agree with its key; its time is a positive finite number of ms, or one of Kernel
Tuner's failure markers (the config failed: None). Configs absent from the cache, and
those it marks invalid, are not in the table's space (the cache is the space's only
rule). Anything else is a ValueError naming the file and the record.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LAUNCH_FIELDS, Config
from .space import Space

# Kernel Tuner's markers for a config without a time: invalid configs (restrictions, too
# many threads) are outside the space; the others ran and failed, as a config can on a GPU.
INVALID_MARKERS = ("InvalidConfig",)
FAILURE_MARKERS = ("CompilationFailedConfig", "RuntimeFailedConfig")
# Older Kernel Tuner versions store a failed config's time as this sentinel.
FAILED_TIME = 1e20


@dataclass(frozen=True)
class TimingTable:
    """A measured landscape: the Space of its configs and each config's time (None: failed)."""

    space: Space
    timings: dict[Config, float | None]
    device: str
    kernel: str
    source: str

    @property
    def best_ms(self) -> float | None:
        ok = [ms for ms in self.timings.values() if ms is not None]
        return min(ok) if ok else None

    def within(self, fraction: float) -> int:
        """How many configs are within `fraction` of the best time."""
        best = self.best_ms
        return 0 if best is None else sum(1 for ms in self.timings.values()
                                          if ms is not None and ms <= best * (1 + fraction))


def read_cache(path: str | os.PathLike) -> TimingTable:
    """The timing table of a Kernel Tuner cache file (`.json` or `.json.gz`)."""
    return table_from_cache(load_json(path), str(path))


def load_json(path: str | os.PathLike) -> Any:
    """A `.json` or `.json.gz` file, parsed; a ValueError naming the file when it cannot be.

    Kernel Tuner appends each record to its cache file as it goes and closes the JSON only
    when tuning ends, so a file of an interrupted run lacks its closing braces (and may end
    in a comma); as Kernel Tuner itself does, such a file is read as if closed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable file ({type(e).__name__}: {e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        error = e
    closed = text.rstrip().removesuffix(",") + "}}"
    try:
        data = json.loads(closed)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not is_cache(data):  # the repair is for Kernel Tuner's unterminated caches only
        raise ValueError(f"{path}: not valid JSON ({error})")
    return data


def is_cache(data: Any) -> bool:
    """`data` (parsed JSON) looks like a Kernel Tuner cache file."""
    return isinstance(data, dict) and "tune_params" in data and "cache" in data


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and not math.isfinite(value))


def table_from_cache(data: Any, source: str = "<cache>") -> TimingTable:
    """The timing table of a parsed Kernel Tuner cache (see read_cache)."""
    if not is_cache(data):
        raise ValueError(f"{source}: not a Kernel Tuner cache file (no 'tune_params' and 'cache')")
    params, cache = data["tune_params"], data["cache"]
    if not isinstance(params, dict) or not params or not isinstance(cache, dict):
        raise ValueError(f"{source}: 'tune_params' must be a non-empty object and 'cache' an object")
    for name, values in params.items():
        if not (isinstance(values, list) and values and all(_scalar(v) for v in values)):
            raise ValueError(f"{source}: tune parameter {name!r} must list scalar values, got {values!r}")
        if len({(type(v), v) for v in values}) != len(values):
            raise ValueError(f"{source}: tune parameter {name!r} lists a value twice: {values!r}")
        # one kind of value per parameter: numbers, strings or bools (a Space orders its values)
        kinds = {"bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else "str"
                 for v in values}
        if len(kinds) > 1:
            raise ValueError(f"{source}: tune parameter {name!r} mixes {' and '.join(sorted(kinds))} values: "
                             f"{values!r}")
    order = data.get("tune_params_keys", list(params))
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order)) or sorted(order) != sorted(params):
        raise ValueError(f"{source}: 'tune_params_keys' {order!r} must name exactly the tune parameters")

    launch = {name: params[name] for name in order if name in LAUNCH_FIELDS}
    for name, values in launch.items():
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"{source}: {name} must list positive integers, got {values!r}")
    meta_names = [n for n in order if n not in LAUNCH_FIELDS]

    timings: dict[Config, float | None] = {}
    for key, record in cache.items():
        config = _record_config(key, record, order, params, meta_names, source)
        ms = _record_time(key, record, source)
        if ms == "invalid":
            continue
        if config in timings:
            raise ValueError(f"{source}: record {key!r} repeats the config of another record")
        timings[config] = ms
    if not timings:
        raise ValueError(f"{source}: the cache holds no valid config")

    measured = frozenset(timings)

    def measured_by_the_cache(config: Config, problem) -> bool:
        return config in measured

    space = Space({n: params[n] for n in meta_names}, num_warps=launch.get("num_warps", [4]),
                  num_stages=launch.get("num_stages", [3]), constraints=[measured_by_the_cache])
    return TimingTable(space, timings, str(data.get("device_name", "unknown device")),
                       str(data.get("kernel_name", "unknown kernel")), source)


def _record_config(key: Any, record: Any, order: list, params: dict, meta_names: list, source: str) -> Config:
    if not isinstance(record, dict):
        raise ValueError(f"{source}: record {key!r} is not an object")
    values = []
    for name in order:
        if name not in record:
            raise ValueError(f"{source}: record {key!r} has no value for {name!r}")
        value = record[name]
        if not any(type(value) is type(v) and value == v for v in params[name]):
            raise ValueError(f"{source}: record {key!r}: {name} = {value!r} is not one of {params[name]}")
        values.append(value)
    if key != ",".join(str(v) for v in values):
        raise ValueError(f"{source}: record {key!r} does not match its values {values!r}")
    fields = dict(zip(order, values))
    return Config({n: fields[n] for n in meta_names}, num_warps=fields.get("num_warps", 4),
                  num_stages=fields.get("num_stages", 3))


def _record_time(key: Any, record: dict, source: str) -> float | None | str:
    """The record's time in ms; None for a failure marker; "invalid" for an invalid config."""
    if "time" not in record:
        raise ValueError(f"{source}: record {key!r} has no 'time'")
    t = record["time"]
    if isinstance(t, str):
        if t in INVALID_MARKERS:
            return "invalid"
        if t in FAILURE_MARKERS:
            return None
        raise ValueError(f"{source}: record {key!r} has the time {t!r}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{source}: record {key!r} has the time {t!r}: not a positive number of ms")
    return None if t >= FAILED_TIME else float(t)


def compact_cache(data: dict) -> dict:
    """A Kernel Tuner cache with only what a timing table needs: the header, and each
    record's parameter values and time (the repeats, counters and timestamps dropped).
    Still a cache file Kernel Tuner's format describes, and `read_cache` reads it alike."""
    table_from_cache(data)  # only a well-formed cache is shrunk
    order = data.get("tune_params_keys", list(data["tune_params"]))
    header = {k: data[k] for k in ("device_name", "kernel_name", "problem_size", "tune_params_keys", "tune_params",
                                   "objective") if k in data}
    header["cache"] = {key: {**{n: rec[n] for n in order}, "time": rec["time"]} for key, rec in data["cache"].items()}
    return header
