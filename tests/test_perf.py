"""perf/: the benchmark runner's results schema, the work counts behind its metrics, and
the report rendering every plot from the committed sample. Nothing here is timed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parent.parent / "perf"
SAMPLE = PERF / "results" / "sample" / "results.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    if str(PERF) not in sys.path:
        sys.path.insert(0, str(PERF))  # bench.py imports cases.py as a sibling
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench")


@pytest.fixture(scope="module")
def report():
    return _load("report")


@pytest.fixture(scope="module")
def cases():
    _load("bench")
    import cases as mod

    return mod


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
    monkeypatch.setenv("TRITONOPS_CACHE_DIR", str(tmp_path / "cache"))


SMOKE = ["--preset", "smoke", "--ops", "matmul", "--max-shapes", "1", "--tune-budget", "2", "--no-ceilings"]


def test_smoke_run_schema(bench, tmp_path):
    """A tiny matmul run end to end (interpreter here, the GPU there): the results file."""
    out = tmp_path / "r.json"
    rc = bench.main([*SMOKE, "--modes", "fwd,bwd", "--providers", "tritonops,torch", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["schema"] == bench.SCHEMA and res["schema_version"] == bench.SCHEMA_VERSION
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


def test_failing_provider_is_recorded(bench, cases, monkeypatch, tmp_path):
    """A provider that raises becomes an error row; the others still run."""
    spec = cases.OPS["matmul"]
    real = spec.provider_fn

    def provider_fn(provider, shape, ours):
        if provider == "torch":
            def boom(*args):
                raise RuntimeError("planted failure\nsecond line")
            return boom
        return real(provider, shape, ours)

    monkeypatch.setattr(spec, "provider_fn", provider_fn)
    out = tmp_path / "r.json"
    bench.main([*SMOKE, "--modes", "fwd", "--providers", "tritonops,torch", "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())["cases"]}
    assert rows["torch"]["error"].startswith("RuntimeError: planted failure")
    assert "p50" in rows["tritonops"] and rows["tritonops"]["speedup_vs_torch"] is None


def test_tuner_state_restores(bench):
    from autotune.registry import TUNERS

    before = {n: (t.mode, t.max_evals, t.max_seconds) for n, t in TUNERS.items()}
    with bench.tuner_state(mode="off", max_evals=3, max_seconds=1.0):
        assert all(t.mode == "off" and t.max_evals == 3 for t in TUNERS.values())
    assert {n: (t.mode, t.max_evals, t.max_seconds) for n, t in TUNERS.items()} == before


def test_work_counts(cases):
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


def test_presets_cover_every_op(cases):
    for name, spec in cases.OPS.items():
        assert spec.shapes["smoke"], name
        assert spec.shapes["full"], name
        for shape in spec.shapes["full"]:
            assert spec.x in shape and all(g in shape for g in spec.group)
    full_mm = cases.OPS["matmul"].shapes["full"]
    assert len(full_mm) == 24 and {s["M"] for s in full_mm} == {1, 16, 128, 1024, 4096, 8192}
    assert [s["cols"] for s in cases.OPS["softmax"].shapes["full"]][::10] == [256, 262144]


def test_report_renders_sample(report, tmp_path):
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


def test_missing_op_is_recorded(bench, cases, monkeypatch, tmp_path):
    """An op whose module does not import (yet) is skipped with its reason, not a crash."""
    monkeypatch.setattr(cases.OPS["softmax"], "module", "tritonops.ops.no_such_module")
    out = tmp_path / "r.json"
    assert bench.main(["--preset", "smoke", "--ops", "softmax", "--no-ceilings", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ops"]["softmax"]["status"] == "missing"
    assert "does not import" in res["ops"]["softmax"]["reason"]
    assert res["cases"] == [] and res["run"]["complete"] is True


def test_report_ceilings_and_two_devices(report, tmp_path):
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


def test_lost_cuda_context_aborts_but_keeps_rows(bench, cases, monkeypatch, tmp_path):
    """After an error that leaves the GPU unusable the run stops, keeping what it measured."""
    spec = cases.OPS["matmul"]
    real = spec.provider_fn

    def provider_fn(provider, shape, ours):
        if provider == "torch":
            def boom(*args):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return boom
        return real(provider, shape, ours)

    def check_context(self):
        raise bench.CudaContextLost("planted")

    monkeypatch.setattr(spec, "provider_fn", provider_fn)
    monkeypatch.setattr(bench.Runner, "check_context", check_context)
    out = tmp_path / "r.json"
    assert bench.main([*SMOKE, "--modes", "fwd", "--providers", "tritonops,torch", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["run"]["complete"] is False and "CUDA context was lost" in res["run"]["aborted"]
    rows = {r["provider"]: r for r in res["cases"]}
    assert "p50" in rows["tritonops"] and rows["torch"]["error"].startswith("CUDA context lost")


def test_report_reads_a_replay_only_file(report, tmp_path):
    """perf/replay.py --out writes {"replay": ..., "replay_summary": ...}: the report plots it."""
    data = {"replay": {"[64, 64, 64, \"float16\"] (synthetic)": {"exhaustive": [3.0, 2.0, 2.0, 1.5],
                                                                 "local": [3.0, 1.5]}},
            "replay_summary": {"synthetic": True, "device": None}}
    path = tmp_path / "replay.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "replay.png").read_bytes().startswith(PNG_MAGIC)
    assert "(replay.png)" in (tmp_path / "rep" / "report.md").read_text()
