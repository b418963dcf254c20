"""Compiling a tuner's candidates ahead of timing them, in worker processes.

On a GPU, tuning is compile-bound: a Triton config compiles in ~0.5-3 s and is timed in
~0.1 s. This module finds the Triton kernel launches a config makes, without running
them, and compiles each one in a pool of worker processes while the tuner times the
configs before it. The workers only fill Triton's on-disk cache ($TRITON_CACHE_DIR,
default ~/.triton/cache); when the tuner then launches the config, the JIT of this
process computes the same cache key, finds the binary on disk and only loads it.

    pool = CompilePool(workers=8)                    # target: this process's GPU
    for job in launch_jobs(lambda: launch(config), pool.target):
        pool.submit(job)                             # a Future of a CompileResult

The pieces:

  capture_launches(call)   runs `call()` with every `JITFunction` launch (`kernel[grid](...)`,
                           `kernel.run`, `kernel.warmup`) recorded instead of compiled and run,
                           in this thread only: other threads launch as usual meanwhile.
  compile_job(launch, target)
                           a launch as a CompileJob: specialised by Triton's own binder
                           (`create_function_from_signature`, pointer and integer divisibility
                           by 16, integers equal to 1) and packed by `JITFunction._pack_args`,
                           with the keyword arguments `JITFunction.run` adds, so the job is
                           what the JIT itself would hand to `triton.compile`.
  run_job(job)             compiles a job (in a worker, or in this process); never raises: a
                           failure is a CompileResult with ok False and the error. The tuner
                           still tries such a config and records the real error at its launch.
  CompilePool              a ProcessPoolExecutor with the "spawn" context. A worker imports
                           the kernel by module and qualified name, checks that its
                           `cache_key` is the one this process computed, and compiles for the
                           target it is given: it needs no GPU and never touches one.
  Precompiler              what the tuner uses: keeps a pool compiling the configs a search
                           will ask next, never more than `ahead` at a time.

A job carries this process's Triton environment (the TRITON_* variables, the variables
Triton's cache key includes, and the cache directory it resolves), so the worker compiles
and keys it alike. What a worker cannot see: knobs set from Python rather than the
environment (`triton.knobs.compilation.*`), a custom cache manager
($TRITON_CACHE_MANAGER works, being a variable; one set from Python does not), and kernels
a worker cannot import (defined in `__main__`, inside a function, or generated at run
time: `launch_jobs` leaves these out, with the reason, and the JIT compiles them at launch).

Under TRITON_INTERPRET=1 nothing is compiled, so there is nothing to precompile:
`unavailable_reason()` says so and the tuner skips this module entirely. Capturing would
not even work there: the interpreter's kernels are not `JITFunction`s.

What is verified without a GPU (tests/test_precompile.py, on a CPU-only machine, for
GPUTarget("cuda", 90, 32) with Triton's bundled ptxas, under Triton 3.9 and 3.6): the
capture finds a matmul config's launch through the real launcher and runs nothing; a job's
signature, constexprs, attributes and options equal those the real `JITFunction.run` hands
to its compile step, and its cache hash equals the one computed from them (run is driven
by a stand-in driver that only names the device, stream and target); a job compiled by a
worker lands in the given $TRITON_CACHE_DIR; after it, the real `run` of this process
(with warmup=True: compile, no launch) is a cache hit on the worker's hash, and so is the
same job compiled again here (nothing new written); broken jobs come back as results; and
a "spawn" worker does not run an unguarded main script again.

What is not verified without a GPU: the same on a real device, where the binder sees CUDA
tensors (their pointers are 16-byte aligned like the CPU tensors' here, but that is
reasoning, not a test), the target comes from `driver.active.get_current_target()`, and
the cached binary is then loaded and launched; and the wall-clock gain of overlapping
compiles with timing, which needs a GPU to time on (perf/compile_bench.py measures the
compile side alone).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import importlib.machinery
import inspect
import os
import pickle
import re
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable, NamedTuple

from .device import interpreter_active

# Default workers: the CPUs less one, which the tuning process needs for timing and
# launching; at most this many, as each worker holds its own import of the kernels'
# modules (with torch, several hundred MB).
MAX_DEFAULT_WORKERS = 16

# How long the tuner waits for a config's compile before going on without it (its JIT
# then compiles it, or reports what went wrong): a stuck compiler must not stop tuning.
COMPILE_WAIT_S = 600.0


# --------------------------------------------------------------------------- capture


class KernelLaunch(NamedTuple):
    """One captured launch: the JITFunction, what its `run` was given (warmup aside) and its
    grid (a tuple, or a callable of the launch's meta-parameters, as given)."""

    fn: Any
    args: tuple
    kwargs: dict
    grid: Any = None


_capture_lock = threading.Lock()
_capture_local = threading.local()
_patched: dict[str, Any] = {}  # "run": JITFunction.run as it was before the first capture (kept after)
_capture_users = 0


def _jit_function_class():
    from triton.runtime.jit import JITFunction

    return JITFunction


def _capturing_run(self, *args, grid=None, warmup=False, **kwargs):
    """JITFunction.run while some thread captures: that thread's launches are recorded and
    return None (nothing compiled, nothing run); every other thread's run as usual."""
    launches = getattr(_capture_local, "launches", None)
    if launches is None:
        return _patched["run"](self, *args, grid=grid, warmup=warmup, **kwargs)
    launches.append(KernelLaunch(self, args, dict(kwargs), grid))
    return None


@contextlib.contextmanager
def _run_patched() -> Iterable[None]:
    """JITFunction.run replaced by `_capturing_run` while any thread captures. The class is
    patched, not the kernels, so launches through any reference (a module global, a wrapper
    such as triton.autotune, a kernel built at run time) are seen; the first capture installs
    the patch and the last one to end restores what was there."""
    global _capture_users
    cls = _jit_function_class()
    with _capture_lock:
        if _capture_users == 0:
            _patched["run"] = cls.__dict__["run"]
            cls.run = _capturing_run
        _capture_users += 1
    try:
        yield
    finally:
        with _capture_lock:
            _capture_users -= 1
            if _capture_users == 0:
                cls.run = _patched["run"]  # left in _patched: a run already past the check still finds it


def capturing() -> bool:
    """This thread is inside `capture_launches`: its kernel launches run nothing."""
    return getattr(_capture_local, "launches", None) is not None


def capture_launches(call: Callable[[], Any]) -> list[KernelLaunch]:
    """The Triton JIT launches `call()` makes, none of them compiled or run.

    `call` runs otherwise as usual (a launcher allocates its outputs, torch ops run); a
    captured launch returns None where a real one returns the compiled kernel. An exception
    from `call` propagates. Nested captures in one thread each see their own launches.
    Under TRITON_INTERPRET=1 kernels are not JITFunctions: nothing would be captured and they
    would run, so that is a RuntimeError here."""
    if interpreter_active():
        raise RuntimeError("capture_launches: under TRITON_INTERPRET=1 kernels are interpreted, not JIT-compiled")
    outer = getattr(_capture_local, "launches", None)
    launches: list[KernelLaunch] = []
    with _run_patched():
        _capture_local.launches = launches
        try:
            call()
        finally:
            _capture_local.launches = outer
    return launches


# --------------------------------------------------------------------------- jobs


class UnsupportedLaunch(ValueError):
    """A launch that cannot become a job a worker compiles to the JIT's own cache key."""


@dataclasses.dataclass(frozen=True)
class KernelRef:
    """A JIT function passed as a constexpr, by where a worker imports it from."""

    module: str
    qualname: str


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """What `triton.compile` needs for one launch, in a form a worker process can take.

    module, qualname: where the worker imports the kernel; kernel_key: its `cache_key` here,
    which the worker's import must match. signature, constexprs, attrs, options: as
    `JITFunction._pack_args` packs them (options as `options.__dict__`, as the JIT passes
    them). target: the GPUTarget. env: the Triton environment of the process that made it."""

    module: str
    qualname: str
    kernel_key: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: Any
    env: dict

    @property
    def name(self) -> str:
        return self.qualname

    def source(self, fn) -> Any:
        """The `triton.compiler.ASTSource` of this job for its kernel `fn` (a JITFunction)."""
        from triton.compiler import ASTSource

        return ASTSource(fn, self.signature, {k: _decode(v) for k, v in self.constexprs.items()}, self.attrs)

    def identity(self) -> str:
        """Equal for two jobs exactly when they compile the same binary."""
        return repr((self.module, self.qualname, self.kernel_key, sorted(self.signature.items(), key=repr),
                     sorted(self.constexprs.items(), key=repr), sorted(self.attrs.items(), key=repr),
                     sorted(self.options.items()), self.target, sorted(self.env.items())))


# What JITFunction.run adds to a launch's keyword arguments before binding them, each value
# read as run reads it (Triton 3.6: debug and instrumentation_mode; 3.9 adds
# fpsan_homomorphic_casts). unavailable_reason() checks run's source for others.
def _run_added_kwargs(fn, kwargs: dict, knobs) -> dict[str, Callable[[], Any]]:
    return {
        "debug": lambda: kwargs.get("debug", fn.debug) or knobs.runtime.debug,
        "instrumentation_mode": lambda: knobs.compilation.instrumentation_mode,
        "fpsan_homomorphic_casts": lambda: knobs.compilation.fpsan_homomorphic_casts,
    }


@functools.lru_cache(maxsize=None)
def _names_run_adds() -> tuple[str, ...] | None:
    """The names JITFunction.run of the installed Triton sets in its kwargs (`kwargs["x"] =`),
    read from its source; None when the source cannot be read."""
    cls = _jit_function_class()
    run = _patched.get("run", cls.__dict__["run"])  # the original, also while a capture runs
    try:
        source = inspect.getsource(run)
    except (OSError, TypeError):
        return None
    return tuple(dict.fromkeys(re.findall(r"""kwargs\[["'](\w+)["']\]\s*=""", source)))


def unavailable_reason() -> str | None:
    """Why this process cannot precompile, or None when it can."""
    if interpreter_active():
        return "under TRITON_INTERPRET=1 kernels are interpreted, not compiled: there is nothing to precompile"
    try:
        from triton import knobs
    except ImportError as e:
        return f"this Triton has no knobs module ({e}): too old to precompile for"
    names = _names_run_adds()
    if names is not None:
        unknown = sorted(set(names) - set(_run_added_kwargs(None, {}, knobs)))
        if unknown:
            return (f"JITFunction.run of Triton {_triton_version()} sets options {unknown} that this module does "
                    f"not know: its jobs would not have the JIT's cache keys")
    if getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None:
        return "triton.knobs.runtime.add_stages_inspection_hook is set: workers cannot reproduce its pipeline"
    return None


def _triton_version() -> str:
    import triton

    return triton.__version__


def current_target():
    """The GPUTarget of this process's active device (what the JIT compiles for)."""
    from triton.runtime import driver

    return driver.active.get_current_target()


_binders: dict[tuple, tuple] = {}
_binders_lock = threading.Lock()


def _binder(fn, target):
    """Triton's own binder for `fn` on `target` (what JITFunction.create_binder builds per
    device), with the backend: made once per kernel and target."""
    key = (id(fn), target)
    with _binders_lock:
        found = _binders.get(key)
        if found is not None and found[0] is fn:
            return found[1], found[2]
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    with _binders_lock:
        _binders[key] = (fn, backend, binder)  # fn kept: its id stays its own
    return backend, binder


def triton_env() -> dict[str, str]:
    """The environment a worker needs to compile as this process would: every TRITON_*
    variable but TRITON_INTERPRET, the variables Triton's cache key includes, and
    TRITON_CACHE_DIR as this process resolves it (set from Python or defaulted included)."""
    from triton import knobs
    from triton.runtime.jit import get_cache_invalidating_env_vars

    env = {k: v for k, v in os.environ.items() if k.startswith("TRITON_") and k != "TRITON_INTERPRET"}
    env.update(get_cache_invalidating_env_vars())
    env["TRITON_CACHE_DIR"] = str(knobs.cache.dir)
    return env


def _encode(value: Any) -> Any:
    """A constexpr value a worker can unpickle: JIT functions by reference."""
    jit_types = tuple(t for t in (getattr(sys.modules.get("triton.runtime.jit"), n, None)
                                  for n in ("JITCallable", "JITFunction")) if isinstance(t, type))
    if jit_types and isinstance(value, jit_types):
        return KernelRef(*_where(value))
    constexpr = getattr(sys.modules.get("triton.language.core"), "constexpr", None)
    if isinstance(constexpr, type) and isinstance(value, constexpr):
        inner = _encode(value.value)
        return value if inner is value.value else constexpr(inner)
    if isinstance(value, tuple):
        items = tuple(_encode(v) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else items
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, KernelRef):
        return _import_kernel(value.module, value.qualname)
    constexpr = getattr(sys.modules.get("triton.language.core"), "constexpr", None)
    if isinstance(constexpr, type) and isinstance(value, constexpr) and isinstance(value.value, (KernelRef, tuple)):
        return constexpr(_decode(value.value))
    if isinstance(value, tuple):
        items = tuple(_decode(v) for v in value)
        return type(value)(*items) if hasattr(value, "_fields") else items
    return value


def _where(fn) -> tuple[str, str]:
    """(module, qualified name) a worker imports `fn` from; UnsupportedLaunch when it cannot."""
    module, qualname = fn.fn.__module__, fn.fn.__qualname__
    if module == "__main__" or module is None:
        raise UnsupportedLaunch(f"{qualname} is defined in __main__, which a worker does not import")
    if "<locals>" in qualname:
        raise UnsupportedLaunch(f"{module}.{qualname} is defined inside a function, where a worker cannot find it")
    return module, qualname


def compile_job(launch: KernelLaunch, target) -> CompileJob:
    """The job of one captured launch for `target`: specialised and packed by Triton's own
    code as JITFunction.run does it. UnsupportedLaunch when no worker could compile it to the
    JIT's key (see `unavailable_reason`, and kernels a worker cannot import)."""
    why = unavailable_reason()
    if why is not None:
        raise UnsupportedLaunch(why)
    from triton import knobs

    fn = launch.fn
    module, qualname = _where(fn)
    backend, binder = _binder(fn, target)
    kwargs = dict(launch.kwargs)
    added = _run_added_kwargs(fn, kwargs, knobs)
    for name in _names_run_adds() or [n for n in added if _has_knob(n, knobs)]:
        kwargs[name] = added[name]()
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    job = CompileJob(module, qualname, fn.cache_key, dict(signature),
                     {path: _encode(value) for path, value in constexprs.items()}, dict(attrs),
                     dict(options.__dict__), target, triton_env())
    try:
        pickle.dumps(job)
    except Exception as e:  # noqa: BLE001 - a constexpr value that does not pickle
        raise UnsupportedLaunch(f"{qualname}: a constexpr cannot be sent to a worker ({type(e).__name__}: {e})") \
            from None
    return job


def _has_knob(name: str, knobs) -> bool:
    return name == "debug" or hasattr(knobs.compilation, name)


class Jobs(NamedTuple):
    """The jobs of one call's launches, and why the others are left out."""

    jobs: list[CompileJob]
    skipped: list[str]


def launch_jobs(call: Callable[[], Any], target) -> Jobs:
    """The jobs of every launch `call()` makes (see capture_launches), once each; launches
    that cannot become jobs are listed in `skipped` with the reason."""
    jobs: dict[str, CompileJob] = {}
    skipped = []
    for launch in capture_launches(call):
        try:
            job = compile_job(launch, target)
        except UnsupportedLaunch as e:
            skipped.append(str(e))
            continue
        jobs.setdefault(job.identity(), job)
    return Jobs(list(jobs.values()), skipped)


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """ok: compiled (or found in the cache); hash: Triton's cache hash of the binary;
    cache_hit: it was already in the cache; error: what went wrong, when not ok."""

    kernel: str
    ok: bool
    seconds: float
    hash: str | None = None
    cache_hit: bool = False
    error: str | None = None


def _apply_env(env: dict[str, str]) -> None:
    """Make this process's Triton environment the one a job was made in. TRITON_INTERPRET is
    left alone: a worker has none (`_worker_start`), and a process with it cannot compile."""
    from triton.runtime.jit import get_cache_invalidating_env_vars

    stale = {k for k in os.environ if k.startswith("TRITON_")} | set(get_cache_invalidating_env_vars())
    for name in stale - set(env) - {"TRITON_INTERPRET"}:
        os.environ.pop(name, None)
    os.environ.update(env)


def _import_kernel(module: str, qualname: str):
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    jit = _jit_function_class()
    seen = set()
    while not isinstance(obj, jit) and hasattr(obj, "fn") and id(obj) not in seen:
        seen.add(id(obj))  # triton.autotune, triton.heuristics and similar wrappers keep the kernel in .fn
        obj = obj.fn
    if not isinstance(obj, jit):
        raise TypeError(f"{module}.{qualname} is a {type(obj).__name__}, not a Triton JIT function")
    return obj


_listener_lock = threading.Lock()


def run_job(job: CompileJob) -> CompileResult:
    """Compile `job` into Triton's cache as the job's environment names it; in a worker, or
    in this process (whose environment then becomes the job's). Never raises."""
    t0 = time.perf_counter()
    try:
        _apply_env(job.env)
        import triton
        from triton import knobs

        fn = _import_kernel(job.module, job.qualname)
        if fn.cache_key != job.kernel_key:
            raise RuntimeError(f"{job.module}.{job.qualname} imported here differs from the tuning process's "
                               f"(another source or constexpr globals): its binary would not be the one the JIT "
                               f"looks up")
        src = job.source(fn)
        hits = []
        with _listener_lock:
            previous = knobs.compilation.listener

            def listener(**kw):
                hits.append(bool(kw.get("cache_hit")))
                if previous is not None:
                    previous(**kw)

            knobs.compilation.listener = listener
            try:
                kernel = triton.compile(src, target=job.target, options=dict(job.options))
            finally:
                knobs.compilation.listener = previous
        return CompileResult(job.name, True, time.perf_counter() - t0, kernel.hash, bool(hits and hits[-1]))
    except Exception as e:  # noqa: BLE001 - compile errors, out of resources: the tuner sees them at launch
        text = str(e).strip()
        return CompileResult(job.name, False, time.perf_counter() - t0,
                             error=f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"[:500])


def _worker_start() -> None:
    """A worker's first act: no interpreter (jobs bring their environment), Triton loaded."""
    os.environ.pop("TRITON_INTERPRET", None)
    importlib.import_module("triton")  # once per worker, before the first job


def _worker_ready() -> int:
    return os.getpid()


def default_workers() -> int:
    """The CPUs this process may use less one, between 1 and MAX_DEFAULT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, MAX_DEFAULT_WORKERS))


@contextlib.contextmanager
def _main_not_rerun() -> Iterable[None]:
    """While workers start: a "spawn" child runs the parent's main script again (as
    `__mp_main__`) before it takes work, and a script without an `if __name__ == "__main__"`
    guard would load its model, call its ops and tune again in every worker. Workers need
    nothing from `__main__` (jobs name their kernels by module), so the child is told the
    main module is one it must not run: multiprocessing skips a main named `__main__`."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    missing = object()
    saved = main.__dict__.get("__spec__", missing)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        if saved is missing:
            main.__dict__.pop("__spec__", None)
        else:
            main.__spec__ = saved


class CompilePool:
    """Worker processes ("spawn" context) compiling CompileJobs for `target` into Triton's cache.

    workers: how many (default_workers()); target: a GPUTarget (default: this process's GPU).
    The workers start at the first submit (or `start()`), all at once. `submit(job)` gives a
    Future of the job's CompileResult; a job already submitted gives the first Future again.
    A pool whose worker died (`broken` says why) takes no more jobs: submit raises
    BrokenProcessPool, and the Futures it still held give that error."""

    def __init__(self, workers: int | None = None, target=None):
        self.workers = int(workers) if workers is not None else default_workers()
        if self.workers < 1:
            raise ValueError(f"a compile pool needs at least one worker, got {workers}")
        self.target = target if target is not None else current_target()
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.broken: str | None = None

    @property
    def started(self) -> bool:
        """The workers have been started (they may still be importing)."""
        return self._executor is not None

    def start(self) -> None:
        """Start every worker now (each imports Triton), not at the first jobs."""
        with self._lock:
            self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.broken is not None:
            raise concurrent.futures.process.BrokenProcessPool(self.broken)
        if self._executor is None:
            import multiprocessing

            executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start)
            # Python starts "spawn" workers one per submit while none is idle: as many tasks as
            # workers start them all here, where the main script is kept from running again
            with _main_not_rerun():
                for _ in range(self.workers):
                    executor.submit(_worker_ready)
            self._executor = executor
        return self._executor

    def submit(self, job: CompileJob) -> concurrent.futures.Future:
        identity = job.identity()
        with self._lock:
            future = self._futures.get(identity)
            if future is not None and not future.cancelled():
                return future
            try:
                future = self._start().submit(run_job, job)
            except concurrent.futures.process.BrokenProcessPool as e:
                self.broken = self.broken or str(e)
                raise
            self._futures[identity] = future
        return future

    def note_broken(self, why: str) -> None:
        with self._lock:
            self.broken = self.broken or why

    def shutdown(self, wait: bool = True) -> None:
        """Stop the workers; jobs not started are cancelled."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._futures.clear()
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> "CompilePool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


_shared: dict[tuple, CompilePool] = {}
_shared_lock = threading.Lock()


def shared_pool(workers: int | None = None, target=None) -> CompilePool:
    """The process's pool for (workers, target), made at the first call and kept, so the
    workers' start (each imports Triton and, at its first job, the kernels' modules) is paid
    once per process, not once per tuned key. A broken pool is replaced."""
    workers = int(workers) if workers is not None else default_workers()
    target = target if target is not None else current_target()
    with _shared_lock:
        pool = _shared.get((workers, target))
        if pool is None or pool.broken is not None:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _shared[(workers, target)] = CompilePool(workers, target)
        return pool


def shutdown_shared_pools() -> None:
    """Stop every shared pool's workers (also done at exit)."""
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.shutdown(wait=False)


import atexit  # noqa: E402 - registered after the function it calls

atexit.register(shutdown_shared_pools)


# --------------------------------------------------------------------------- the tuner's side


_warned: set = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class Precompiler:
    """Keeps a CompilePool compiling the configs a tuner will time next.

    launch: config -> runs the kernel(s) once (the tuner's `launch`); its launches are
    captured, never run, to make the jobs. `submit(config)` sends a config's jobs now;
    `feed(configs)` sends those of the first configs not yet sent while fewer than `ahead`
    jobs are pending in the pool (default: twice the workers); `wait(config)` waits for a
    config's compiles to end, whatever their result. Nothing here raises for a config that
    does not capture or compile: the tuner's own launch of it reports the error.
    `warm`: the pool's workers were started before; a cold pool's first compile also waits
    for its workers to start and import the kernels (seconds)."""

    def __init__(self, pool: CompilePool, launch: Callable[[Any], Any], ahead: int | None = None):
        self.pool = pool
        self.launch = launch
        self.ahead = ahead if ahead is not None else 2 * pool.workers
        self.warm = bool(getattr(pool, "started", True))
        self.futures: dict[Any, list[concurrent.futures.Future]] = {}
        self.skipped: dict[Any, list[str]] = {}  # config -> launches or captures left out, and why

    def pending(self) -> int:
        """Jobs sent and not finished."""
        return sum(not f.done() for fs in self.futures.values() for f in fs)

    def submit(self, config: Any) -> None:
        if config in self.futures or self.pool.broken is not None:
            return
        try:
            jobs, skipped = launch_jobs(lambda: self.launch(config), self.pool.target)
        except Exception as e:  # noqa: BLE001 - the launcher itself fails: the tuner's launch will say why
            jobs, skipped = [], [f"capture: {type(e).__name__}: {e}"]
        futures = []
        for job in jobs:
            try:
                futures.append(self.pool.submit(job))
            except concurrent.futures.process.BrokenProcessPool as e:
                self._broken(e)
                break
        self.futures[config] = futures
        if skipped:
            self.skipped[config] = skipped

    def feed(self, configs: Iterable[Any]) -> None:
        for config in configs:
            if self.pending() >= self.ahead:
                return
            self.submit(config)

    def wait(self, config: Any, timeout: float = COMPILE_WAIT_S) -> None:
        futures = self.futures.get(config, [])
        done, _ = concurrent.futures.wait(futures, timeout=timeout)
        for f in done:
            if not f.cancelled() and isinstance(f.exception(), concurrent.futures.process.BrokenProcessPool):
                self._broken(f.exception())

    def results(self, config: Any) -> list[CompileResult]:
        """The results of a config's finished compiles."""
        return [f.result() for f in self.futures.get(config, []) if f.done() and not f.cancelled()
                and f.exception() is None]

    def close(self) -> None:
        """Cancel the compiles not started (configs the search never asked for)."""
        for futures in self.futures.values():
            for f in futures:
                f.cancel()

    def _broken(self, error: BaseException) -> None:
        self.pool.note_broken(str(error) or type(error).__name__)
        _warn_once(f"broken {id(self.pool)}",
                   f"autotune: a compile worker died ({error}); configs are compiled at their launch from now on")
