"""Compiling ahead (autotune/precompile.py) and stopping slow timings early (autotune/timing.py).

What must compile for sm90 runs in a subprocess without TRITON_INTERPRET (`sm90_facts`,
one run shared by the tests that read it): the capture of a real matmul launch, the job's
equality with what the JIT itself compiles, a pool worker's compile into a given
TRITON_CACHE_DIR and the cache hits that follow. Everything else runs here, under the
interpreter, with fakes standing in for the pool and for GPU timing.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import autotune
from autotune import Config, Timing, precompile
from autotune.cache import encode_key
from autotune.timing import EARLY_STOP_MARGIN, GPUTimer, WallClockTimer

from .test_autotune import BEST, SPACE, CountingTimer, landscape_ms, make_tuner

ROOT = Path(__file__).resolve().parent.parent
MATMUL_CONFIG = Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)


# --------------------------------------------------------------------------- capture, in this process


def _toy_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass


def _jit_toy():
    """A real JITFunction, whatever TRITON_INTERPRET says (the decorator would give an
    interpreted function here)."""
    from triton.runtime.jit import JITFunction

    return JITFunction(_toy_kernel)


def test_capture_records_launches_in_its_own_thread_only(monkeypatch):
    from triton.runtime.jit import JITFunction

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ran = []

    def real_run(self, *args, grid, warmup, **kwargs):  # stands in for JITFunction.run: no GPU here
        ran.append((threading.current_thread().name, args[1], kwargs))

    monkeypatch.setattr(JITFunction, "run", real_run)
    kernel = _jit_toy()
    x = torch.full((16,), 7.0)
    called = threading.Event()

    def launch_elsewhere():
        kernel[(1,)](x, 99, BLOCK=64)
        called.set()

    def launcher():
        kernel[(1,)](x, 16, BLOCK=16)
        worker = threading.Thread(target=launch_elsewhere, name="elsewhere")
        worker.start()
        assert called.wait(30)
        kernel.run(x, 3, grid=(2,), warmup=False, BLOCK=32)

    launches = precompile.capture_launches(launcher)
    assert [(la.fn, la.args[1], la.kwargs) for la in launches] == [(kernel, 16, {"BLOCK": 16}),
                                                                 (kernel, 3, {"BLOCK": 32})]
    assert launches[0].args[0] is x and torch.equal(x, torch.full((16,), 7.0))
    assert ran == [("elsewhere", 99, {"BLOCK": 64})]  # the other thread's launch ran as usual, meanwhile
    assert JITFunction.__dict__["run"] is real_run  # restored
    kernel[(1,)](x, 5, BLOCK=16)
    assert ran[-1] == ("MainThread", 5, {"BLOCK": 16})


def test_capture_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert precompile.unavailable_reason() and "TRITON_INTERPRET" in precompile.unavailable_reason()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        precompile.capture_launches(lambda: None)


# --------------------------------------------------------------------------- sm90, in a subprocess


def _no_interpreter_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def stand_in_driver(target):
    """A driver class for JITFunction.run without a GPU: device 0, stream 0, and `target`."""
    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return target

    return StandInDriver


def sm90_checks() -> dict:
    """Run in a process without TRITON_INTERPRET; returns the facts the tests check."""
    import dataclasses
    import hashlib
    import time

    cache = os.environ["TRITON_CACHE_DIR"]  # empty: made by the fixture
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import driver
    from triton.runtime.cache import get_cache_key
    from triton.runtime.jit import get_cache_invalidating_env_vars

    from tritonops import runtime
    from tritonops.kernels.matmul import _matmul_fwd_kernel
    from tritonops.ops.matmul import launch_matmul

    runtime.POISON = False
    target = GPUTarget("cuda", 90, 32)
    facts = {"triton": triton.__version__}

    # the launches of one matmul config, through the real launcher: nothing runs
    a, b = torch.randn(1, 128, 256, dtype=torch.float16), torch.randn(1, 256, 192, dtype=torch.float16)
    out = torch.full((1, 128, 192), 7.0, dtype=torch.float16)
    launches = precompile.capture_launches(lambda: launch_matmul(a, b, out=out, config=MATMUL_CONFIG))
    facts["captured"] = [[la.fn.__name__, {k: la.kwargs.get(k) for k in [*MATMUL_CONFIG.meta, "num_warps",
                                                                         "num_stages"]}] for la in launches]
    facts["out_untouched"] = bool((out == 7).all())
    job = precompile.compile_job(launches[0], target)

    # what JITFunction.run itself hands to its compile step, with a stand-in driver reporting sm90
    seen = []
    _matmul_fwd_kernel._do_compile = lambda *args: seen.append(args)  # key, signature, device, constexprs,
    driver.set_active(stand_in_driver(target)())  # options, attrs, warmup; None ends run before a launch
    launch_matmul(a, b, out=out, config=MATMUL_CONFIG)
    del _matmul_fwd_kernel._do_compile
    _, signature, _, constexprs, options, attrs, _ = seen[0]
    facts["same_as_jit"] = {"signature": signature == job.signature, "constexprs": constexprs == job.constexprs,
                            "attrs": attrs == job.attrs, "options": options.__dict__ == job.options}
    backend = make_backend(target)
    src = ASTSource(_matmul_fwd_kernel, signature, constexprs, attrs)
    parsed = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    facts["jit_hash"] = hashlib.sha256(get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
                                       .encode()).hexdigest()

    # a worker compiles the job into TRITON_CACHE_DIR; broken jobs come back as results
    block_k = (_matmul_fwd_kernel.arg_names.index("BLOCK_K"),)
    too_small = dataclasses.replace(job, constexprs={**job.constexprs, block_k: 8})  # tl.dot needs K >= 16
    other_source = dataclasses.replace(job, kernel_key="0" * 64)
    with precompile.CompilePool(1, target) as pool:
        futures = [pool.submit(j) for j in (job, too_small, other_source)]
        facts["resubmit_same_future"] = pool.submit(job) is futures[0]
        worker, *broken = [dataclasses.asdict(f.result(timeout=300)) for f in futures]
    facts["worker"], facts["broken"] = worker, broken
    facts["entries_after_worker"] = sorted(os.listdir(cache))

    # the JIT's own run (warmup: compile, no launch) then finds the worker's binary
    hits = []
    knobs.compilation.listener = lambda **kw: hits.append((bool(kw.get("cache_hit")), kw["metadata"]["hash"]))
    t0 = time.perf_counter()
    _matmul_fwd_kernel.run(*launches[0].args, grid=(1,), warmup=True, **launches[0].kwargs)
    facts["jit_run"] = {"seconds": time.perf_counter() - t0, "hits": hits}
    knobs.compilation.listener = None
    driver.set_active(None)
    again = precompile.run_job(job)
    facts["parent"] = dataclasses.asdict(again)
    facts["entries_after_parent"] = sorted(os.listdir(cache))
    return facts


def facts_in_a_compiling_process(tmp_path_factory, checks: str) -> dict:
    """What `checks()` of this module returns, run in a process without the interpreter (so
    kernels compile for sm90) and with a fresh Triton cache directory."""
    env = {**_no_interpreter_env(), "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp(f"{checks}-cache"))}
    code = f"import json, tests.test_precompile as t; print('FACTS ' + json.dumps(t.{checks}()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("FACTS ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    return json.loads(lines[-1][len("FACTS "):])


@pytest.fixture(scope="module")
def sm90_facts(tmp_path_factory):
    return facts_in_a_compiling_process(tmp_path_factory, "sm90_checks")


def test_capture_finds_a_matmul_configs_launch_and_runs_nothing(sm90_facts):
    assert sm90_facts["captured"] == [["_matmul_fwd_kernel", {**MATMUL_CONFIG.meta, "num_warps": 4,
                                                               "num_stages": 2}]]
    assert sm90_facts["out_untouched"]


def test_a_job_is_what_the_jit_compiles(sm90_facts):
    assert sm90_facts["same_as_jit"] == {"signature": True, "constexprs": True, "attrs": True, "options": True}
    assert sm90_facts["worker"]["hash"] == sm90_facts["jit_hash"]


def test_a_workers_compile_lands_in_the_cache_and_the_jit_then_hits_it(sm90_facts):
    worker, jit_run, parent = sm90_facts["worker"], sm90_facts["jit_run"], sm90_facts["parent"]
    assert worker["ok"] and not worker["cache_hit"], worker
    assert len(sm90_facts["entries_after_worker"]) >= 1
    assert jit_run["hits"] == [[True, worker["hash"]]]  # the JIT's own compile step: loaded, not compiled
    assert parent["ok"] and parent["cache_hit"] and parent["hash"] == worker["hash"]
    assert parent["seconds"] < worker["seconds"]
    assert sm90_facts["entries_after_parent"] == sm90_facts["entries_after_worker"]  # nothing new written
    assert sm90_facts["resubmit_same_future"]


def test_a_broken_job_is_reported_not_raised(sm90_facts):
    too_small, other_source = sm90_facts["broken"]
    assert not too_small["ok"] and "K >= 16" in too_small["error"], too_small
    assert not other_source["ok"] and "differs" in other_source["error"], other_source


@triton.jit
def _double_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


def tuner_checks() -> dict:
    """Run in a process without TRITON_INTERPRET: Tuner.tune with a real compile pool, over a
    kernel whose launch only compiles (run with warmup=True, a stand-in driver naming sm90),
    so this process's JIT compiles every config it tunes. Returns what its compiles found."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    target = GPUTarget("cuda", 90, 32)
    stand_in = stand_in_driver(target)

    def runner(key):
        x = torch.zeros(4096)

        def launch(config):
            _double_kernel.run(x, 4096, grid=(1,), warmup=True, BLOCK=config["BLOCK"], num_warps=config.num_warps,
                               num_stages=config.num_stages)
            return torch.zeros(3)
        return launch

    compiles = []
    knobs.compilation.listener = lambda **kw: compiles.append(
        [kw["metadata"]["name"], kw["metadata"]["num_warps"], bool(kw.get("cache_hit"))])
    driver.set_active(stand_in())
    space = autotune.Space({"BLOCK": [128, 256, 512]}, num_warps=[1, 2], num_stages=[1])
    tuner = autotune.Tuner("double", space, lambda key: Config({"BLOCK": 128}, num_warps=1, num_stages=1),
                           runner=runner, timer=lambda run, config, key: Timing(1.0, 1.0, 1.0),
                           cache_dir=os.environ["TRITON_CACHE_DIR"] + "-autotune", strategy="exhaustive",
                           precompile=True, compile_workers=1)
    entry = tuner.tune((1,))
    precompile.shutdown_shared_pools()
    return {"compiles": compiles, "timed": len(entry["timings"]), "configs": len(space.configs())}


@pytest.fixture(scope="module")
def tuner_facts(tmp_path_factory):
    return facts_in_a_compiling_process(tmp_path_factory, "tuner_checks")


def test_tuning_with_a_compile_pool_finds_its_configs_compiled(tuner_facts):
    compiles = tuner_facts["compiles"]
    assert tuner_facts["timed"] == tuner_facts["configs"] == 6
    # one compile per config here: the default's may miss (the JIT compiles it while the
    # workers start); every other config's was compiled by a worker and only loaded
    assert len(compiles) == 6 and all(name == "_double_kernel" for name, _, _ in compiles)
    assert sum(not hit for _, _, hit in compiles) <= 1 and all(hit for _, _, hit in compiles[1:]), compiles


MAIN_SCRIPT = """
print("main script ran", flush=True)  # no `if __name__ == "__main__"` guard, as in many scripts
from triton.backends.compiler import GPUTarget
from autotune import precompile

target = GPUTarget("cuda", 90, 32)
job = precompile.CompileJob("no_module_of_this_name", "kernel", "", {}, {}, {}, {}, target, {})
with precompile.CompilePool(2, target) as pool:
    result = pool.submit(job).result(timeout=300)
print("result", result.ok, result.error, flush=True)
"""


def test_workers_do_not_run_the_main_script_again(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(MAIN_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_no_interpreter_env(),
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("main script ran") == 1, r.stdout
    assert "result False ModuleNotFoundError" in r.stdout, r.stdout



# --------------------------------------------------------------------------- early stop


class FakeGPUTimer(GPUTimer):
    """GPUTimer's decisions over made-up times: a probe gives `probe_ms`, a full timing `ms`."""

    def __init__(self, ms):
        super().__init__()
        self.ms = ms
        self.current = None
        self.probes, self.full = [], []

    def __call__(self, run, config, key, bound_ms=None):
        self.current = config
        return super().__call__(run, config, key, bound_ms=bound_ms)

    def probe(self, run):
        self.probes.append(self.current)
        t = self.ms(self.current)
        return [t * 1.02, t, t * 1.01]

    def measure(self, run):
        self.full.append(self.current)
        t = self.ms(self.current)
        return Timing(t * 0.99, t, t * 1.01)


def test_gpu_timer_stops_a_clearly_slower_config_after_its_probe():
    timer = FakeGPUTimer(lambda c: {"slow": 2.0, "close": 1.2, "fast": 0.5}[c])
    slow = timer(lambda: None, "slow", (), bound_ms=1.0)
    assert slow.stopped_early and slow.p50 == pytest.approx(2.02) and timer.full == []
    close = timer(lambda: None, "close", (), bound_ms=1.0)  # within EARLY_STOP_MARGIN: timed in full
    assert not close.stopped_early and timer.full == ["close"]
    assert not timer(lambda: None, "slow", ()).stopped_early and timer.probes == ["slow", "close"]  # no bound
    assert set(slow.to_dict()) == {"p20", "p50", "p80"}  # the record carries the flag, not the timing
    assert 1.0 * (1 + EARLY_STOP_MARGIN) < 2.0


def test_wall_clock_timer_stops_after_one_slow_run():
    runs = []
    timing = WallClockTimer(reps=5)(lambda: runs.append(1), "c", (), bound_ms=1e-9)
    assert timing.stopped_early and len(runs) == 1
    assert not WallClockTimer(reps=5)(lambda: runs.append(1), "c", (), bound_ms=1e9).stopped_early and len(runs) == 6


def test_tuning_stops_slow_configs_early_and_they_never_win(tmp_path):
    timer = FakeGPUTimer(landscape_ms)
    tuner = make_tuner(tmp_path, timer=timer, strategy="exhaustive")
    entry = tuner.tune((5,))
    default = tuner.default((5,))
    stopped = [Config.from_dict(r["config"]) for r in entry["timings"] if r.get("stopped_early")]
    assert stopped and Config.from_dict(entry["winner"]) == BEST
    assert default not in timer.probes and default in timer.full  # the entry reports the default's full time
    assert not set(stopped) & {Config.from_dict(r["config"]) for r in entry["runners_up"]}
    assert len(timer.full) < len(SPACE.configs())  # the point: fewer full timings


def _stored(tmp_path, tuner, key, records, winner=BEST):
    path = next(tmp_path.rglob(f"{tuner.identity}.json"))
    data = json.loads(path.read_text())
    data["entries"][encode_key(key)] = {"winner": winner.to_dict(), "timing": {"p20": 1, "p50": 1, "p80": 1},
                                        "timings": records}
    path.write_text(json.dumps(data))


def test_a_stopped_early_record_is_reused_only_as_known_slower(tmp_path):
    make_tuner(tmp_path).tune((1,))  # creates the cache file
    fast, slow = BEST, BEST.replace(BLOCK=256)
    make = make_tuner(tmp_path)
    full = {"config": fast.to_dict(), "timing": {"p20": 1.0, "p50": 1.0, "p80": 1.0}}
    # slower than a full timing stored with it: reused, and never the winner
    _stored(tmp_path, make, (5,), [full, {"config": slow.to_dict(), "timing": {"p20": 3, "p50": 3, "p80": 3},
                                          "stopped_early": True}])
    timer = CountingTimer()
    entry = make_tuner(tmp_path, timer).tune((5,))
    assert slow not in timer.calls and Config.from_dict(entry["winner"]) == BEST
    # a stopped-early record with the best time of all is not a full timing: timed again
    _stored(tmp_path, make, (6,), [full, {"config": slow.to_dict(), "timing": {"p20": 0.1, "p50": 0.1, "p80": 0.1},
                                          "stopped_early": True}])
    timer = CountingTimer()
    entry = make_tuner(tmp_path, timer).tune((6,))
    assert slow in timer.calls and Config.from_dict(entry["winner"]) == BEST
    record = next(r for r in entry["timings"] if r["config"] == slow.to_dict())
    assert "stopped_early" not in record and record["timing"]["p50"] == landscape_ms(slow)


def test_a_stopped_early_result_never_wins(tmp_path):
    tuner = make_tuner(tmp_path)
    other = BEST.replace(BLOCK=256)
    results = {BEST: {"config": BEST.to_dict(), "timing": Timing(2, 2, 2).to_dict()},
               other: {"config": other.to_dict(), "timing": Timing(1, 1, 1).to_dict(), "stopped_early": True}}
    entry = tuner._entry((1,), results, BEST, "exhaustive", 2, CountingTimer())
    assert Config.from_dict(entry["winner"]) == BEST and entry["runners_up"] == []
    assert any(r.get("stopped_early") for r in entry["timings"])


def test_timers_without_bound_ms_are_called_as_before(tmp_path):
    old_style = CountingTimer()  # (run, config, key)
    entry = make_tuner(tmp_path / "a", timer=old_style).tune((5,))
    assert Config.from_dict(entry["winner"]) == BEST and len(old_style.calls) == len(SPACE.configs())
    bounds = []

    def keyword_timer(run, config, key, **options):
        bounds.append(options.get("bound_ms"))
        t = landscape_ms(config)
        return Timing(t, t, t)

    make_tuner(tmp_path / "b", timer=keyword_timer).tune((5,))
    assert bounds[0] is None and any(b is not None for b in bounds)  # the first has nothing to compare with
    bounds.clear()
    make_tuner(tmp_path / "c", timer=keyword_timer).tune((5,), early_stop=False)
    assert set(bounds) == {None}


# --------------------------------------------------------------------------- the tuner's compiling ahead


def test_precompile_under_the_interpreter_does_nothing_and_tunes_alike(tmp_path, monkeypatch):
    called = []

    def never(*args, **kwargs):
        called.append(args)
        raise AssertionError("no pool or capture under the interpreter")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(autotune.tuner, "shared_pool", never)
    monkeypatch.setattr(autotune.tuner, "Precompiler", never)
    monkeypatch.setattr(precompile, "capture_launches", never)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning that precompiling is off: it is a no-op by design
        on = make_tuner(tmp_path / "on", precompile=True).tune((5,))
    off = make_tuner(tmp_path / "off").tune((5,), precompile=False)
    assert not called and on["winner"] == off["winner"] == BEST.to_dict()
    assert [r["config"] for r in on["timings"]] == [r["config"] for r in off["timings"]]


class RecordingPrecompiler(precompile.Precompiler):
    """A Precompiler whose pool is a list: every config's compile is one pending Future, done
    when the tuner waits for it; `events` tells what happened in which order."""

    class Pool:
        workers = 2
        broken = None
        target = None
        started = True

    def __init__(self, events, started=True):
        pool = self.Pool()
        pool.started = started
        super().__init__(pool, launch=None)
        self.events = events
        self.most_pending = 0
        self.closed = False

    def submit(self, config):
        if config not in self.futures:
            self.events.append(("submit", config))
            self.futures[config] = [concurrent.futures.Future()]
        self.most_pending = max(self.most_pending, self.pending())

    def wait(self, config, timeout=None):
        self.events.append(("wait", config))
        for f in self.futures.get(config, []):
            if not f.done():
                f.set_result(None)

    def close(self):
        self.closed = True


def event_timer(events: list):
    """A CountingTimer class whose timings are also logged to `events` as ("time", config)."""
    class Timer(CountingTimer):
        def __call__(self, run, config, key):
            events.append(("time", config))
            return super().__call__(run, config, key)

    return Timer


def test_the_tuner_keeps_the_pool_fed_ahead_of_the_search(tmp_path, monkeypatch):
    events = []
    Timer = event_timer(events)

    class Lookahead(autotune.search.Exhaustive):
        asked = []

        def ask(self):
            config = super().ask()
            self.asked.append(config)
            return config

        def pending(self):  # what it will ask next, in order
            return [c for c in self.configs if c not in self.asked]

    monkeypatch.setattr(autotune.tuner, "make_strategy", lambda name, configs, **kw: Lookahead(configs, **kw))
    recorder = RecordingPrecompiler(events)
    tuner = make_tuner(tmp_path, timer=Timer(), max_evals=12)
    monkeypatch.setattr(tuner, "_precompiler", lambda launch, on: recorder)
    entry = tuner.tune((5,), precompile=True)
    default = tuner.default((5,))
    assert events[0] == ("submit", default) and events[1][0] == "submit"  # the default first, then ahead
    assert events.index(("wait", default)) < events.index(("time", default))
    timed = [c for kind, c in events if kind == "time"]
    for config in timed:  # every timed config was sent, and waited for, before its timing
        assert events.index(("submit", config)) < events.index(("wait", config)) < events.index(("time", config))
    # ahead: each config timed was sent before the one before it was timed
    for before, config in zip(timed, timed[1:]):
        assert events.index(("submit", config)) < events.index(("time", before)), config
    assert recorder.most_pending <= recorder.ahead == 4
    assert recorder.closed and entry is not None and len(recorder.futures) <= 12 + recorder.ahead + 1


def test_without_pending_the_tuner_still_sends_each_config_before_timing_it(tmp_path, monkeypatch):
    events = []
    Timer = event_timer(events)

    monkeypatch.setattr(autotune.tuner, "make_strategy",
                        lambda name, configs, **kw: autotune.search.Exhaustive(configs, **kw))
    recorder = RecordingPrecompiler(events)
    tuner = make_tuner(tmp_path, timer=Timer(), max_evals=5)
    monkeypatch.setattr(tuner, "_precompiler", lambda launch, on: recorder)
    tuner.tune((5,), precompile=True)
    for config in [c for kind, c in events if kind == "time"]:
        assert events.index(("submit", config)) < events.index(("time", config))


def test_with_workers_still_starting_the_default_is_not_waited_for(tmp_path, monkeypatch):
    events = []
    Timer = event_timer(events)

    recorder = RecordingPrecompiler(events, started=False)
    tuner = make_tuner(tmp_path, timer=Timer(), max_evals=3)
    monkeypatch.setattr(tuner, "_precompiler", lambda launch, on: recorder)
    tuner.tune((5,), precompile=True)
    default = tuner.default((5,))
    assert events[0] == ("submit", default) and not recorder.warm
    first_time = next(i for i, e in enumerate(events) if e[0] == "time")
    assert ("wait", default) not in events[:first_time]  # this process's JIT compiles it meanwhile


def test_precompile_settings_are_checked_and_overridable(tmp_path):
    tuner = make_tuner(tmp_path)
    with tuner.override(precompile=False, compile_workers=3, early_stop=False):
        assert (tuner.precompile, tuner.compile_workers, tuner.early_stop) == (False, 3, False)
    assert (tuner.precompile, tuner.compile_workers, tuner.early_stop) == (None, None, True)
    for bad in ({"compile_workers": 0}, {"precompile": "yes"}, {"early_stop": None}):
        with pytest.raises(ValueError):
            tuner.check_override(bad)
    with pytest.raises(ValueError):
        make_tuner(tmp_path, compile_workers=-1)
    assert 1 <= precompile.default_workers() <= precompile.MAX_DEFAULT_WORKERS


def test_merging_entries_keeps_a_full_timing_over_a_stopped_early_probe():
    """A newer entry with a faster winner whose record of config X stopped early does not
    erase an older full timing of X: the cache keeps the better-informed record."""
    from autotune.cache import merge_entries

    x, w = Config({"BLOCK": 32}), Config({"BLOCK": 64})
    full = {"config": x.to_dict(), "timing": {"p20": 1.2, "p50": 1.3, "p80": 1.4}}
    probe = {"config": x.to_dict(), "timing": {"p20": 2.0, "p50": 2.0, "p80": 2.0}, "stopped_early": True}
    old = {"winner": x.to_dict(), "timing": full["timing"], "timings": [full]}
    new = {"winner": w.to_dict(), "timing": {"p20": 1.0, "p50": 1.0, "p80": 1.0},
           "timings": [probe, {"config": w.to_dict(), "timing": {"p20": 1.0, "p50": 1.0, "p80": 1.0}}]}
    merged = merge_entries(old, new)
    assert merged["winner"] == w.to_dict()
    records = {json.dumps(r["config"], sort_keys=True): r for r in merged["timings"]}
    assert records[json.dumps(x.to_dict(), sort_keys=True)] == full
    # a "full" record whose time is no time (read from disk) does not shield itself from the probe
    broken = {**full, "timing": {"p20": 1.2, "p50": "bad", "p80": 1.4}}
    merged = merge_entries({**old, "timings": [broken]}, new)
    assert [r for r in merged["timings"] if r["config"] == x.to_dict()] == [probe]
    # and a full timing in the newer entry replaces the older one as before
    newer_full = {**full, "timing": {"p20": 1.1, "p50": 1.15, "p80": 1.2}}
    merged = merge_entries(old, {**new, "timings": [newer_full]})
    assert [r for r in merged["timings"] if r["config"] == x.to_dict()] == [newer_full]


def test_a_tuner_asked_while_launches_are_captured_neither_tunes_nor_stores(tmp_path, monkeypatch):
    """A launcher may look up another op's config; while its launches are captured for
    compiling ahead nothing runs, so that lookup gets the default, is not remembered, and
    tunes nothing; after the capture the same lookup tunes as usual."""
    timer = CountingTimer()
    tuner = make_tuner(tmp_path, timer, strategy="exhaustive")
    monkeypatch.setattr(precompile._capture_local, "launches", [], raising=False)  # what capture_launches sets
    assert tuner.select((7,)) == tuner.default((7,))
    assert timer.calls == [] and (7,) not in tuner.sources and not list(tmp_path.rglob("*.json"))
    monkeypatch.setattr(precompile._capture_local, "launches", None)
    assert tuner.select((7,)) == BEST and tuner.sources[(7,)] == "tuned" and timer.calls
    # a stored config is what the real launch will use: the capture gets it (and still remembers nothing)
    again = make_tuner(tmp_path, CountingTimer(), strategy="exhaustive")
    monkeypatch.setattr(precompile._capture_local, "launches", [])
    assert again.select((7,)) == BEST and (7,) not in again.sources
