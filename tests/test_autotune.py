"""The autotuner with injected timers: no GPU timing is involved anywhere here."""

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import autotune
from autotune import CacheDir, Config, ConfigList, Space, Timing, Tuner, bucket, make_strategy
from autotune.cache import encode_key

# --------------------------------------------------------------------------- a synthetic kernel

SPACE = Space({"BLOCK": [16, 32, 64, 128, 256], "SPLIT": [1, 2, 4]}, num_warps=[2, 4, 8], num_stages=[1, 2, 3])
BEST = Config({"BLOCK": 64, "SPLIT": 2}, num_warps=4, num_stages=2)


def landscape_ms(config: Config) -> float:
    """A bowl with its bottom at BEST (steps along each value list), plus a ripple."""
    d = 0.0
    for name, best in [("BLOCK", 64), ("SPLIT", 2), ("num_warps", 4), ("num_stages", 2)]:
        d += abs(config[name].bit_length() - best.bit_length()) if name != "num_stages" else abs(config[name] - best)
    return 1.0 + 0.3 * d + 0.01 * (config["BLOCK"] % 3)


class CountingTimer:
    def __init__(self, ms=landscape_ms):
        self.ms = ms
        self.calls = []

    def __call__(self, run, config, key):
        run()
        self.calls.append(config)
        t = self.ms(config)
        return Timing(t * 0.99, t, t * 1.01)


def make_tuner(tmp_path, timer=None, mode="on", wrong=None, broken=None, sources=("v1",), space=SPACE, **kw):
    def runner(key):
        def launch(config):
            if broken is not None and config == broken:
                raise RuntimeError("out of resources: shared memory")
            value = 2.0 if (wrong is not None and config == wrong) else 1.0
            return torch.full((3,), value)
        return launch

    return Tuner("synthetic", space, lambda key: Config({"BLOCK": 16, "SPLIT": 1}, num_warps=4, num_stages=1),
                 runner=runner, sources=list(sources), timer=timer or CountingTimer(), mode=mode,
                 cache_dir=tmp_path, strategy=kw.pop("strategy", "exhaustive"), **kw)


# --------------------------------------------------------------------------- Config and Space


def test_config_round_trips_through_json_by_field_names():
    c = Config({"BLOCK_M": 128, "BLOCK_N": 64, "EVEN": True}, num_warps=8, num_stages=4)
    text = c.to_json()
    assert json.loads(text) == {"BLOCK_M": 128, "BLOCK_N": 64, "EVEN": True, "num_warps": 8, "num_stages": 4}
    assert Config.from_json(text) == c and hash(Config.from_json(text)) == hash(c)
    with pytest.raises(ValueError):
        Config.from_dict({"BLOCK": [1, 2]})
    with pytest.raises(AttributeError):
        c.num_warps = 2
    assert autotune.space.as_config(triton.Config({"BLOCK": 32}, num_warps=2, num_stages=1)) == \
        Config({"BLOCK": 32}, num_warps=2, num_stages=1)


def test_space_prunes_what_cannot_run():
    space = Space({"BLOCK_M": [8, 16, 64, 256], "BLOCK_K": [16, 128]}, num_warps=[4, 64], num_stages=[2, 8],
                  smem_bytes=lambda c, p: c["BLOCK_M"] * c["BLOCK_K"] * 2 * c.num_stages,
                  block_dims={"BLOCK_M": "M"}, dot_params=["BLOCK_M"])
    limits = {"max_shared_mem": 100 * 1024, "warp_size": 32}
    configs = space.configs({"M": 50}, limits)
    assert configs, "something must survive"
    for c in configs:
        assert c["BLOCK_M"] >= 16  # tl.dot operands of at least 16
        assert c["BLOCK_M"] <= 64  # no block past next_pow2(M)
        assert c["BLOCK_M"] * c["BLOCK_K"] * 2 * c.num_stages <= limits["max_shared_mem"]
        assert c.num_warps * 32 <= 1024
    assert Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=8) not in configs  # 128 KB
    assert configs == sorted(configs, key=space.order)


def test_bucketing():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024, 1024, 2048]


# --------------------------------------------------------------------------- strategies


def run_strategy(name, **kwargs):
    configs = SPACE.configs()
    s = make_strategy(name, configs, start=Config({"BLOCK": 16, "SPLIT": 1}, num_warps=2, num_stages=1),
                      neighbours=SPACE.neighbours, seed=3, **kwargs)
    while (c := s.ask()) is not None:
        s.tell(c, landscape_ms(c))
    return s


@pytest.mark.parametrize("name", ["exhaustive", "local"])
def test_strategies_find_the_known_best(name):
    s = run_strategy(name)
    assert s.best()[0] == BEST


def test_random_sample_with_a_full_budget_finds_the_best_and_respects_budgets():
    assert run_strategy("random").best()[0] == BEST
    assert run_strategy("random", max_evals=7).evaluations == 7
    assert run_strategy("random", max_seconds=0.0).evaluations == 0


def test_local_search_needs_a_fraction_of_the_evaluations():
    exhaustive, local = run_strategy("exhaustive"), run_strategy("local")
    assert local.best()[0] == exhaustive.best()[0] == BEST
    assert local.evaluations < exhaustive.evaluations / 3


def test_local_search_survives_a_failing_start():
    configs = SPACE.configs()
    s = make_strategy("local", configs, start=configs[0], neighbours=SPACE.neighbours)
    while (c := s.ask()) is not None:
        s.tell(c, None if c == configs[0] else landscape_ms(c))
    assert s.best()[0] == BEST


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown strategy 'annealing'"):
        make_strategy("annealing", SPACE.configs())


# --------------------------------------------------------------------------- Tuner


def test_tune_once_then_remember(tmp_path):
    timer = CountingTimer()
    tuner = make_tuner(tmp_path, timer)
    key = (bucket(1000), 4096, "float16")
    assert tuner.select(key) == BEST
    n = len(timer.calls)
    assert tuner.sources[key] == "tuned" and n > 0
    assert tuner.select(key) == BEST and len(timer.calls) == n  # memory
    again = make_tuner(tmp_path, timer)  # a fresh tuner (as a new process would be) reads the file
    assert again.select(key) == BEST and len(timer.calls) == n
    assert again.sources[key] == "user-cache"


def test_entry_keeps_timing_runners_up_and_provenance(tmp_path):
    tuner = make_tuner(tmp_path)
    entry = tuner.tune((1, "float32"))
    assert Config.from_dict(entry["winner"]) == BEST
    assert set(entry["timing"]) == {"p20", "p50", "p80"}
    assert len(entry["runners_up"]) == 5 and all("timing" in r for r in entry["runners_up"])
    assert len(entry["timings"]) == len(SPACE.configs())
    prov = entry["provenance"]
    assert {"date", "torch", "triton", "driver", "device", "strategy", "evaluations"} <= set(prov)


def test_wrong_and_failing_configs_never_win(tmp_path):
    tuner = make_tuner(tmp_path, wrong=BEST, broken=Config({"BLOCK": 64, "SPLIT": 2}, num_warps=4, num_stages=1))
    entry = tuner.tune((7,))
    assert Config.from_dict(entry["winner"]) not in (BEST, Config({"BLOCK": 64, "SPLIT": 2}, num_warps=4,
                                                                   num_stages=1))
    errors = {json.dumps(t["config"], sort_keys=True): t.get("error") for t in entry["timings"]}
    assert "wrong result" in errors[json.dumps(BEST.to_dict(), sort_keys=True)]
    broken = Config({"BLOCK": 64, "SPLIT": 2}, num_warps=4, num_stages=1)
    assert "out of resources" in errors[json.dumps(broken.to_dict(), sort_keys=True)]


def test_ties_break_in_a_fixed_order(tmp_path):
    """Within the tie margin the default wins (a tuned config is never slower than it);
    without the default among the tied, the first tied config in the space's order."""
    default = Config({"BLOCK": 16, "SPLIT": 1}, num_warps=4, num_stages=1)
    flat = CountingTimer(lambda c: 1.0 + 0.001 * (hash(c) % 7))  # all within the 1% tie margin
    winners = {Config.from_dict(make_tuner(tmp_path / str(i), flat).tune((1,))["winner"]) for i in range(3)}
    assert winners == {default}
    slow_default = CountingTimer(lambda c: 2.0 if c == default else 1.0 + 0.001 * (hash(c) % 7))
    winners = {Config.from_dict(make_tuner(tmp_path / f"s{i}", slow_default).tune((1,))["winner"]) for i in range(3)}
    assert winners == {SPACE.configs()[0]} and SPACE.configs()[0] != default


def test_cached_mode_never_times_and_uses_the_nearest_key(tmp_path):
    make_tuner(tmp_path).tune((bucket(1024), 4096, "float16"))

    def no_timing(run, config, key):
        raise AssertionError("cached mode must never time")

    cached = make_tuner(tmp_path, no_timing, mode="cached")
    assert cached.select((bucket(2048), 4096, "float16")) == BEST
    assert cached.sources[(2048, 4096, "float16")] == "nearest"
    default = cached.default(None)
    assert cached.select((bucket(2048), 4096, "bfloat16")) == default  # another dtype is no neighbour
    assert make_tuner(tmp_path, no_timing, mode="off").select((bucket(1024), 4096, "float16")) == default


def test_mode_comes_from_the_environment(tmp_path, monkeypatch):
    for name in autotune.settings.variables("mode"):  # aliases a package registered, too
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUTOTUNE_MODE", "cached")
    assert autotune.default_mode() == "cached"
    monkeypatch.setenv("AUTOTUNE_MODE", "sometimes")
    with pytest.raises(ValueError, match="AUTOTUNE_MODE"):
        autotune.default_mode()
    monkeypatch.delenv("AUTOTUNE_MODE")
    assert autotune.default_mode() == "off"  # under the interpreter there is no meaningful timing


def test_changed_kernel_source_never_reuses_stale_winners(tmp_path):
    make_tuner(tmp_path, sources=("def kernel(): v1",)).tune((5,))
    timer = CountingTimer()
    edited = make_tuner(tmp_path, timer, sources=("def kernel(): v2",))
    edited.select((5,))
    assert edited.sources[(5,)] == "tuned" and timer.calls


def test_editing_the_candidate_list_keeps_measured_timings(tmp_path):
    make_tuner(tmp_path).tune((5,))
    wider = Space({"BLOCK": [16, 32, 64, 128, 256, 512], "SPLIT": [1, 2, 4]}, num_warps=[2, 4, 8],
                  num_stages=[1, 2, 3])
    timer = CountingTimer()
    entry = make_tuner(tmp_path, timer, space=wider).tune((5,))
    assert Config.from_dict(entry["winner"]) == BEST
    assert timer.calls and all(c["BLOCK"] == 512 for c in timer.calls)  # only the new ones were timed


def test_corrupt_cache_file_is_a_warning_and_a_rebuild(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.tune((5,))
    path = tuner.kernel_file().path
    path.write_text('{"format": "autotune-cache-1", "entries": {')
    fresh = make_tuner(tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert fresh.select((5,)) == BEST  # tuned again
    assert json.loads(path.read_text())["entries"]  # rebuilt
    path.write_text(json.dumps({"format": "something-else", "entries": {}}))
    with pytest.warns(RuntimeWarning, match="another format"):
        make_tuner(tmp_path, mode="cached").select((6,))


def test_shipped_configs_are_used_for_their_device(tmp_path):
    user = make_tuner(tmp_path / "tuning")
    user.tune((5,))
    bundle = tmp_path / "shipped.json"
    CacheDir(tmp_path / "tuning").export(bundle)
    shipped = make_tuner(tmp_path / "user", mode="cached", shipped=[bundle])
    assert shipped.select((5,)) == BEST and shipped.sources[(5,)] == "shipped"


# --------------------------------------------------------------------------- across processes


def _writer(cache_dir, worker, keys, queue):
    try:
        tuner = make_tuner(Path(cache_dir), strategy="random", max_evals=3)
        for k in keys:
            tuner.tune((k,))
        queue.put(None)
    except BaseException as e:  # noqa: BLE001
        queue.put(repr(e))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    shared = list(range(4))  # every worker writes these keys...
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, shared + [100 + 10 * w + i for i in range(6)], queue))
             for w in range(5)]  # ...and six of its own
    for p in procs:
        p.start()
    errors = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert errors == [None] * len(procs)
    entries = make_tuner(tmp_path).user_entries()
    expected = {encode_key((k,)) for k in shared} | {encode_key((100 + 10 * w + i,)) for w in range(5) for i in range(6)}
    assert set(entries) == expected
    assert not list(tmp_path.rglob("*.tmp"))


SUBPROCESS = """
import sys
sys.path.insert(0, {root!r})
from tests.test_autotune import make_tuner, CountingTimer
from pathlib import Path
mode = sys.argv[1]
def no_timing(run, config, key):
    raise SystemExit("timed in cached mode")
t = make_tuner(Path({cache!r}), CountingTimer() if mode == "on" else no_timing, mode=mode)
print(t.select((9,)), t.sources[(9,)])
"""


def test_cache_survives_across_processes(tmp_path):
    script = SUBPROCESS.format(root=str(Path(__file__).resolve().parents[1]), cache=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", script, "on"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", script, "cached"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert first.stdout.split()[-1] == "tuned" and second.stdout.split()[-1] == "user-cache"
    assert first.stdout.rsplit(" ", 1)[0] == second.stdout.rsplit(" ", 1)[0] == repr(BEST)


# --------------------------------------------------------------------------- the decorator


@triton.jit
def _add_into_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(out_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


def test_decorator_tunes_on_scratch_copies(tmp_path):
    timer = CountingTimer(lambda c: {16: 3.0, 32: 1.0, 64: 2.0}[c["BLOCK"]])
    kernel = autotune.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32, 64)],
                               key=["n"], bucket=["n"], timer=timer, mode="on", cache_dir=tmp_path)(_add_into_kernel)
    x = torch.randn(100)
    out = torch.ones(100)
    kernel[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, out, 100)
    assert torch.equal(out, 1 + x)  # written once, by the winner; tuning ran on copies
    assert kernel.tuner.select((128, "float32", "float32")) == Config({"BLOCK": 32}, num_warps=1, num_stages=3)
    assert len(timer.calls) == 3
    kernel[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, out, 100)
    assert len(timer.calls) == 3 and torch.equal(out, (1 + x) + x)


def test_decorator_rejects_unknown_key_names():
    with pytest.raises(ValueError, match="not arguments"):
        autotune.autotune(configs=[{"BLOCK": 16}], key=["m"])(_add_into_kernel)


# --------------------------------------------------------------------------- the command


def run_cli(*args, cache):
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(cache)}
    env.pop("TRITON_INTERPRET", None)  # the command chooses the interpreter itself without a GPU
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_cli_end_to_end(tmp_path):
    cache = tmp_path / "cache"
    r = run_cli("info", cache=cache)
    assert r.returncode == 0 and "fingerprint" in r.stdout and "not GPU timings" in r.stdout
    r = run_cli("tune", "matmul", "--shapes", "20x24x40", "--dtype", "float16", "--budget", "3", "--quiet",
                cache=cache)
    assert r.returncode == 0, r.stderr
    assert "not GPU timings" in r.stdout and "matmul" in r.stdout.splitlines()[-1]
    r = run_cli("show", "--json", cache=cache)
    files = json.loads(r.stdout)
    from tritonops.tuning.matmul import matmul_call_keys  # torch.matmul's forward, dA and dB keys

    want = sorted(json.dumps(list(k)) for k in matmul_call_keys(20, 24, 40, "float16"))
    assert len(files) == 1 and sorted(files[0]["entries"]) == want and len(want) == 3
    bundle = tmp_path / "bundle.json"
    assert run_cli("export", str(bundle), cache=cache).returncode == 0
    r = run_cli("clear", cache=cache)
    assert r.returncode == 0 and "removed 1" in r.stdout
    assert "no tuned configs" in run_cli("show", cache=cache).stdout
    r = run_cli("import", str(bundle), cache=cache)
    assert r.returncode == 0 and "imported 3 entries" in r.stdout
    assert json.loads(run_cli("show", "--json", cache=cache).stdout) == files


@pytest.mark.parametrize("args, message", [
    (("tune", "matmul", "--shapes", "20x24"), "expected 3 positive dims MxNxK"),
    (("tune", "matmul", "--shapes", "axbxc"), "bad shape"),
    (("tune", "nosuchop", "--shapes", "1x1x1"), "unknown op"),
    (("tune", "matmul", "--preset", "nosuch"), "no preset"),
    (("tune", "matmul"), "give --shapes"),
    (("tune", "matmul", "--shapes", "8x8x8", "--dtype", "int8"), "dtype"),
    (("import", "/nonexistent.json"), "not an autotune bundle"),
])
def test_cli_bad_arguments(tmp_path, monkeypatch, capsys, args, message):
    from autotune import cli

    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code not in (0, None)
    assert message in out.err + out.out + str(code)


class _ClockedTuner:
    """Stands in for a registered tuner: each key's search takes 10 s of a fake clock."""

    name = "clocked"

    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def tune(self, key, strategy=None, max_evals=None, max_seconds=None):
        self.calls.append((key, max_seconds))
        self.clock[0] += 10.0
        return {"winner": {"BLOCK": 16}, "timing": {"p50": 1.0}, "provenance": {"evaluations": 1}}


def test_cli_op_seconds_caps_each_op(tmp_path, monkeypatch, capsys):
    """--op-seconds: a key is searched for what is left of its op's time, later keys are not
    tuned (and said so), the next op has its own time, and a key two ops share is tuned once."""
    from autotune import cli, registry
    from autotune.registry import TunableOp

    clock = [100.0]
    tuner = _ClockedTuner(clock)
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setitem(registry.TUNERS, tuner.name, tuner)
    keys = lambda shape, dtype: [(tuner, shape)]  # noqa: E731
    monkeypatch.setitem(registry.REGISTRY, "op_a", TunableOp("op_a", "N", keys, dtypes=("float32",)))
    monkeypatch.setitem(registry.REGISTRY, "op_b", TunableOp("op_b", "N", keys, dtypes=("float32",)))
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    assert cli.main(["tune", "op_a", "--shapes", "1,2,3", "--op-seconds", "15", "--quiet"]) == 0
    assert tuner.calls == [((1,), 15.0), ((2,), 5.0)]
    out = capsys.readouterr().out
    assert out.count("(not tuned: --op-seconds)") == 1 and "1 of 3 keys not tuned" in out
    tuner.calls.clear()
    assert cli.main(["tune", "op_a", "op_b", "--shapes", "1,4", "--op-seconds", "25", "--seconds", "12",
                     "--quiet"]) == 0
    # op_a: (1,) and (4,) with 12 s each (the per-key cap is the smaller); op_b shares both keys
    assert tuner.calls == [((1,), 12.0), ((4,), 12.0)]
    capsys.readouterr()
    assert cli.main(["tune", "op_a", "--shapes", "1", "--op-seconds", "0"]) == 2
    assert "--op-seconds must be a positive" in capsys.readouterr().err
    # rows come back from --devices workers as copies
    cli._print_table([("clocked", (1,), pickle.loads(pickle.dumps(cli.CAPPED)))])
    assert "(not tuned: --op-seconds)" in capsys.readouterr().out


def test_import_keeps_the_faster_entry(tmp_path):
    fast, slow = make_tuner(tmp_path / "a"), make_tuner(tmp_path / "b", CountingTimer(lambda c: 5.0))
    fast.tune((5,))
    slow.tune((5,))
    CacheDir(tmp_path / "a").export(tmp_path / "fast.json")
    CacheDir(tmp_path / "b").import_bundle(tmp_path / "fast.json")
    assert make_tuner(tmp_path / "b", mode="cached").select((5,)) == BEST
    CacheDir(tmp_path / "b").import_bundle(tmp_path / "fast.json")  # importing again changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_tuner(tmp_path / "b", mode="cached").select((5,)) == BEST


# --------------------------------------------------------------------------- ranks, traces


def _rank_main(rank, world, init_file, cache_dir, queue):
    import torch.distributed as dist

    from autotune.distributed import sync

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        # each rank's timer disagrees with the others' (noise): without sharing, ranks would differ
        timer = CountingTimer(lambda c: landscape_ms(c) * (1.0 + (0.5 if (hash(c) + rank) % 2 else 0.0)))
        tuner = make_tuner(Path(cache_dir) / f"rank{rank}", timer, strategy="exhaustive")
        keys = [(1,), (2,)] if rank == 0 else [(2,), (3,)]  # ranks meet different shapes
        before = [tuner.select(k) for k in keys]
        assert all(c == tuner.default(k) for c, k in zip(before, keys)), "no tuning before sync"
        assert not timer.calls
        sync([tuner])
        chosen = {k: tuner.select(k).to_json() for k in [(1,), (2,), (3,)]}
        queue.put((rank, chosen, len(timer.calls), None))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, None, 0, repr(e)))


def test_ranks_share_tuning_and_agree(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), str(tmp_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[3] for r in results] == [None, None], results
    assert results[0][1] == results[1][1]  # the same config for every key on both ranks
    calls = [r[2] for r in results]
    n = len(SPACE.configs())
    # three keys shared out: one rank tunes two, the other one (plus a default check run per key)
    assert sorted(calls) == [n, 2 * n]


def test_trace_records_each_new_key_once(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("AUTOTUNE_RECORD", str(trace))
    tuner = make_tuner(tmp_path, mode="off")
    for k in [(1,), (2,), (1,)]:
        tuner.select(k)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert lines == [{"kernel": "synthetic", "key": [1]}, {"kernel": "synthetic", "key": [2]}]


def test_cli_tunes_exactly_the_keys_of_a_trace(tmp_path, monkeypatch, capsys, device):
    import tritonops
    from autotune import cli
    from tritonops.ops.matmul import MATMUL_TUNER

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("AUTOTUNE_RECORD", str(trace))
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    with MATMUL_TUNER.override(mode="off"):  # a fresh memory, and no tuning at first use on a GPU
        tritonops.matmul(torch.randn(9, 20, device=device), torch.randn(20, 6, device=device))
        tritonops.matmul(torch.randn(9, 20, device=device), torch.randn(20, 6, device=device))  # recorded once
    monkeypatch.delenv("AUTOTUNE_RECORD")
    recorded = [json.loads(line) for line in trace.read_text().splitlines()]
    assert recorded == [{"kernel": "matmul", "key": [16, 6, 20, "float32", True, False, False]}]
    assert cli.main(["tune", "--from-trace", str(trace), "--budget", "2", "--quiet", "--devices", "all"]) == 0
    capsys.readouterr()
    assert cli.main(["show", "--json"]) == 0
    files = json.loads(capsys.readouterr().out)
    assert [list(f["entries"]) for f in files] == [['[16, 6, 20, "float32", true, false, false]']]
    MATMUL_TUNER.reset()


# --------------------------------------------------------------------------- settings


@pytest.fixture
def own_settings(monkeypatch):
    """Aliases and defaults registered in a test are gone after it; the test starts from autotune's
    own defaults (a package imported here, tritonops, sets its own at import)."""
    from autotune import settings

    monkeypatch.setattr(settings, "_aliases", {k: list(v) for k, v in settings._aliases.items()})
    monkeypatch.setattr(settings, "_defaults", dict(settings._BUILTIN_DEFAULTS))
    for name in settings.VARIABLES:
        for variable in settings.variables(name):
            monkeypatch.delenv(variable, raising=False)
    return settings


def test_settings_alias_is_read_after_the_autotune_variable(own_settings, monkeypatch, tmp_path):
    settings = own_settings
    settings.alias("cache_dir", "MYPKG_CACHE_DIR")
    settings.alias("cache_dir", "MYPKG_CACHE_DIR")  # a second import registers nothing new
    assert settings.variables("cache_dir")[0] == "AUTOTUNE_CACHE_DIR"
    assert settings.variables("cache_dir").count("MYPKG_CACHE_DIR") == 1
    assert settings.describe("cache_dir").startswith("AUTOTUNE_CACHE_DIR (or ")
    assert settings.describe("cache_dir").endswith("MYPKG_CACHE_DIR)")
    # read at each lookup: set after import, after registering
    monkeypatch.setenv("MYPKG_CACHE_DIR", str(tmp_path / "alias"))
    assert settings.lookup("cache_dir") == (str(tmp_path / "alias"), "MYPKG_CACHE_DIR")
    assert autotune.cache.default_cache_dir() == tmp_path / "alias"
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "own"))
    assert settings.get("cache_dir") == str(tmp_path / "own")  # the AUTOTUNE_ variable wins
    assert CacheDir().root == tmp_path / "own"
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", " ")  # blank counts as unset
    assert settings.get("cache_dir") == str(tmp_path / "alias")
    with pytest.raises(KeyError, match="no setting"):
        settings.get("cache")


def test_settings_default_of_a_package(own_settings, monkeypatch, tmp_path):
    settings = own_settings
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache.default_cache_dir() == tmp_path / "home" / ".cache" / "autotune"
    settings.set_default("cache_dir", tmp_path / "pkg")
    assert settings.get("cache_dir") == str(tmp_path / "pkg") and settings.lookup("cache_dir")[1] is None
    assert CacheDir().root == tmp_path / "pkg"
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "env"))
    assert CacheDir().root == tmp_path / "env"  # a variable beats any default
    monkeypatch.delenv("AUTOTUNE_CACHE_DIR")
    settings.set_default("cache_dir", None)  # back to autotune's own
    assert autotune.cache.default_cache_dir() == tmp_path / "home" / ".cache" / "autotune"
    assert settings.get("record") is None and settings.get("plugins") is None


def test_bad_mode_names_the_variable_that_is_set(own_settings, monkeypatch):
    settings = own_settings
    settings.alias("mode", "MYPKG_AUTOTUNE")
    monkeypatch.setenv("MYPKG_AUTOTUNE", "Cached")
    assert autotune.default_mode() == "cached"
    monkeypatch.setenv("MYPKG_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="MYPKG_AUTOTUNE='sometimes'"):
        autotune.default_mode()
    monkeypatch.setenv("AUTOTUNE_MODE", "never")
    with pytest.raises(ValueError, match="AUTOTUNE_MODE='never'"):
        autotune.default_mode()


def test_record_and_plugins_take_aliases(own_settings, monkeypatch, tmp_path):
    settings = own_settings
    settings.alias("record", "MYPKG_RECORD")
    monkeypatch.setenv("MYPKG_RECORD", str(tmp_path / "trace.jsonl"))
    make_tuner(tmp_path, mode="off").select((3,))
    assert json.loads((tmp_path / "trace.jsonl").read_text()) == {"kernel": "synthetic", "key": [3]}
    monkeypatch.setenv("AUTOTUNE_PLUGINS", "json, no_such_module_here")
    failed = autotune.registry.load_plugins()
    assert len(failed) == 1 and failed[0].startswith("no_such_module_here")


AUTOTUNE_ALONE = """
import sys
from pathlib import Path

import torch

import autotune
from autotune import Config, Space, Timing, Tuner

assert autotune.settings.describe("cache_dir") == "AUTOTUNE_CACHE_DIR", autotune.settings.describe("cache_dir")
print(autotune.cache.default_cache_dir())
tuner = Tuner("alone", Space({"BLOCK": [16, 32]}, num_warps=[4], num_stages=[1]), lambda key: Config({"BLOCK": 16}),
              runner=lambda key: (lambda config: torch.ones(2)), sources=["alone"], mode="on",
              timer=lambda run, config, key: Timing(1.0, config["BLOCK"] / 16, 3.0))
tuner.select((1,))
print(tuner.kernel_file().path)
assert not [m for m in sys.modules if m.split(".")[0] == "tritonops"], "autotune imported tritonops"
"""


def test_autotune_alone_reads_its_own_cache_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOTUNE_", "TRITONOPS_"))}
    env.update(AUTOTUNE_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    root = Path(__file__).resolve().parents[1]  # tritonops is importable from here, but never imported
    r = subprocess.run([sys.executable, "-c", AUTOTUNE_ALONE], capture_output=True, text=True, env=env,
                       timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
    cache_root, written = r.stdout.split()
    assert Path(cache_root) == tmp_path / "cache"
    assert Path(written).is_file() and Path(written).is_relative_to(tmp_path / "cache")
    del env["AUTOTUNE_CACHE_DIR"]
    r = subprocess.run([sys.executable, "-c", AUTOTUNE_ALONE], capture_output=True, text=True, env=env,
                       timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.split()[0]) == tmp_path / "home" / ".cache" / "autotune"


# --------------------------------------------------------------------------- host parameters


def test_config_host_parameters_are_a_group_of_their_own():
    c = Config({"BLOCK": 64}, num_warps=8, num_stages=2, host={"PROGRAMS_PER_SM": 2})
    assert c["PROGRAMS_PER_SM"] == 2 and c.get("PROGRAMS_PER_SM") == 2 and c.get("NOPE", 7) == 7
    assert c.host == {"PROGRAMS_PER_SM": 2} and c.meta == {"BLOCK": 64}
    c.host["PROGRAMS_PER_SM"] = 5  # a fresh dict: the config is unchanged
    assert c["PROGRAMS_PER_SM"] == 2
    assert c.launch_kwargs() == {"BLOCK": 64, "num_warps": 8, "num_stages": 2}  # never to the kernel
    assert c.to_dict() == {"BLOCK": 64, "num_warps": 8, "num_stages": 2, "host": {"PROGRAMS_PER_SM": 2}}
    assert Config({"BLOCK": 64}).to_dict() == {"BLOCK": 64, "num_warps": 4, "num_stages": 3}  # no empty "host"
    assert Config.from_dict(c.to_dict()) == c and Config.from_json(c.to_json()) == c
    assert hash(Config.from_json(c.to_json())) == hash(c)
    # replace keeps each name in its group; a new name is a meta-parameter
    r = c.replace(PROGRAMS_PER_SM=4, BLOCK=128, num_warps=4, EVEN=True)
    assert r.host == {"PROGRAMS_PER_SM": 4} and r.meta == {"BLOCK": 128, "EVEN": True} and r.num_warps == 4
    # the same value as a meta-parameter is another config
    moved = Config({"BLOCK": 64, "PROGRAMS_PER_SM": 2}, num_warps=8, num_stages=2)
    assert moved != c and moved.to_dict() != c.to_dict()
    assert sorted([c, moved, Config({"BLOCK": 64}, num_warps=8, num_stages=2)])  # ordered despite the groups
    assert repr(c) == "Config(BLOCK=64, num_warps=8, num_stages=2, host={'PROGRAMS_PER_SM': 2})"
    assert repr(Config({"BLOCK": 64})) == "Config(BLOCK=64, num_warps=4, num_stages=3)"
    for bad in ({"BLOCK": 64, "host": [1]}, {"host": {"P": [1, 2]}}, {"host": {"P": None}}):
        with pytest.raises(ValueError):
            Config.from_dict(bad)
    with pytest.raises(ValueError, match="both"):
        Config({"P": 1}, host={"P": 2})
    with pytest.raises(ValueError, match="launch option"):
        Config(host={"num_warps": 2})
    with pytest.raises(ValueError, match="host"):
        Config({"host": 1})


def test_space_enumerates_orders_and_steps_host_parameters():
    space = Space({"BLOCK": [32, 64]}, num_warps=[4, 8], num_stages=[2],
                  host_params={"PROGRAMS_PER_SM": [1, 2, 4, 8]},
                  constraints=[lambda c, p: c["PROGRAMS_PER_SM"] <= p.get("max_programs", 8)])
    configs = space.configs()
    assert len(configs) == 2 * 4 * 2
    assert all(set(c.host) == {"PROGRAMS_PER_SM"} and set(c.meta) == {"BLOCK"} for c in configs)
    assert configs[:3] == [Config({"BLOCK": 32}, num_warps=4, num_stages=2, host={"PROGRAMS_PER_SM": 1}),
                           Config({"BLOCK": 32}, num_warps=8, num_stages=2, host={"PROGRAMS_PER_SM": 1}),
                           Config({"BLOCK": 32}, num_warps=4, num_stages=2, host={"PROGRAMS_PER_SM": 2})]
    c = Config({"BLOCK": 64}, num_warps=4, num_stages=2, host={"PROGRAMS_PER_SM": 2})
    assert space.order(c) == (64, 2, 4, 2)  # meta, then host, then warps and stages
    assert set(space.neighbours(c)) == {c.replace(BLOCK=32), c.replace(PROGRAMS_PER_SM=1),
                                        c.replace(PROGRAMS_PER_SM=4), c.replace(num_warps=8)}
    assert all(n.host for n in space.neighbours(c))  # a stepped host parameter stays one
    assert {x["PROGRAMS_PER_SM"] for x in space.configs({"max_programs": 2})} == {1, 2}  # constraints see it
    with pytest.raises(ValueError, match="both"):
        Space({"P": [1]}, host_params={"P": [2]})


def test_config_list_with_host_parameters():
    configs = [Config({"BLOCK": 32}, host={"PROGRAMS_PER_SM": 1}), Config({"BLOCK": 32}, host={"PROGRAMS_PER_SM": 2}),
               Config({"BLOCK": 64}, host={"PROGRAMS_PER_SM": 2})]
    space = ConfigList(configs)
    assert space.configs() == configs and space.host_params == {"PROGRAMS_PER_SM": [1, 2]}
    assert space.neighbours(configs[1]) == [configs[0], configs[2]]
    assert space.neighbours(configs[0]) == [configs[1]]
    assert ConfigList([c.to_dict() for c in configs]).configs() == configs


def test_tuner_tunes_and_stores_host_parameters(tmp_path):
    space = Space({"BLOCK": [16, 32]}, num_warps=[4], num_stages=[1], host_params={"PROGRAMS_PER_SM": [1, 2, 4]})
    timer = CountingTimer(lambda c: abs(c["PROGRAMS_PER_SM"] - 2) + (c["BLOCK"] == 16))
    launched = []

    def runner(key):
        def launch(config):
            launched.append(config.launch_kwargs())
            return torch.ones(3)
        return launch

    def tuner():
        return Tuner("hosted", space, lambda key: Config({"BLOCK": 16}, num_stages=1, host={"PROGRAMS_PER_SM": 1}),
                     runner=runner, sources=["hosted"], timer=timer, mode="on", cache_dir=tmp_path,
                     strategy="local")

    best = Config({"BLOCK": 32}, num_stages=1, host={"PROGRAMS_PER_SM": 2})
    assert tuner().select((1,)) == best
    assert all("PROGRAMS_PER_SM" not in kw for kw in launched)
    again = tuner()
    assert again.select((1,)) == best and again.sources[(1,)] == "user-cache"
    assert again.user_entries()[encode_key((1,))]["winner"]["host"] == {"PROGRAMS_PER_SM": 2}


class _RecordingKernel:
    """A Triton kernel whose launches are recorded: what reaches the kernel, which grid."""

    def __init__(self, kernel):
        self.kernel, self.fn, self.arg_names = kernel, kernel.fn, kernel.arg_names
        self.launches = []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](**kwargs)
        return launch


def test_decorator_passes_host_parameters_to_the_grid_only(tmp_path):
    kernel = _RecordingKernel(_add_into_kernel)
    space = Space({"BLOCK": [32]}, num_warps=[1], num_stages=[1], host_params={"SPARE_PROGRAMS": [0, 1, 2]})
    timer = CountingTimer(lambda c: 1.0 + abs(c["SPARE_PROGRAMS"] - 1))
    tuned = autotune.autotune(space=space, key=["n"], timer=timer, mode="on", cache_dir=tmp_path)(kernel)
    x, out = torch.randn(100), torch.ones(100)
    # extra programs past the last block are masked off: any SPARE_PROGRAMS gives the same output
    tuned[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]) + meta["SPARE_PROGRAMS"],)](x, out, 100)
    assert torch.equal(out, 1 + x)
    assert {grid for grid, _ in kernel.launches} == {(4,), (5,), (6,)}
    assert all("SPARE_PROGRAMS" not in kwargs for _, kwargs in kernel.launches)
    assert tuned.tuner.select((100, "float32", "float32")).host == {"SPARE_PROGRAMS": 1}


# --------------------------------------------------------------------------- override


def test_tuner_override_sets_fields_for_a_block(tmp_path):
    tuner = make_tuner(tmp_path / "a", mode="off")
    old_timer = tuner.timer
    assert tuner.select((5,)) == tuner.default((5,)) and tuner.sources[(5,)] == "default"
    timer = CountingTimer()
    with tuner.override(mode="on", cache_dir=tmp_path / "b", timer=timer, strategy="local", max_evals=4,
                        max_seconds=60.0) as same:
        assert same is tuner
        assert (tuner.mode, tuner.cache_dir, tuner.strategy, tuner.max_evals) == ("on", tmp_path / "b", "local", 4)
        assert (5,) not in tuner.sources  # memory reset on entry: the key is looked up again
        tuner.select((5,))
        assert tuner.sources[(5,)] == "tuned" and len(timer.calls) <= 4 + 1
        assert tuner.kernel_file().path.is_relative_to(tmp_path / "b")
    assert (tuner.mode, tuner.cache_dir, tuner.timer) == ("off", tmp_path / "a", old_timer)
    assert tuner.strategy == "exhaustive"
    assert tuner.max_evals is None and tuner.max_seconds is None
    assert (5,) not in tuner.sources  # reset on exit: nothing chosen under the override is kept
    assert tuner.select((5,)) == tuner.default((5,))


def test_tuner_override_restores_on_errors_and_rejects_unknown_fields(tmp_path):
    tuner = make_tuner(tmp_path, mode="off")
    old_timer = tuner.timer
    with pytest.raises(RuntimeError, match="inside"):
        with tuner.override(mode="cached", timer=None):
            assert tuner.mode == "cached" and tuner.timer is None
            raise RuntimeError("inside")
    assert tuner.mode == "off" and tuner.timer is old_timer
    with pytest.raises(TypeError, match="tie"):
        with tuner.override(mode="on", tie=0.5):
            pass
    assert tuner.mode == "off" and tuner.tie == 0.01  # nothing changed
    with pytest.raises(ValueError, match="mode"):
        with tuner.override(mode="sometimes"):
            pass
    with pytest.raises(ValueError, match="unknown strategy"):
        with tuner.override(strategy="annealing"):
            pass
    with tuner.override(mode=None):  # back to the environment's mode for a while
        assert tuner.mode is None
    assert tuner.mode == "off"


def test_module_override_covers_every_registered_tuner(tmp_path, monkeypatch):
    a, b = make_tuner(tmp_path / "a", mode="off"), make_tuner(tmp_path / "b", mode="cached")
    monkeypatch.setattr(autotune.registry, "TUNERS", {"a": a, "b": b})
    with autotune.override(mode="on", max_evals=3) as chosen:
        assert chosen == [a, b]
        assert a.mode == b.mode == "on" and a.max_evals == b.max_evals == 3
    assert (a.mode, b.mode, a.max_evals, b.max_evals) == ("off", "cached", None, None)
    with autotune.override([b, "a", b], cache_dir=tmp_path / "c") as chosen:
        assert chosen == [b, a]
        assert a.cache_dir == b.cache_dir == tmp_path / "c"
    assert (a.cache_dir, b.cache_dir) == (tmp_path / "a", tmp_path / "b")
    with autotune.override([a], mode="cached"):
        assert a.mode == "cached" and b.mode == "cached"
    with pytest.raises(RuntimeError):
        with autotune.override(strategy="random"):
            assert a.strategy == b.strategy == "random"
            raise RuntimeError
    assert a.strategy == b.strategy == "exhaustive"
    with pytest.raises(TypeError):
        with autotune.override([], runner=None):
            pass
    with pytest.raises(KeyError, match="no registered tuner"):
        with autotune.override(["nosuch"], mode="off"):
            pass


# --------------------------------------------------------------------------- the command's strategies


def test_cli_strategy_choices_come_from_the_registry(monkeypatch):
    from autotune import cli
    from autotune.search import STRATEGIES, Exhaustive

    choices = lambda: next(a.choices for a in cli.build_parser({})._subparsers._group_actions[0]  # noqa: E731
                           .choices["tune"]._actions if a.dest == "strategy")
    assert list(choices()) == sorted(STRATEGIES)

    class Mine(Exhaustive):
        name = "mine"

    monkeypatch.setitem(STRATEGIES, "mine", Mine)
    assert "mine" in choices()
    assert cli.build_parser({}).parse_args(["tune", "--strategy", "mine"]).strategy == "mine"


# --------------------------------------------------------------------------- the agreement check


def test_agreement_tolerance_table():
    from autotune.tuner import AGREE_RTOL, agree_rtol, default_check

    assert AGREE_RTOL == {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-2, "float64": 1e-9}
    assert agree_rtol(torch.bfloat16) == 3e-2 and agree_rtol("float64") == 1e-9 and agree_rtol(torch.int32) is None

    def agree(dtype, ref, out):
        return default_check(torch.tensor(out, dtype=dtype), torch.tensor(ref, dtype=dtype))

    # relative to the largest finite reference value
    assert agree(torch.bfloat16, [8.0, 0.25], [8.0, 0.25 + 0.2])  # 2.5e-2 of 8
    assert not agree(torch.bfloat16, [8.0, 0.25], [8.0, 0.25 + 0.32])  # 4e-2
    assert not agree(torch.float16, [8.0, 0.25], [8.0, 0.25 + 0.2])
    assert agree(torch.float32, [1.0, 2.0], [1.0, 2.0 * (1 + 5e-3)])  # TF32 rounding passes
    assert not agree(torch.float32, [1.0, 2.0], [1.0, 2.0 * (1 + 2e-2)])
    assert agree(torch.float64, [1.0], [1.0 + 1e-10])
    assert not agree(torch.float64, [1.0], [1.0 + 1e-8])
    # integers and bools: exactly equal
    assert agree(torch.int32, [1, 2, 3], [1, 2, 3])
    assert not agree(torch.int32, [1, 2, 3], [1, 2, 4])
    assert not agree(torch.int64, [2 ** 60], [2 ** 60 + 1])  # beyond float64's 53 bits
    assert not agree(torch.bool, [True, False], [True, True])
    assert not default_check(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int64))
    # non-finite values must sit in the same places
    nan, inf = float("nan"), float("inf")
    assert agree(torch.float32, [nan, inf, 1.0], [nan, inf, 1.0])
    assert not agree(torch.float32, [nan, 1.0], [1.0, 1.0])
    assert not agree(torch.float32, [inf, 1.0], [-inf, 1.0])
    assert not agree(torch.float32, [1.0, 1.0], [1.0, nan])
    # several outputs, each by its own dtype
    assert default_check((torch.ones(2), torch.arange(3)), (torch.ones(2) * (1 + 1e-3), torch.arange(3)))
    assert not default_check((torch.ones(2), torch.arange(3)), (torch.ones(2), torch.arange(3) + 1))
    assert not default_check((torch.ones(2),), (torch.ones(2), torch.ones(2)))
