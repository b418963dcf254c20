"""perf: the benchmark runner's results schema, the work counts behind its metrics, the
replay of the search strategies, and the report rendering every plot from the committed
sample. Nothing here is timed. `perf` is a package of the checkout root, which pytest puts
on sys.path (tests/ is a package whose parent holds no __init__.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perf import bench, cases, replay, report, schema

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "perf" / "results" / "sample" / "results.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_row(row: dict) -> None:
    for k in ("op", "mode", "dtype", "shape", "provider"):
        assert k in row, k
    assert row["mode"] in ("fwd", "bwd")
    assert isinstance(row["shape"], dict) and all(isinstance(v, int) for v in row["shape"].values())
    if "error" in row or "skipped" in row:
        assert "p50" not in row
        return
    assert 0 < row["p20"] <= row["p50"] <= row["p80"]
    assert row["metric"]["name"] in ("TFLOP/s", "GB/s") and row["metric"]["value"] > 0
    assert "speedup_vs_torch" in row and "pct_of_ceiling" in row


@pytest.fixture(autouse=True)
def _scratch_cache(tmp_path, monkeypatch):
    # on a GPU the tuned provider tunes (2 evaluations here): never into a real cache
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))


SMOKE = ["--preset", "smoke", "--ops", "matmul", "--max-shapes", "1", "--tune-budget", "2", "--no-ceilings"]


def test_smoke_run_schema(tmp_path):
    """A tiny matmul run end to end (interpreter here, the GPU there): the results file."""
    out = tmp_path / "r.json"
    cache = tmp_path / "run-cache"
    rc = bench.main([*SMOKE, "--modes", "fwd,bwd", "--providers", "tritonops,torch", "--out", str(out),
                     "--cache-dir", str(cache)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["schema"] == schema.SCHEMA and res["schema_version"] == schema.SCHEMA_VERSION
    assert res["run"]["cache_dir"] == str(cache.resolve())
    dev = res["device"]
    for k in ("name", "capability", "driver", "torch", "triton", "cuda", "date", "gpu", "note"):
        assert k in dev, k
    assert dev["gpu"] is torch.cuda.is_available()
    if not dev["gpu"]:
        assert "NOT performance numbers" in dev["note"]
    assert res["run"]["complete"] is True
    assert res["ops"]["matmul"]["status"] == "ok" and res["ops"]["matmul"]["x"] == "M"
    rows = res["cases"]
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("fwd", "bwd") for p in ("tritonops", "torch")}
    for r in rows:
        _check_row(r)
        assert "error" not in r, r.get("error")
    torch_rows = [r for r in rows if r["provider"] == "torch"]
    assert all(r["speedup_vs_torch"] == pytest.approx(1.0) for r in torch_rows)
    ours = [r for r in rows if r["provider"] == "tritonops"]
    assert all(r["configs"] and r["configs"][0]["tuner"] == "matmul" for r in ours)
    assert all(r["rel_err_vs_torch"] < 0.05 for r in ours)


def _plant_torch_failure(monkeypatch, message: str) -> None:
    """matmul's torch provider raises `message` when run; the other providers are untouched."""
    spec = cases.OPS["matmul"]
    real = spec.provider_fn

    def provider_fn(provider, shape, ours):
        if provider == "torch":
            def boom(*args):
                raise RuntimeError(message)
            return boom
        return real(provider, shape, ours)

    monkeypatch.setattr(spec, "provider_fn", provider_fn)


def test_failing_provider_is_recorded(monkeypatch, tmp_path):
    """A provider that raises becomes an error row; the others still run."""
    _plant_torch_failure(monkeypatch, "planted failure\nsecond line")
    out = tmp_path / "r.json"
    bench.main([*SMOKE, "--modes", "fwd", "--providers", "tritonops,torch", "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())["cases"]}
    assert rows["torch"]["error"].startswith("RuntimeError: planted failure")
    assert "p50" in rows["tritonops"] and rows["tritonops"]["speedup_vs_torch"] is None


def test_provider_overrides_restore():
    """Each provider runs every Tuner under its autotune.override fields, undone after the case."""
    from autotune.registry import TUNERS

    assert bench.provider_overrides("torch", True) is None
    assert bench.provider_overrides("tritonops-default", False) == {"mode": "off"}
    assert bench.provider_overrides("tritonops", False, 3, 1.0) == {}  # interpreter: modes kept
    assert bench.provider_overrides("tritonops", True, None, 1.0) == {"mode": "on", "max_seconds": 1.0}
    runner = bench.Runner(argparse.Namespace(tune_budget=3, tune_seconds=1.0), True, None, {}, None)

    def state():
        return {n: (t.mode, t.max_evals, t.max_seconds) for n, t in TUNERS.items()}

    before = state()
    with runner.provider_context("tritonops"):
        assert all(v == ("on", 3, 1.0) for v in state().values())
    assert state() == before
    with runner.provider_context("tritonops-default"):
        assert all(v[0] == "off" for v in state().values())
    assert state() == before


def test_work_counts():
    mm = {"M": 128, "N": 256, "K": 64}
    assert cases.matmul_flops(mm, None, "fwd") == 2 * 128 * 256 * 64
    assert cases.matmul_flops(mm, None, "bwd") == 4 * 128 * 256 * 64
    att = {"B": 2, "H": 4, "L": 128, "S": 256, "E": 64, "causal": 0}
    full = 4 * 2 * 4 * 128 * 256 * 64
    assert cases.attention_flops(att, None, "fwd") == full
    assert cases.attention_flops({**att, "causal": 1}, None, "fwd") == full / 2
    assert cases.attention_flops(att, None, "bwd") == 2.5 * full
    rc = {"rows": 8, "cols": 1024}
    n = 8 * 1024
    assert cases.softmax_bytes(rc, "bfloat16", "fwd") == 2 * n * 2
    assert cases.softmax_bytes(rc, "float32", "bwd") == 3 * n * 4
    assert cases.layer_norm_bytes(rc, "float16", "fwd") == (2 * n + 2 * 1024) * 2
    assert cases.layer_norm_bytes(rc, "float16", "bwd") == (3 * n + 3 * 1024) * 2
    assert cases.rms_norm_bytes(rc, "float16", "fwd") == (2 * n + 1024) * 2
    assert cases.rms_norm_bytes(rc, "float16", "bwd") == (3 * n + 2 * 1024) * 2
    spec = cases.OPS["matmul"]
    assert cases.metric_value(spec, mm, "bfloat16", "fwd", 1.0) == pytest.approx(2 * 128 * 256 * 64 / 1e-3 / 1e12)


def test_presets_cover_every_op():
    for name, spec in cases.OPS.items():
        assert spec.shapes["smoke"], name
        assert spec.shapes["full"], name
        for shape in spec.shapes["full"]:
            assert spec.x in shape and all(g in shape for g in spec.group)
    full_mm = cases.OPS["matmul"].shapes["full"]
    assert len(full_mm) == 29 and {s["M"] for s in full_mm} == {1, 16, 64, 128, 1024, 4096, 8192}
    assert [s["cols"] for s in cases.OPS["softmax"].shapes["full"]][::10] == [256, 262144]
    # decode shapes, attention decode at 8K and 32K keys, 32K and 64K-column rows: quick and full
    for preset in ("quick", "full"):
        assert {1, 16, 64} <= {s["M"] for s in cases.OPS["matmul"].shapes[preset]}
        assert {"M": 8192, "N": 8192, "K": 8192} in cases.OPS["matmul"].shapes[preset]  # the 780 TFLOP/s target's
        assert {16, 64} <= {s["M"] for s in cases.OPS["linear"].shapes[preset]}
        decode = cases.OPS["attention_decode"].shapes[preset]
        assert {s["S"] for s in decode} == {8192, 32768} and all(s["L"] == 1 for s in decode)
        for op in ("softmax", "layer_norm", "rms_norm"):
            assert {32768, 65536} <= {s["cols"] for s in cases.OPS[op].shapes[preset]}
    assert cases.OPS["attention_decode"].modes == ("fwd",)
    assert cases.op_modes(cases.OPS["attention_decode"], ["fwd", "bwd"]) == ["fwd"]
    dec = {"B": 1, "H": 32, "HKV": 8, "L": 1, "S": 8192, "E": 128}
    assert cases.attention_decode_bytes(dec, "bfloat16") == (2 * 32 * 128 + 2 * 8 * 8192 * 128) * 2


def test_report_renders_sample(tmp_path):
    """Every plot of the committed sample results: one PNG per (op, mode, dtype), the
    speed-up chart, the replay plot, and report.md linking them."""
    sample = json.loads(SAMPLE.read_text())
    ops = {(r["op"], r["mode"]) for r in sample["cases"]}
    assert {("matmul", "fwd"), ("matmul", "bwd"), ("linear", "fwd"), ("linear", "bwd")} <= ops
    assert sample["replay"]
    assert report.main([str(SAMPLE), "-o", str(tmp_path)]) == 0
    expected = {f"{op}_{mode}_{dtype}.png" for op, mode, dtype in
                {(r["op"], r["mode"], r["dtype"]) for r in sample["cases"] if "metric" in r}}
    expected |= {"speedup.png", "replay.png"}
    for name in expected:
        path = tmp_path / name
        assert path.is_file(), name
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    md = (tmp_path / "report.md").read_text()
    for name in expected:
        assert f"({name})" in md, name
    assert "NOT performance numbers" in md  # the sample comes from the interpreter


def test_missing_op_is_recorded(monkeypatch, tmp_path):
    """An op whose module does not import (yet) is skipped with its reason, not a crash."""
    monkeypatch.setattr(cases.OPS["softmax"], "module", "tritonops.ops.no_such_module")
    out = tmp_path / "r.json"
    assert bench.main(["--preset", "smoke", "--ops", "softmax", "--no-ceilings", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ops"]["softmax"]["status"] == "missing"
    assert "does not import" in res["ops"]["softmax"]["reason"]
    assert res["cases"] == [] and res["run"]["complete"] is True


def test_report_ceilings_and_two_devices(tmp_path):
    """Two results files (here the sample and a relabelled copy with ceilings) in one report:
    per-device lines, dashed ceilings, and the % of ceiling column."""
    sample = json.loads(SAMPLE.read_text())
    other = json.loads(SAMPLE.read_text())
    other["device"].update(name="Synthetic GPU (test)", gpu=True, note=None)
    other["ceilings"] = {"copy_GBps": 3000.0, "matmul_tflops": {"bfloat16": 800.0, "float16": 790.0}}
    for data in (sample, other):
        data["cases"] = [r for r in data["cases"] if r["op"] == "matmul"]
        data.pop("replay", None)
    paths = []
    for i, data in enumerate((sample, other)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "rep"
    assert report.main([str(p) for p in paths] + ["-o", str(out)]) == 0
    assert (out / "matmul_fwd_bfloat16.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "replay.png").exists()
    md = (out / "report.md").read_text()
    assert "Synthetic GPU (test)" in md and "| Synthetic GPU (test) | 3000 | 790 | 800 |" in md


def test_lost_cuda_context_aborts_but_keeps_rows(monkeypatch, tmp_path):
    """After an error that leaves the GPU unusable the run stops, keeping what it measured."""
    _plant_torch_failure(monkeypatch, "CUDA error: an illegal memory access was encountered")

    def check_context(self):
        raise bench.CudaContextLost("planted")

    monkeypatch.setattr(bench.Runner, "check_context", check_context)
    out = tmp_path / "r.json"
    assert bench.main([*SMOKE, "--modes", "fwd", "--providers", "tritonops,torch", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["run"]["complete"] is False and "CUDA context was lost" in res["run"]["aborted"]
    rows = {r["provider"]: r for r in res["cases"]}
    assert "p50" in rows["tritonops"] and rows["torch"]["error"].startswith("CUDA context lost")


def test_report_reads_a_replay_only_file(tmp_path):
    """perf.replay --out writes {"replay": ..., "replay_summary": ...}: the report plots it."""
    data = {"replay": {"[64, 64, 64, \"float16\"] (synthetic)": {"exhaustive": [3.0, 2.0, 2.0, 1.5],
                                                                 "local": [3.0, 1.5]}},
            "replay_summary": {"synthetic": True, "device": None}}
    path = tmp_path / "replay.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "replay.png").read_bytes().startswith(PNG_MAGIC)
    assert "(replay.png)" in (tmp_path / "rep" / "report.md").read_text()


def test_replay_timings_curves():
    """One replay over a table of config -> ms: best-so-far curves that never rise, every
    strategy reaching the best of a table whose best is next to the start."""
    from autotune import STRATEGIES
    from tritonops.tuning.matmul import MATMUL_SPACE, matmul_call_keys, matmul_heuristic

    start = matmul_heuristic(matmul_call_keys(64, 64, 64, "bfloat16")[0])
    near = [c for c in MATMUL_SPACE.neighbours(start)][:4]
    timings = {start: 2.0, near[0]: 1.0, near[1]: None, near[2]: 3.0, near[3]: 2.5}
    r = replay.replay_timings(timings, start, MATMUL_SPACE, seeds=3)
    assert r["configs"] == 5 and r["best_ms"] == 1.0 and r["budget"] == 5
    assert set(r["curves"]) == set(STRATEGIES)
    for name, curve in r["curves"].items():
        values = [v for v in curve if v is not None]
        assert values and all(a >= b for a, b in zip(values, values[1:])), name
        stats = r["strategies"][name]
        assert values[-1] == 1.0 and stats["within"]["2%"]["hits"] == stats["runs"] == 3, name
        if name != "exhaustive":
            assert curve[0] == 2.0, name  # every run starts from the default
    # exhaustive goes in the space's order, and a run stops once it is within 2% of the best
    order = sorted(timings, key=MATMUL_SPACE.order)
    assert r["strategies"]["exhaustive"]["within"]["2%"]["median"] == order.index(near[0]) + 1
    assert len(r["curves"]["exhaustive"]) == order.index(near[0]) + 1


def test_replay_benchmark_on_the_synthetic_table():
    table = replay.synthetic_table()
    key = next(iter(table["keys"]))
    budget = len(table["keys"][key]["timings"])  # exhaustive's whole list
    result = replay.replay({**table, "keys": {key: table["keys"][key]}}, seeds=3,
                           budget=budget)["keys"][key]["strategies"]
    for name in ("exhaustive", "ils", "bayes"):
        assert result[name]["within"]["2%"]["hits"] == result[name]["runs"], name
    assert result["bayes"]["within"]["2%"]["median"] < result["exhaustive"]["within"]["2%"]["median"] / 10


def test_synthetic_table_keys_are_the_ops_keys():
    """The synthetic table is keyed by torch.matmul's forward key, as the ops build it."""
    from autotune import Config
    from tritonops.tuning.matmul import MatmulKey, matmul_call_keys, matmul_heuristic

    table = replay.synthetic_table()
    assert table["synthetic"] is True
    for text, entry in table["keys"].items():
        key = MatmulKey(*json.loads(text))
        assert key == matmul_call_keys(key.M, key.N, key.K, key.dtype)[0]
        assert Config.from_json(entry["default"]) == matmul_heuristic(key)
        assert entry["default"] in entry["timings"]


def test_bench_replay_feeds_the_report(tmp_path):
    """bench --replay times a small table and replays it with perf.replay: the results carry
    the curves the report's replay plot draws."""
    out = tmp_path / "r.json"
    assert bench.main(["--preset", "smoke", "--ops", "", "--no-ceilings", "--replay", "3",
                       "--replay-shape", "16x16x16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "replay_error" not in res, res.get("replay_error")
    (name, curves), = res["replay"].items()
    from autotune import STRATEGIES

    assert set(curves) == set(STRATEGIES)
    assert all(isinstance(v, float) for curve in curves.values() for v in curve)
    meta = res["replay_meta"][name]
    assert meta["key"][:3] == [16, 16, 16] and len(meta["table"]) == 3
    assert set(meta["strategies"]) == set(curves)
    assert report.main([str(out), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "replay.png").read_bytes().startswith(PNG_MAGIC)


def test_modules_run_from_the_root():
    """`python3 -m perf.X` from the checkout root; the report never imports torch."""
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    r = run("-c", "import sys, perf.report, perf.schema; assert 'torch' not in sys.modules, 'torch imported'")
    assert r.returncode == 0, r.stderr
    for module in ("perf.bench", "perf.report", "perf.replay", "perf.bench_lookup"):
        r = run("-m", module, "--help")
        assert r.returncode == 0 and f"python3 -m {module}" in r.stdout, (module, r.stderr)
