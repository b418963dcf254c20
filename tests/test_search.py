"""Search strategies on real GPU landscapes, and Kernel Tuner cache files as timing tables.

The tables in perf/data/kerneltuner are brute-forced Kernel Tuner caches of a tiled GEMM
(17956 configs, measured on two GPUs). The tests replay strategies over a slice of them
(a few hundred configs) so they stay fast; `python3 -m perf.replay` replays the whole.
"""

import gzip
import json
import random
import statistics
from pathlib import Path

import pytest

from autotune import DEFAULT_STRATEGY, STRATEGIES, Config, Space, Timing, Tuner, make_strategy
from autotune.kerneltuner import compact_cache, read_cache, table_from_cache
from perf import replay

DATA = Path(__file__).resolve().parent.parent / "perf" / "data" / "kerneltuner"
TABLES = sorted(DATA.glob("*.json.gz"))


@pytest.fixture(scope="module", params=[p.name for p in TABLES])
def table(request):
    return read_cache(DATA / request.param)


def slice_of(table, **fixed):
    """The table's configs whose fields equal `fixed`: a smaller real landscape."""
    return {c: ms for c, ms in table.timings.items() if all(c[k] == v for k, v in fixed.items())}


# A slice that holds both GPUs' best configs: still rough (568 configs, of which 3 and 8
# are within 2% of the best), and fast to replay.
SLICE = {"MWG": 128, "NWG": 128, "SB": 1, "MDIMC": 16}


def run(name, timings, space, seed=0, start=None, stop_at=None, **kwargs):
    """A run of a strategy over `timings`: the strategy and the configs it asked, in order
    (stopping early once a config of at most `stop_at` ms is found)."""
    configs = sorted(timings, key=space.order)
    s = make_strategy(name, configs, start=start, neighbours=space.neighbours, seed=seed, **kwargs)
    asked = []
    while (c := s.ask()) is not None:
        asked.append(c)
        s.tell(c, timings[c])
        if stop_at is not None and timings[c] is not None and timings[c] <= stop_at:
            break
    return s, asked


# --------------------------------------------------------------------------- the shipped tables


def test_shipped_tables_are_the_brute_forced_landscapes(table):
    """Each holds every valid config of the GEMM space (17956), its best as the public cache
    has it, and is as sparse at the top as the replay's targets assume."""
    assert len(table.timings) == 17956
    assert all(ms is not None and ms > 0 for ms in table.timings.values())
    best = {"NVIDIA GeForce RTX 3090": 5.657844, "NVIDIA TITAN RTX": 11.466165}[table.device]
    assert table.best_ms == pytest.approx(best, rel=1e-6)
    assert (table.within(0.02), table.within(0.05)) in {(3, 6), (8, 15)}
    assert table.kernel == "Xgemm"


def test_space_of_a_cache_is_exactly_its_configs(table):
    """Configs absent from the cache are outside the space; those in it are inside."""
    space = table.space
    some = list(table.timings)[:50]
    assert all(space.valid(c) for c in some)
    absent = Config({**some[0].meta, "MDIMC": 32, "NDIMC": 32, "MWG": 16}, num_warps=4, num_stages=3)
    assert absent not in table.timings and not space.valid(absent)
    assert len(space.params) == 15 and space.num_warps == [4] and space.num_stages == [3]


# --------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_honours_budgets_and_asks_each_config_once(name, table):
    timings = slice_of(table, **SLICE)
    s, asked = run(name, timings, table.space, max_evals=23)
    assert s.evaluations == len(asked) == 23
    assert len(set(asked)) == len(asked) and set(asked) <= set(timings)
    s, asked = run(name, timings, table.space, max_seconds=0.0)
    assert asked == []


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_seed_reproduces_a_run(name, table):
    timings = slice_of(table, **SLICE)
    first = run(name, timings, table.space, seed=5, max_evals=150)[1]
    assert run(name, timings, table.space, seed=5, max_evals=150)[1] == first
    other = run(name, timings, table.space, seed=6, max_evals=150)[1]  # long enough for ils to kick
    assert (other != first) == STRATEGIES[name].seeded


@pytest.mark.parametrize("name", [n for n in sorted(STRATEGIES) if n != "exhaustive"])
def test_every_search_but_exhaustive_times_the_start_first(name, table):
    timings = slice_of(table, **SLICE)
    start = sorted(timings, key=timings.get)[len(timings) // 2]
    assert run(name, timings, table.space, start=start, max_evals=3)[1][0] == start


def test_strategies_without_a_natural_end_stop_at_their_default_budget(table):
    timings = slice_of(table, **SLICE)
    for name in ("bayes", "ils"):
        s, _ = run(name, timings, table.space)
        assert s.evaluations == STRATEGIES[name].default_max_evals


def test_failed_configs_are_learnt_from_not_fatal():
    """A third of the configs fail, the start among them: each search goes on to its
    budget and never takes a failed config for the best."""
    table = read_cache(TABLES[0])
    timings = slice_of(table, **SLICE)
    ranked = sorted(timings, key=timings.get)
    failing = {c: (None if i % 3 == 0 else timings[c]) for i, c in enumerate(ranked)}
    for name in sorted(STRATEGIES):
        s, asked = run(name, failing, table.space, start=ranked[0], max_evals=60)
        assert asked[0] == ranked[0] or name == "exhaustive"
        assert s.evaluations == 60 or name == "local", name  # local ends at a local minimum
        assert failing[s.best()[0]] == s.best()[1] is not None, name


# --------------------------------------------------------------------------- how well they search


def evaluations_to(name, timings, space, within, seeds):
    """The median over seeds of the configs evaluated until one is within `within` of the best."""
    best = min(timings.values())
    return statistics.median(len(run(name, timings, space, seed=seed, stop_at=best * (1 + within))[1])
                             for seed in seeds)


def test_model_based_search_beats_random_sampling_and_local_search_stalls(table):
    """On a rough real slice, the default search gets within 2% of the best in a fraction
    of what random sampling needs; coordinate descent stops at a local minimum short of it."""
    timings = slice_of(table, **SLICE)
    seeds = range(5)
    bayes = evaluations_to("bayes", timings, table.space, 0.02, seeds)
    rand = evaluations_to("random", timings, table.space, 0.02, seeds)
    assert bayes * 3 <= rand, (bayes, rand)
    assert bayes <= 40, bayes
    # coordinate descent from random starts over the whole table: mostly stuck (why it is
    # not the default)
    starts = random.Random(0).sample(sorted(table.timings, key=table.space.order), 10)
    stuck = [run("local", table.timings, table.space, start=c)[0].best()[1] > table.best_ms * 1.02 for c in starts]
    assert sum(stuck) >= 6, stuck


def test_default_strategy_is_the_model_based_search():
    assert DEFAULT_STRATEGY == "bayes" and DEFAULT_STRATEGY in STRATEGIES


# --------------------------------------------------------------------------- the default search in the tuner


@pytest.mark.parametrize("landscape", range(4))
def test_the_default_search_never_returns_a_config_slower_than_the_default(tmp_path, landscape):
    """On the matmul Space, over random landscapes of coarse times (so that the default often
    ties with faster configs), the tuner's default search returns the default or a faster
    config: it times the default first, and within the tie margin the default wins."""
    from tritonops.tuning.matmul import MATMUL_TUNER, matmul_call_keys

    key = matmul_call_keys(4096, 4096, 4096, "bfloat16")[0]
    default = MATMUL_TUNER.default(key)
    rng = random.Random(landscape)
    times = {c: rng.choice([1.0, 1.004, 1.008, 1.5, 3.0]) for c in MATMUL_TUNER.candidates(key)}
    times[default] = 1.004 if landscape % 2 else 1.5  # tied with the fastest, or clearly slower

    class Timer:
        def __call__(self, run, config, key):
            t = times[config]
            return Timing(t, t, t)

    tuner = Tuner("matmul-search-test", MATMUL_TUNER.space, MATMUL_TUNER.default,
                  runner=lambda key: (lambda config: 0), problem=MATMUL_TUNER.problem,
                  key_type=type(key), timer=Timer(), cache_dir=tmp_path, mode="on", check=lambda out, ref: True,
                  precompile=False)
    assert tuner.strategy == DEFAULT_STRATEGY
    entry = tuner.tune(key, store=False)
    winner = Config.from_dict(entry["winner"])
    assert times[winner] <= times[default]
    assert (winner == default) == (landscape % 2 == 1)  # tied: the default; slower: a faster config wins
    assert entry["provenance"]["strategy"] == "bayes"


def test_ils_takes_a_config_outside_its_list_in_its_stride(table):
    timings = slice_of(table, **SLICE)
    configs = sorted(timings, key=table.space.order)
    s = make_strategy("ils", configs[1:], seed=0, max_evals=60)  # long enough to kick from that best
    s.tell(configs[0], 0.001)  # told, never asked (a stored timing a tuner reuses, say)
    asked = []
    while (c := s.ask()) is not None:
        asked.append(c)
        s.tell(c, timings[c])
    assert len(asked) == 59 and configs[0] not in asked


# --------------------------------------------------------------------------- reading caches


def tiny_cache(**changes):
    params = {"BLOCK": [16, 32], "VEC": [1, 2], "FIXED": [7]}
    cache = {}
    for b in (16, 32):
        for v in (1, 2):
            cache[f"{b},{v},7"] = {"BLOCK": b, "VEC": v, "FIXED": 7, "time": 1.0 + b / 100 + v / 10,
                                   "times": [1.0] * 3, "GFLOP/s": 1.0}
    cache["32,2,7"]["time"] = "InvalidConfig"
    cache["16,2,7"]["time"] = "RuntimeFailedConfig"
    data = {"device_name": "Some GPU", "kernel_name": "k", "tune_params_keys": ["BLOCK", "VEC", "FIXED"],
            "tune_params": params, "objective": "time", "cache": cache}
    for k, v in changes.items():
        data[k] = v
    return data


def test_a_cache_file_reads_as_a_table_json_and_gzip(tmp_path):
    data = tiny_cache()
    (tmp_path / "c.json").write_text(json.dumps(data))
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        json.dump(data, f)
    for name in ("c.json", "c.json.gz"):
        t = read_cache(tmp_path / name)
        assert t.device == "Some GPU"
        assert {(c["BLOCK"], c["VEC"]): ms for c, ms in t.timings.items()} == {
            (16, 1): pytest.approx(1.26), (32, 1): pytest.approx(1.42), (16, 2): None}
        assert t.best_ms == pytest.approx(1.26)
        assert sorted(t.space.configs(), key=t.space.order) == sorted(t.timings, key=t.space.order)


def test_compact_cache_reads_the_same():
    data = tiny_cache()
    small = compact_cache(data)
    assert all(set(r) == {"BLOCK", "VEC", "FIXED", "time"} for r in small["cache"].values())
    assert table_from_cache(small).timings == table_from_cache(data).timings


@pytest.mark.parametrize("change, message", [
    (lambda d: d["cache"]["16,1,7"].update(time=-1.0), "not a positive number"),
    (lambda d: d["cache"]["16,1,7"].update(time=float("nan")), "not a positive number"),
    (lambda d: d["cache"]["16,1,7"].update(time="Broken"), "has the time 'Broken'"),
    (lambda d: d["cache"]["16,1,7"].pop("time"), "has no 'time'"),
    (lambda d: d["cache"]["16,1,7"].update(BLOCK=64), "BLOCK = 64 is not one of"),
    (lambda d: d["cache"]["16,1,7"].update(BLOCK=32), "does not match its values"),
    (lambda d: d["cache"]["16,1,7"].pop("VEC"), "no value for 'VEC'"),
    (lambda d: d["cache"].update({"16,1,7": [1, 2]}), "is not an object"),
    (lambda d: d.update(tune_params_keys=["BLOCK"]), "must name exactly"),
    (lambda d: d["tune_params"].update(VEC=[]), "must list scalar values"),
    (lambda d: d["tune_params"].update(VEC=[1, 1]), "lists a value twice"),
    (lambda d: d["tune_params"].update(VEC=[1, "2"]), "mixes number and str values"),
    (lambda d: d["tune_params"].update(VEC=[1, True]), "mixes bool and number values"),
    (lambda d: d.update(tune_params_keys=["BLOCK", "VEC", 3]), "must name exactly"),
    (lambda d: d.pop("cache"), "not a Kernel Tuner cache"),
    (lambda d: d.update(cache={}), "holds no valid config"),
])
def test_a_malformed_cache_is_a_clear_error(change, message):
    data = tiny_cache()
    change(data)
    with pytest.raises(ValueError, match=message):
        table_from_cache(data, "bad.json")


def test_an_unreadable_cache_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="x.json.gz: not a readable file"):
        read_cache(tmp_path / "x.json.gz")
    (tmp_path / "y.json").write_text("{nope")
    with pytest.raises(ValueError, match="y.json: not valid JSON"):
        read_cache(tmp_path / "y.json")


def test_an_unterminated_cache_of_an_interrupted_run_reads_as_closed(tmp_path):
    """Kernel Tuner closes a cache file's JSON only when tuning ends: a file of an
    interrupted run (no closing braces, a trailing comma) reads as Kernel Tuner reads it."""
    text = json.dumps(tiny_cache(), indent=1)
    assert text.endswith("}\n}")
    (tmp_path / "open.json").write_text(text[:-len("}\n}")].rstrip() + ",\n")
    assert read_cache(tmp_path / "open.json").timings == table_from_cache(tiny_cache()).timings


# --------------------------------------------------------------------------- the replay


def test_replay_of_a_cache_reports_both_targets_and_curves(tmp_path):
    """perf.replay over a Kernel Tuner cache (a slice of a shipped one, written as a cache
    file): per strategy the median evaluations to 2% and 5%, hits over the seeds, and a
    best-so-far curve that never rises; the report draws it."""
    data = json.loads(gzip.open(TABLES[0], "rt").read())
    data["cache"] = {k: r for k, r in data["cache"].items() if all(r[f] == v for f, v in SLICE.items())}
    path = tmp_path / "slice.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "replay.json"
    assert replay.main(["--table", str(path), "--seeds", "4", "--budget", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (key, r), = result["replay_summary"]["keys"].items()
    assert r["seeds"] == 4 and r["budget"] == 120
    assert set(r["strategies"]) == set(STRATEGIES)
    for name, s in r["strategies"].items():
        assert set(s["within"]) == {"2%", "5%"}
        assert s["runs"] == 4 and 0 <= s["within"]["2%"]["hits"] <= 4
        assert s["within"]["5%"]["median"] <= s["within"]["2%"]["median"] <= 120
        curve = [v for v in result["replay"][key][name] if v is not None]
        assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert r["strategies"]["exhaustive"]["within"]["2%"]["hits"] in (0, 4)  # the same run each seed
    from perf import report

    assert report.main([str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "replay.png").exists()
    md = (tmp_path / "rep" / "report.md").read_text()
    bayes = r["strategies"]["bayes"]["within"]
    assert f"| bayes | {bayes['2%']['median']:g} ({bayes['2%']['hits']}/4), p90 {bayes['2%']['p90']:g} |" in md
    assert "NO GPU" not in md  # a replay of measured tables is not an interpreter run


def test_replay_refuses_a_bad_table_with_a_message(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(tiny_cache(tune_params_keys=["BLOCK"])))
    assert replay.main(["--table", str(path)]) == 2
    assert "must name exactly" in capsys.readouterr().err
    path.write_text(json.dumps({"something": "else"}))
    assert replay.main(["--table", str(path)]) == 2
    assert "neither a Kernel Tuner cache nor a timing table" in capsys.readouterr().err
    assert replay.main(["--table", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not a readable file" in capsys.readouterr().err


def test_space_from_a_cache_names_its_parameters_in_order():
    t = table_from_cache(tiny_cache())
    assert list(t.space.params) == ["BLOCK", "VEC", "FIXED"]
    assert isinstance(t.space, Space)
