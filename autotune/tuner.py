"""Tuner: problem key -> config, remembered in memory, on disk and across machines.

`Tuner.select(key)` looks in turn at
  1. this process's memory (a dict lookup: the hot path),
  2. the user cache ($AUTOTUNE_CACHE_DIR, default ~/.cache/autotune),
  3. configs shipped with the package (bundles, one per GPU),
  4. mode "on": tunes now and stores the winner; mode "cached": the nearest tuned key,
  5. the heuristic default,
and remembers the answer. Every config read from a file or another rank is checked
against the Space first (`entry_problem`): one that is not valid there is skipped
with one warning naming its file and key, and the lookup goes on to the next source.
A cache directory that cannot be read or written is one warning; the tuner then
keeps what it tunes in memory. The mode comes from the tuner, else from $AUTOTUNE_MODE;
with $AUTOTUNE_RECORD set, every new key is appended to that trace file. A package
built on autotune may add its own names for these variables (see settings.py).

Tuning (`tune`) compiles the configs it is about to time in worker processes meanwhile
(precompile.py), and stops timing a config once it is clearly slower than the best so
far (timing.py).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import math
import os
import platform
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from . import device as _device
from . import settings
from .cache import (CacheDir, check_name, decode_key, encode_key, entry_problem, entry_time, read_bundle,
                    timing_records, warn_once)
from .config import Config
from .precompile import Precompiler, capturing, shared_pool, unavailable_reason
from .search import DEFAULT_STRATEGY, STRATEGIES, make_strategy
from .space import Space
from .timing import GPUTimer, Timing, WallClockTimer

MODES = ("on", "cached", "off")


def distributed_active() -> bool:
    """A torch.distributed process group of more than one rank is initialised."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never imported here just to ask
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def record_key(kernel: str, key: tuple) -> None:
    """With $AUTOTUNE_RECORD (settings "record") set, append (kernel, key) as a JSON line:
    a trace for `autotune tune --from-trace`. Called once per new key per process."""
    path = settings.get("record")
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
    """The mode of tuners that set none: $AUTOTUNE_MODE (settings "mode"), else "on" with a GPU
    and "off" without (interpreter timings say nothing about a GPU)."""
    value, variable = settings.lookup("mode")
    mode = (value or "").strip().lower()
    if mode:
        if mode not in MODES:
            if variable is None:  # a package's settings.set_default("mode", ...)
                raise ValueError(f"default autotune mode {value!r}; expected one of {MODES}")
            raise ValueError(f"{variable}={value!r}; expected one of {MODES}")
        return mode
    return "on" if _device.gpu_available() else "off"


def bucket(n: int) -> int:
    """Run-time-varying dims (M = batch x sequence, ...) are keyed by the next power of two."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def source_hash(*objects: Any) -> str:
    """A hash of the source of Triton kernels, functions, modules or plain strings.

    A Triton JIT function counts with every JIT function it calls, transitively, and the
    `tl.constexpr` globals their code names: editing a helper the kernel calls
    changes the hash, so a cached winner of the old code is never used for the new.
    A module counts with the JIT functions its own JIT functions call in other modules.
    Strings and plain functions are hashed as given.
    """
    h = hashlib.sha256()
    for obj in objects:
        texts = _source_texts(obj)
        h.update(texts[0].encode())
        for text in texts[1:]:
            h.update(b"\0" + text.encode())  # what the given code reaches
    return h.hexdigest()[:16]


def _jit_types() -> tuple[type, ...]:
    """The classes of Triton JIT functions in this process: JITFunction (JITCallable, which
    also covers constexpr_function, where it exists) and, under TRITON_INTERPRET=1, what
    `@triton.jit` returns instead: triton.runtime.interpreter.InterpretedFunction, which has
    `.fn` but no `cache_key`. Taken from sys.modules: autotune never imports triton itself
    (see device.py), and without triton loaded nothing can be a JIT function."""
    found = []
    jit = sys.modules.get("triton.runtime.jit")
    if jit is not None:
        found += [getattr(jit, n, None) for n in ("JITCallable", "JITFunction")]
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if interpreter is not None:
        found.append(getattr(interpreter, "InterpretedFunction", None))
    return tuple(t for t in found if isinstance(t, type))


def _jit_python_function(obj: Any, jit_types: tuple[type, ...]) -> types.FunctionType | None:
    """The Python function of a Triton JIT function (None for anything else)."""
    if jit_types and isinstance(obj, jit_types):
        fn = getattr(obj, "fn", None)
        if isinstance(fn, types.FunctionType):
            return fn
    return None


def _in_triton(name: str) -> bool:
    # Triton's own JIT library (tl.sum, tl.cdiv, ...) is covered by the Triton version in
    # every cache path's device fingerprint; hashing its source would add nothing.
    return name == "triton" or name.startswith("triton.")


def _code_names(code: types.CodeType) -> list[str]:
    """Global, attribute and closure names of a code object and those nested in it, in order."""
    names = [*code.co_names, *code.co_freevars]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _code_names(const)
    return list(dict.fromkeys(names))


def _referenced(fn: types.FunctionType) -> Iterator[tuple[str, Any]]:
    """(name, value) of what `fn`'s code may refer to: names in its globals and closure, and
    attributes of referenced modules named in its code (`common.cast_to`, `pkg.mod.fn`).

    A superset, from the code's name table rather than its exact attribute chains: a name
    used elsewhere in the function that a referenced module also defines is included too.
    That can only make the hash more sensitive, never miss a helper."""
    names = _code_names(fn.__code__)
    scope = dict(fn.__globals__)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    seen_modules: set[int] = set()

    def attributes(module: types.ModuleType, path: str) -> Iterator[tuple[str, Any]]:
        if id(module) in seen_modules or _in_triton(module.__name__):
            return
        seen_modules.add(id(module))
        contents = vars(module)  # vars, not getattr: no module __getattr__ hooks or lazy imports run
        for name in names:
            if name in contents:
                value = contents[name]
                yield f"{path}.{name}", value
                if isinstance(value, types.ModuleType):
                    yield from attributes(value, f"{path}.{name}")

    for name in names:
        if name in scope:
            value = scope[name]
            yield name, value
            if isinstance(value, types.ModuleType):
                yield from attributes(value, name)


def _constexpr_value(value: Any) -> tuple[bool, Any]:
    """(True, the wrapped value) for a `tl.constexpr`, else (False, value)."""
    constexpr = getattr(sys.modules.get("triton.language.core"), "constexpr", None)
    if isinstance(constexpr, type) and isinstance(value, constexpr):
        return True, getattr(value, "value", value)
    return False, value


def _constexpr_text(value: Any) -> str | None:
    """The value of a `tl.constexpr` global, the kind of global Triton compiles into a kernel,
    as text that is the same in every process: scalars and Triton dtypes. Other globals are
    left out: one computed on the machine (a path, a device count) would make the hash, and
    so shipped configs, differ between machines; an object's repr may hold its address."""
    is_constexpr, inner = _constexpr_value(value)
    if not is_constexpr:
        return None
    if inner is None or isinstance(inner, (bool, int, float, str)):
        return repr(inner)
    if _in_triton(type(inner).__module__ or "") and "dtype" in type(inner).__name__:
        return str(inner)  # tl.float16 -> "fp16"
    return None


def _jit_closure(roots: Sequence[types.FunctionType], jit_types: tuple[type, ...]) -> list[types.FunctionType]:
    """The JIT functions `roots` call, transitively: Python functions in first-reached order,
    the roots themselves and Triton's own library left out."""
    seen = {id(f) for f in roots}
    order: list[types.FunctionType] = []
    todo = list(roots)
    while todo:
        fn = todo.pop(0)
        for _, value in _referenced(fn):
            # a JIT function held in a constexpr global (ACTIVATION = tl.constexpr(gelu)) is called too
            inner = _jit_python_function(_constexpr_value(value)[1], jit_types)
            if inner is not None and id(inner) not in seen and not _in_triton(inner.__module__ or ""):
                seen.add(id(inner))
                order.append(inner)
                todo.append(inner)
    return order


def _constexpr_globals(fns: Sequence[types.FunctionType]) -> list[str]:
    """'name=value' for each constexpr global the functions' code names: its value is part of
    the kernel Triton compiles, though not of the functions' source. Named as the code names
    them (`NAME`, or `module.NAME` through a module attribute), never by the module's own
    name or path, so the hash is the same on every machine."""
    out: dict[str, None] = {}
    for fn in fns:
        for name, value in _referenced(fn):
            text = _constexpr_text(value)
            if text is not None:
                out[f"{name}={text}"] = None
    return list(out)


def _called_source(fn: types.FunctionType) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # defined without a file (exec): its name stands in for it
        return f"{fn.__module__}.{fn.__qualname__}"


def _source_texts(obj: Any) -> list[str]:
    """What `source_hash` hashes for one object: its own text first."""
    if isinstance(obj, str):
        return [obj]
    jit_types = _jit_types()
    if isinstance(obj, types.ModuleType):
        own = [fn for value in vars(obj).values()
               if (fn := _jit_python_function(value, jit_types)) is not None and fn.__module__ == obj.__name__]
        # the module's text has its own functions and values; add what they reach elsewhere
        elsewhere = [f for f in _jit_closure(own, jit_types) if f.__module__ != obj.__name__]
        return [inspect.getsource(obj), *(_called_source(f) for f in elsewhere),
                *_constexpr_globals([*own, *elsewhere])]
    seen = set()
    while _jit_python_function(obj, jit_types) is None and hasattr(obj, "fn") and id(obj) not in seen:
        seen.add(id(obj))  # triton.autotune / triton.heuristics / autotune.autotune wrap a kernel in .fn
        obj = obj.fn
    fn = _jit_python_function(obj, jit_types)
    if fn is None:
        return [inspect.getsource(obj)]
    called = _jit_closure([fn], jit_types)
    return [inspect.getsource(fn), *(_called_source(f) for f in called), *_constexpr_globals([fn, *called])]


def _versions() -> dict:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "driver": _device.device_properties().get("driver", "unknown")}


# How far two configs' outputs may differ, relative to the largest finite value of the
# default config's output, by output dtype (keyed by the dtype's name as torch spells it,
# torch.float16 -> "float16", so that importing autotune does not import torch). Configs
# differ in accumulation order (block sizes, split-K), hence the rounding of one output:
#   float16   1e-2   a few ulps (2**-10) of the largest value after a long reduction
#   bfloat16  3e-2   a few ulps (2**-7): the coarsest type
#   float32   1e-2   tl.dot may use TF32 (10-bit mantissa) for float32 inputs
#   float64   1e-9   no reduced-precision path: only reordering differs
# Every other dtype (integers, bool, float8, complex) must agree exactly.
AGREE_RTOL: dict[str, float] = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-2, "float64": 1e-9}


def agree_rtol(dtype: Any) -> float | None:
    """AGREE_RTOL's tolerance for a torch dtype (or its name); None: values must be equal."""
    return AGREE_RTOL.get(str(dtype).removeprefix("torch."))


def default_check(out: Any, ref: Any) -> bool:
    """Outputs of two configs agree: same shapes and dtypes, NaN in the same places, the same
    infinities, and finite values within AGREE_RTOL of the reference's dtype (exactly equal
    for dtypes the table lacks). `ref` is the default config's output: a tensor or a
    tuple/list of them, as is `out`."""
    import torch

    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape or o.dtype != r.dtype:
            return False
        if not r.is_floating_point():  # integers, bool, complex: exact
            if not torch.equal(o.detach(), r.detach()):
                return False
            continue
        o64, r64 = o.detach().double(), r.detach().double()
        if not torch.equal(torch.isnan(o64), torch.isnan(r64)):
            return False
        finite = torch.isfinite(r64)
        if not torch.equal(o64[~finite & ~torch.isnan(r64)], r64[~finite & ~torch.isnan(r64)]):
            return False
        if finite.any():
            rtol = agree_rtol(r.dtype)
            if rtol is None:
                if not torch.equal(o64[finite], r64[finite]):
                    return False
                continue
            scale = r64[finite].abs().max().item() or 1.0
            if (o64[finite] - r64[finite]).abs().max().item() > rtol * scale:
                return False
    return True


def _best_ms(results: dict[Config, dict]) -> float | None:
    """The best median of the full timings among `results` (None if none has one)."""
    full = [r["timing"]["p50"] for r in results.values() if "timing" in r and not r.get("stopped_early")]
    return min(full) if full else None


def _takes_bound(timer) -> bool:
    """The timer accepts `bound_ms` (by name, or through **kwargs): timers written for
    `timer(run, config, key)` are called that way, as before."""
    try:
        params = inspect.signature(timer).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return False
    return "bound_ms" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _time(timer, run: Callable[[], Any], config: Config, key: tuple, bound_ms: float | None) -> Timing:
    if bound_ms is not None and _takes_bound(timer):
        return timer(run, config, key, bound_ms=bound_ms)
    return timer(run, config, key)


class Stored(NamedTuple):
    """A valid entry of a file: its key, its winner as a Config, and the entry as stored."""

    key: tuple
    config: Config
    entry: dict


_SCALAR_FIELDS = (bool, int, float, str)


def _field_types(key_type: type | None) -> tuple | None:
    """The declared type of each field of a NamedTuple key (None where it is not a scalar type)."""
    if key_type is None or not hasattr(key_type, "_fields"):
        return None
    try:
        hints = typing.get_type_hints(key_type)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: fields are not type-checked
        return None
    return tuple(hints.get(f) if hints.get(f) in _SCALAR_FIELDS else None for f in key_type._fields)


def _has_type(value: Any, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want) and not isinstance(value, bool)


class Tuner:
    """Chooses the config of one kernel per problem key.

    name:     the kernel's name (files and CLI use it).
    space:    a Space of candidates.
    default:  key -> the heuristic config (used when nothing is tuned, and as the reference
              every candidate's output is compared with).
    runner:   key -> launch, where launch(config) runs the kernel once on inputs built for
              `key`, writing into scratch outputs, and returns the outputs. Needed to tune.
    problem:  key -> {dim name: size} for Space pruning (optional).
    key_type: the class of the keys, a tuple type (a NamedTuple): every key that reaches the tuner,
              from a caller, a trace or another rank, is made one (`make_key`), so
              `default`, `runner` and `problem` may read its fields by name. None: plain tuples.
    sources:  what identifies the kernel's code (functions, kernels, modules, strings):
              hashed, with the space's version, into the cache file's name.
    shipped:  bundle files (from `autotune export`) shipped with the package.
    check:    (candidate outputs, default outputs) -> bool; a config failing it never wins.
    timer:    (run, config, key) -> Timing; do_bench on a GPU. Tests inject their own.
    tie:      relative margin within which medians tie; ties go to the default, else the first config in
              the space's order, so two runs or two ranks choose alike.
    mode:     "on", "cached" or "off"; None: `default_mode()` ($AUTOTUNE_MODE) at each lookup.
    cache_dir: the user cache's root; None: `cache.default_cache_dir()` ($AUTOTUNE_CACHE_DIR).
    strategy, max_evals, max_seconds: the search and its budget per key (see search.py).
    precompile: compile the configs a search is about to time in worker processes while it
              times others (precompile.py); None: on when a GPU is there. Under the
              interpreter nothing is compiled and it does nothing.
    compile_workers: the worker processes of that compiling; None: precompile.default_workers().
    early_stop: let timers that take `bound_ms` stop timing a config once it is clearly slower
              than the best so far (timing.py); such a record never wins.

    `override(**fields)` changes mode, cache_dir, strategy, budgets, timer or the compiling and
    early-stop settings for a `with` block.
    """

    def __init__(self, name: str, space: Space, default: Callable[[tuple], Config], *,
                 runner: Callable[[tuple], Callable[[Config], Any]] | None = None,
                 problem: Callable[[tuple], dict] | None = None, key_type: type | None = None,
                 sources: Sequence[Any] = (), shipped: Iterable[str | os.PathLike] = (),
                 check: Callable[[Any, Any], bool] = default_check, timer=None, mode: str | None = None,
                 cache_dir: str | os.PathLike | None = None, strategy: str = DEFAULT_STRATEGY,
                 max_evals: int | None = None, max_seconds: float | None = None, tie: float = 0.01,
                 precompile: bool | None = None, compile_workers: int | None = None, early_stop: bool = True):
        self.name = name
        self.space = space
        self.default = default
        self.runner = runner
        self.problem = problem
        if key_type is not None and not issubclass(key_type, tuple):
            raise TypeError(f"autotune: key_type must be a tuple type (a NamedTuple), got {key_type!r}")
        self.key_type = key_type
        self._field_types = _field_types(key_type)
        self.identity = f"{name}-{source_hash(*sources) if sources else 'nosource'}-v{space.version}"
        check_name(self.identity, "kernel identity (from the tuner's name)")
        self.shipped = [Path(p) for p in shipped]
        self.check = check
        self.timer = timer
        self.mode = mode
        self.cache_dir = cache_dir
        self.strategy = strategy
        self.max_evals = max_evals
        self.max_seconds = max_seconds
        self.tie = tie
        self.check_override({"precompile": precompile, "compile_workers": compile_workers, "early_stop": early_stop})
        self.precompile = precompile
        self.compile_workers = compile_workers
        self.early_stop = early_stop
        self.reset()

    # The fields `override` may change: what the tuner decides with, not what it is.
    OVERRIDABLE = ("mode", "max_evals", "max_seconds", "strategy", "timer", "cache_dir", "precompile",
                   "compile_workers", "early_stop")

    @classmethod
    def check_override(cls, fields: dict) -> None:
        """Raise what `override(**fields)` would raise for these fields, changing nothing."""
        unknown = sorted(set(fields) - set(cls.OVERRIDABLE))
        if unknown:
            raise TypeError(f"Tuner.override() got unknown field(s) {unknown}; it takes {list(cls.OVERRIDABLE)}")
        if fields.get("mode") is not None and fields["mode"] not in MODES:
            raise ValueError(f"mode {fields['mode']!r}; expected one of {MODES} or None")
        if "strategy" in fields and fields["strategy"] not in STRATEGIES:
            raise ValueError(f"unknown strategy {fields['strategy']!r}; expected one of {sorted(STRATEGIES)}")
        if fields.get("precompile") not in (None, True, False):
            raise ValueError(f"precompile {fields['precompile']!r}; expected True, False or None")
        workers = fields.get("compile_workers")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"compile_workers {workers!r}; expected a positive int or None")
        if "early_stop" in fields and not isinstance(fields["early_stop"], bool):
            raise ValueError(f"early_stop {fields['early_stop']!r}; expected True or False")

    @contextlib.contextmanager
    def override(self, **fields: Any) -> Iterator["Tuner"]:
        """Set some of OVERRIDABLE for the duration of a `with` block:

            with tuner.override(mode="on", cache_dir=tmp, max_evals=8):
                tuner.select(key)

        The tuner forgets what it chose on entry and again on exit (`reset()`), so no choice
        made under one setting is used under the other; the old values come back on exit,
        also when the block raises. An unknown field name is a TypeError, a mode outside
        MODES or an unknown strategy a ValueError, before anything changes."""
        self.check_override(fields)
        old = {name: getattr(self, name) for name in fields}
        for name, value in fields.items():
            setattr(self, name, value)
        self.reset()
        try:
            yield self
        finally:
            for name, value in old.items():
                setattr(self, name, value)
            self.reset()

    # ------------------------------------------------------------------ lookup
    def reset(self) -> None:
        """Forget what this process chose (after a change of mode, cache dir or device)."""
        self._memo: dict[tuple, Config] = {}
        self.sources: dict[tuple, str] = {}  # key -> where its config came from
        self.pending: set[tuple] = set()  # keys waiting for autotune.distributed.sync()
        self._user: dict[str, Stored] | None = None
        self._user_mtime = None
        self._shipped: dict[str, Stored] | None = None
        self._file = None

    def make_key(self, values) -> tuple:
        """`values` as this tuner's key: a `key_type` (checked for its number of fields and, where
        they are declared int, float, str or bool, their types), or a tuple. ValueError otherwise."""
        if self.key_type is None:
            return tuple(values)
        if isinstance(values, self.key_type):
            return values
        values = tuple(values)
        fields = getattr(self.key_type, "_fields", None)
        if fields is not None and len(values) != len(fields):
            raise ValueError(f"autotune: a {self.name} key has {len(fields)} fields {fields}, got {values!r}")
        for field, value, want in zip(fields or (), values, self._field_types or ()):
            if want is not None and not _has_type(value, want):
                raise ValueError(f"autotune: field {field} of a {self.name} key must be {want.__name__}, "
                                 f"got {value!r}")
        return self.key_type(*values)

    def select(self, key: tuple) -> Config:
        """The config for `key`; after the first call for a key, one dict lookup."""
        try:
            return self._memo[key]
        except KeyError:
            return self._select_slow(key)

    def _select_slow(self, key: tuple) -> Config:
        key = self.make_key(key)
        if capturing():
            # a launcher whose launches are being captured for compiling ahead: no kernel runs,
            # so nothing may be tuned (its timings and checks would be of nothing), stored or
            # remembered; a stored config is what the real launch will use, so it is compiled
            stored = self._valid_user().get(encode_key(key)) or self._valid_shipped().get(encode_key(key))
            return stored.config if stored is not None else self.default(key)
        enc = encode_key(key)
        mode = self.mode or default_mode()
        config, source = None, "default"
        record_key(self.name, key)
        if mode != "off":
            stored = self._valid_user().get(enc)
            if stored is not None:
                config, source = stored.config, "user-cache"
            elif (stored := self._valid_shipped().get(enc)) is not None:
                config, source = stored.config, "shipped"
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
        """Use `entry` (tuned elsewhere: another rank, another process) for `key`; an entry that
        is not valid for this kernel (entry_problem) is a warning, and the key keeps its default."""
        key = self.make_key(key)
        why = self.entry_problem(encode_key(key), entry)
        if why is not None:
            warn_once((self.identity, encode_key(key), "adopt", why),
                      f"autotune: {self.name}: not adopting the config given for key {encode_key(key)}: {why}")
            config, source = self.default(key), "default"
        else:
            if store:
                self._store(key, entry)
            config, source = Config.from_dict(entry["winner"]), "adopted"
        self._memo[key] = config
        self.sources[key] = source
        self.pending.discard(key)
        return config

    # ------------------------------------------------------------------ checking what is read
    def entry_problem(self, text: str, entry: Any, this_device: bool = True) -> str | None:
        """Why a stored entry (encoded key, entry) cannot be used by this tuner, or None.

        The entry must be well formed (cache.entry_problem), its key one of this kernel's
        (`make_key`), and its winner either the key's default or a config of the Space for the
        key's problem within this device's limits (Space.check). For an entry of another device
        (`this_device` False: an imported bundle's) only the names and values are checked: the
        rules and limits are that device's."""
        why = entry_problem(text, entry)
        if why is not None:
            return why
        try:
            return self.config_problem(self.make_key(decode_key(text)), Config.from_dict(entry["winner"]),
                                       this_device)
        except Exception as e:  # noqa: BLE001 - default() or problem() cannot take the key's values
            return f"the key is not one of this kernel's ({type(e).__name__}: {e})"

    def config_problem(self, key: tuple, config: Config, this_device: bool = True) -> str | None:
        """Why `config` cannot serve `key`, or None: it is the key's default, or a config of the
        Space for the key's problem (Space.check), within this device's limits and rules unless
        `this_device` is False (then names and values only: see entry_problem)."""
        if config == self.default(key):
            return None
        problem = self.problem(key) if self.problem else None
        return self.space.check(config, problem, _device.device_properties() if this_device else None,
                                rules=this_device)

    def _checked(self, entries: dict[str, dict], origin: Any) -> dict[str, Stored]:
        """The entries this tuner can use, as Stored; each other one is one warning naming
        `origin` (its file) and its key."""
        out = {}
        for text, entry in entries.items():
            why = self.entry_problem(text, entry)
            if why is None:
                out[text] = Stored(self.make_key(decode_key(text)), Config.from_dict(entry["winner"]), entry)
            else:
                warn_once((str(origin), text, "invalid", self.identity),
                          f"autotune: {origin}: skipping the {self.name} config for key {text}: {why}")
        return out

    def _entry_is_valid(self, text: str, entry: dict) -> bool:
        return self.entry_problem(text, entry) is None

    def _store(self, key: tuple, entry: dict) -> None:
        """Write `entry` for `key` into the user cache. A cache that cannot be written is one
        warning; the tuner keeps the entry in memory and the call goes on."""
        f = self.kernel_file()
        try:
            entries = f.update({encode_key(key): entry}, valid=self._entry_is_valid)
        except OSError as e:
            warn_once(("unusable", str(f.path.parent.parent)),
                      f"autotune: the cache directory {f.path.parent.parent} cannot be written "
                      f"({e.strerror or e}); tuned configs are kept in this process's memory only")
            self._valid_user()[encode_key(key)] = Stored(key, Config.from_dict(entry["winner"]), entry)
            self._user_mtime = f.mtime()  # kept until the file changes
            return
        self._user, self._user_mtime = self._checked(entries, f.path), f.written

    # ------------------------------------------------------------------ files
    def fingerprint(self) -> str:
        return _device.device_fingerprint()

    def kernel_file(self):
        cache = CacheDir(self.cache_dir)  # resolved each time: $AUTOTUNE_CACHE_DIR may change
        if self._file is None or self._file.path.parent.parent != cache.root:
            self._file = cache.kernel_file(self.fingerprint(), self.name, self.identity)
            self._user = None
        return self._file

    def _valid_user(self) -> dict[str, Stored]:
        f = self.kernel_file()
        mtime = f.mtime()
        if self._user is None or mtime != self._user_mtime:
            self._user, self._user_mtime = self._checked(f.read(), f.path), mtime
        return self._user

    def _valid_shipped(self) -> dict[str, Stored]:
        if self._shipped is None:
            fingerprint, found = self.fingerprint(), {}
            for path in self.shipped:
                if not path.is_file():
                    continue
                try:
                    files, skipped = read_bundle(path)
                except ValueError as e:
                    warn_once((str(path), "bundle"), f"autotune: ignoring shipped configs: {e}")
                    continue
                for why in skipped:
                    warn_once((str(path), why), f"autotune: shipped configs: skipping {why}")
                for f in files:
                    if f["fingerprint"] == fingerprint and f["identity"] == self.identity:
                        for text, stored in self._checked(f["entries"], path).items():
                            # checked before comparing: an invalid entry never displaces a valid one
                            old = found.get(text)
                            if old is None or entry_time(stored.entry) < entry_time(old.entry):
                                found[text] = stored
            self._shipped = found
        return self._shipped

    def user_entries(self) -> dict[str, dict]:
        """The user cache's valid entries: encoded key -> entry as stored."""
        return {text: stored.entry for text, stored in self._valid_user().items()}

    def shipped_entries(self) -> dict[str, dict]:
        """The shipped bundles' valid entries for this device: encoded key -> entry."""
        return {text: stored.entry for text, stored in self._valid_shipped().items()}

    def nearest(self, key: tuple) -> Config | None:
        """The winner of the closest tuned key that also suits `key` (its default, or within the
        space's rules for its problem): every non-integer field equal, integer fields closest
        in log2 distance; ties go to the smaller key."""
        key = self.make_key(key)
        ranked = []
        for enc, stored in {**self._valid_shipped(), **self._valid_user()}.items():
            other = stored.key
            if len(other) != len(key):
                continue
            dist = 0.0
            for a, b in zip(key, other):
                if isinstance(a, bool) or not isinstance(a, int):
                    if a != b:
                        break
                elif isinstance(b, int) and not isinstance(b, bool):
                    dist += abs(math.log2(max(a, 0) + 1) - math.log2(max(b, 0) + 1))
                else:
                    break
            else:
                ranked.append((dist, enc, stored.config))
        for _, _, config in sorted(ranked, key=lambda r: r[:2]):
            if self.config_problem(key, config) is None:
                return config
        return None

    # ------------------------------------------------------------------ tuning
    def _timer(self):
        if self.timer is not None:
            return self.timer
        return GPUTimer() if _device.gpu_available() else WallClockTimer()

    def candidates(self, key: tuple) -> list[Config]:
        key = self.make_key(key)
        problem = self.problem(key) if self.problem else None
        configs = self.space.configs(problem, _device.device_properties())
        default = self.default(key)
        if default not in configs:
            configs.append(default)
        return configs

    def tune(self, key: tuple, strategy: str | None = None, max_evals: int | None = None,
             max_seconds: float | None = None, progress: Callable[[Config, dict], None] | None = None,
             store: bool = True, precompile: bool | None = None, early_stop: bool | None = None) -> dict | None:
        """Search the space for `key`, store and return the entry (None if nothing ran).

        precompile: keep worker processes compiling, into Triton's cache, the default config
        first and then the configs the search has decided to ask next (`strategy.pending()`,
        where the strategy has it), at most twice the workers ahead, so the timing loop finds
        its configs compiled; None: the tuner's `precompile` (on with a GPU). A config whose
        compile fails is still launched, and its launch records the real error.
        early_stop: give timers that take it `bound_ms`, the best median so far, so a config
        clearly slower is not timed in full; None: the tuner's `early_stop`. The default
        config is always timed in full: the entry reports its time."""
        if self.runner is None:
            raise RuntimeError(f"autotune: kernel {self.name!r} has no runner, so it cannot be tuned")
        key = self.make_key(key)
        timer = self._timer()
        launch = self.runner(key)
        default = self.default(key)
        configs = self.candidates(key)
        name = strategy or self.strategy
        search = make_strategy(name, configs, start=default, neighbours=self.space.neighbours,
                               max_evals=max_evals if max_evals is not None else self.max_evals,
                               max_seconds=max_seconds if max_seconds is not None else self.max_seconds)
        early_stop = self.early_stop if early_stop is None else early_stop
        known = self._stored_timings(key)
        ahead = self._precompiler(launch, self.precompile if precompile is None else precompile)
        try:
            if ahead is not None:
                ahead.submit(default)  # the reference launch needs it first
                ahead.feed(self._upcoming(search, known))
                if ahead.warm:  # else this process's JIT compiles it sooner, while the workers start
                    ahead.wait(default)
            try:
                reference = launch(default)
            except Exception as e:  # noqa: BLE001 - the default itself does not run: nothing to compare with
                warnings.warn(f"autotune: {self.name} default config {default} fails for key {key}: {e}",
                              RuntimeWarning, stacklevel=2)
                return None
            results: dict[Config, dict] = {}
            while (config := search.ask()) is not None:
                if config in known and "timing" in known[config]:
                    record = known[config]
                else:
                    if ahead is not None:
                        ahead.submit(config)  # not sent yet if the search changed its mind: now, past the cap
                        ahead.feed(self._upcoming(search, known))
                        ahead.wait(config)
                    bound = _best_ms(results) if early_stop and config != default else None
                    record = self._measure(launch, config, key, reference, timer, bound)
                results[config] = record
                search.tell(config, record["timing"]["p50"] if "timing" in record else None)
                if ahead is not None:
                    ahead.feed(self._upcoming(search, known))  # before anything else: the pool must not idle
                if progress is not None:
                    progress(config, record)
            if default not in results:
                results[default] = self._measure(launch, default, key, reference, timer)
        finally:
            if ahead is not None:
                ahead.close()
        entry = self._entry(key, results, default, name, search.evaluations, timer)
        if entry is None:
            return None
        if store:
            self._store(key, entry)
        self._memo[key] = Config.from_dict(entry["winner"])
        self.sources[key] = "tuned"
        return entry

    def _stored_timings(self, key: tuple) -> dict[Config, dict]:
        """Config -> its stored record for `key`, from the user cache, for records whose config is
        the key's default or one of the space's for the key (a record read from disk is reused
        only then, never trusted blindly) and whose time, if it has one, is a time.

        A record of a timing stopped early (any true `stopped_early`) says only "clearly slower
        than the best of its tuning": it is reused when a full timing reused with it is faster,
        so that what it lost to is still there, and never for the default (whose time the entry
        reports); otherwise its config is timed again."""
        stored = self._valid_user().get(encode_key(key))
        full, stopped = {}, {}
        for record in timing_records(stored.entry) if stored else ():
            try:
                config = Config.from_dict(record["config"])
            except (TypeError, ValueError):
                continue
            if "timing" in record and entry_time(record) == float("inf"):
                continue
            if self.config_problem(key, config) is None:
                (stopped if record.get("stopped_early") else full)[config] = record
        fastest = min((entry_time(r) for r in full.values() if "timing" in r), default=float("inf"))
        default = self.default(key)
        for config, record in stopped.items():
            if config != default and "timing" in record and fastest < entry_time(record):
                full[config] = record
        return full

    def _upcoming(self, search, known: dict[Config, dict]) -> list[Config]:
        """The configs the search has decided to ask next (`pending()`, for strategies that
        have it), less those whose stored timings will be reused."""
        pending = getattr(search, "pending", None)
        upcoming = pending() if callable(pending) else []
        return [c for c in upcoming if not (c in known and "timing" in known[c])]

    def _precompiler(self, launch, precompile: bool | None) -> Precompiler | None:
        """What keeps worker processes compiling the configs about to be timed (precompile.py),
        or None: when precompiling is off (False, or None without a GPU), under the interpreter
        (nothing is compiled there: precompiling is a no-op by design), or when this Triton or
        device cannot be precompiled for (one warning)."""
        if precompile is None:
            precompile = _device.gpu_available()
        if not precompile or _device.interpreter_active():
            return None
        why = unavailable_reason()
        if why is None:
            try:
                return Precompiler(shared_pool(self.compile_workers), launch)
            except Exception as e:  # noqa: BLE001 - no driver to name the target, workers that cannot start
                why = f"{type(e).__name__}: {e}"
        warn_once(("precompile", why), f"autotune: {self.name}: configs are compiled at their launch, not ahead: {why}")
        return None

    def _measure(self, launch, config: Config, key: tuple, reference, timer, bound_ms: float | None = None) -> dict:
        """Run `config`, check its output against the reference and time it. With `bound_ms`
        (the best median so far), a timer that takes it may stop early; the record then says
        `"stopped_early": true` and its timing is the probe's."""
        record: dict[str, Any] = {"config": config.to_dict()}
        try:
            out = launch(config)
            if not self.check(out, reference):
                record["error"] = "wrong result: output differs from the default config's"
                return record
            timing = _time(timer, lambda: launch(config), config, key, bound_ms)
            record["timing"] = timing.to_dict()
            if getattr(timing, "stopped_early", False):
                record["stopped_early"] = True
        except Exception as e:  # noqa: BLE001 - compile errors, out of resources, launch errors
            record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return record

    def _entry(self, key, results: dict[Config, dict], default: Config, strategy: str, evaluations: int,
               timer) -> dict | None:
        # a timing stopped early is a probe's, of a config clearly slower than another: never a
        # winner or runner-up, but kept in "timings" (with its flag) as known slower
        ok = [(r["timing"]["p50"], c) for c, r in results.items() if "timing" in r and not r.get("stopped_early")]
        if not ok:
            return None
        best_ms = min(ms for ms, _ in ok)
        tied = [c for ms, c in ok if ms <= best_ms * (1.0 + self.tie)]
        # the default when it ties (a tuned winner is then never slower than the default: any
        # other config wins only by more than the tie), else the first tied config in order
        winner = default if default in tied else min(tied, key=self.space.order)
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
