"""From a GPU run to the repository: perf.targets' verdicts, perf.publish's checks of what it
ships, the shipped configs of the checkout, and perf/gpu_check.sh end to end under the
interpreter (the dry run of what a GPU machine runs). Nothing here is timed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from autotune import CacheDir
from autotune.cache import BUNDLE_FORMAT, encode_key, read_bundle
from autotune.registry import TUNERS
from perf import publish, schema, targets
from tritonops.tuning.common import SHIPPED_CONFIGS
from tritonops.tuning.softmax import SOFTMAX_TUNER, SoftmaxKey

ROOT = Path(__file__).resolve().parent.parent
H200 = "nvidia-h200-sm90-triton3.6"


def _row(op, mode, shape, provider, p50, value=1.0, speedup=None, pct=None, dtype="bfloat16", metric="TFLOP/s"):
    if p50 is None:
        return {"op": op, "mode": mode, "dtype": dtype, "shape": shape, "provider": provider, "error": "failed"}
    return {"op": op, "mode": mode, "dtype": dtype, "shape": shape, "provider": provider, "p20": p50, "p50": p50,
            "p80": p50, "metric": {"name": metric, "value": value}, "speedup_vs_torch": speedup,
            "pct_of_ceiling": pct}


def _results(cases, gpu=True):
    return {"schema": schema.SCHEMA, "schema_version": schema.SCHEMA_VERSION,
            "device": {"name": "NVIDIA H200" if gpu else "cpu (Triton interpreter)", "gpu": gpu,
                       "capability": "9.0", "sm_count": 132, "driver": "570.00", "torch": "2.11.0",
                       "triton": "3.6.0", "cuda": "12.8", "python": "3.12.3", "date": "2026-12-01T00:00:00+00:00"},
            "run": {"preset": "quick", "modes": ["fwd"], "dtypes": ["bfloat16"], "complete": True}, "ceilings": {"copy_GBps": 4000.0, "matmul_tflops": {"bfloat16": 800.0}},
            "ops": {}, "cases": cases}


def _matmul_case(M, N, K, ours_ms, torch_ms, tflops=100.0, dtype="bfloat16", mode="fwd"):
    s = {"M": M, "N": N, "K": K}
    return [_row("matmul", mode, s, "torch", torch_ms, dtype=dtype),
            _row("matmul", mode, s, "tritonops", ours_ms, tflops, torch_ms / ours_ms if ours_ms else None,
                 dtype=dtype)]


def _rows_case(op, cols, ours_ms, pct, compile_ms):  # ours_ms None: ours failed there
    s = {"rows": 4096, "cols": cols}
    return [_row(op, "fwd", s, "tritonops", ours_ms, 1.0, 1.0, pct, metric="GB/s"),
            _row(op, "fwd", s, "torch.compile", compile_ms, metric="GB/s")]


def _attention_case(op, L, ours_ms, flash_ms):
    s = {"B": 1, "H": 16, "L": L, "S": L, "E": 128, "causal": 0}
    return [_row(op, "fwd", s, "tritonops", ours_ms), _row(op, "fwd", s, "sdpa-flash", flash_ms)]


def _by_name(found):
    return {t.name: t for t in found}


def test_targets_say_met_missed_and_not_measured():
    cases = (_matmul_case(1024, 4096, 4096, 1.0, 1.2) + _matmul_case(8192, 4096, 4096, 1.0, 0.9)  # with 8192^3: 1.08^(1/3)
             + _matmul_case(8192, 8192, 8192, 1.0, 1.0, tflops=700.0)
             + _matmul_case(1024, 4096, 4096, None, 1.0, dtype="float16")
             + _matmul_case(1024, 4096, 4096, 1.0, 0.8, mode="bwd")
             + _rows_case("softmax", 2048, 1.0, 10.0, 0.5)  # under 4096 columns: no target
             + _rows_case("softmax", 32768, 1.0, 92.0, 1.1) + _rows_case("softmax", 65536, 1.0, 85.0, 1.0)
             + _rows_case("rms_norm", 8192, 1.0, 95.0, 0.9)
             + _rows_case("layer_norm", 8192, 1.0, 95.0, 1.5) + _rows_case("layer_norm", 16384, None, None, 1.0)
             + _attention_case("attention", 1024, 1.0, 1.1) + _attention_case("attention", 4096, 1.0, 0.95)
             + _attention_case("attention_decode", 1, 1.0, None))
    found = _by_name(targets.evaluate(_results(cases)))
    geo = found["matmul fwd bfloat16: geomean vs torch.matmul >= 1.0"]
    assert geo.status == "met" and geo.value.startswith("1.026x over 3 shapes") and "below 1.0x" in geo.detail
    assert found["matmul fwd bfloat16 8192^3: > 780 TFLOP/s"].status == "missed"
    assert found["matmul fwd bfloat16 8192^3: > 780 TFLOP/s"].value == "700 TFLOP/s"
    assert found["matmul fwd float16: geomean vs torch.matmul >= 1.0"].status == "not measured"
    assert found["matmul fwd float16 8192^3: > 780 TFLOP/s"].status == "not measured"
    assert found["matmul bwd bfloat16: geomean vs torch.matmul >= 1.0"].status == "missed"
    pct = found["softmax fwd bfloat16, cols >= 4096: >= 90% of copy bandwidth"]
    assert pct.status == "missed" and pct.failing == ["rows=4096 cols=65536"] and pct.value == "lowest 85%"
    assert found["softmax fwd bfloat16, cols >= 4096: never slower than torch.compile"].status == "met"
    assert found["rms_norm fwd bfloat16, cols >= 4096: >= 90% of copy bandwidth"].status == "met"
    slower = found["rms_norm fwd bfloat16, cols >= 4096: never slower than torch.compile"]
    assert slower.status == "missed" and slower.value == "lowest 0.900x torch.compile"
    partly = found["layer_norm fwd bfloat16, cols >= 4096: >= 90% of copy bandwidth"]
    assert partly.status == "partly measured" and "1 shape(s) not measured" in partly.detail
    # what the run was asked for (fwd, bfloat16) but never measured is listed, not left out
    absent = found["log_softmax fwd bfloat16, cols >= 4096: never slower than torch.compile"]
    assert absent.status == "not measured" and absent.detail == "not in the run"
    # measured though not asked for (bwd bfloat16): listed; neither (bwd float16): not
    assert "matmul bwd bfloat16: geomean vs torch.matmul >= 1.0" in found
    assert "matmul bwd float16: geomean vs torch.matmul >= 1.0" not in found
    attn = found["attention fwd bfloat16: at least SDPA flash at every shape"]
    assert attn.status == "missed" and attn.failing == ["B=1 H=16 L=4096 S=4096 E=128 causal=0"]
    assert found["attention_decode fwd bfloat16: at least SDPA flash at every shape"].status == "not measured"
    with pytest.raises(ValueError, match="not a tritonops-bench"):
        targets.evaluate({"cases": []})
    with pytest.raises(ValueError, match="not a results row"):
        targets.evaluate(_results([{"op": "matmul"}]))
    with pytest.raises(ValueError, match="modes are not a list"):
        targets.evaluate({**_results([]), "run": {"modes": "fwd"}})
    # a run stopped inside softmax (its info has no "seconds"): the shapes it had left are not
    # among the cases at all, so what was measured can at best be partly measured
    stopped = _results(_rows_case("softmax", 32768, 1.0, 95.0, 2.0))
    stopped["ops"] = {"softmax": {"status": "ok"}}
    stopped["run"]["complete"] = False
    cut = _by_name(targets.evaluate(stopped))["softmax fwd bfloat16, cols >= 4096: >= 90% of copy bandwidth"]
    assert cut.status == "partly measured" and "the run stopped in this op" in cut.detail
    assert "The run did not complete" in "\n".join(targets.summary_markdown(stopped))
    stopped["ops"]["softmax"]["seconds"] = 3.0
    assert _by_name(targets.evaluate(stopped))[cut.name].status == "met"
    broken = _matmul_case(8192, 8192, 8192, 1.0, 1.0)
    broken[1]["metric"] = None  # read from disk: never trusted to be a number
    assert _by_name(targets.evaluate(_results(broken)))["matmul fwd bfloat16 8192^3: > 780 TFLOP/s"].status == \
        "not measured"


def test_performance_table_has_the_ratios_and_ceiling_shares():
    cases = _matmul_case(1024, 4096, 4096, 1.0, 2.0) + _matmul_case(8192, 4096, 4096, 1.0, 0.5)
    cases[1]["pct_of_ceiling"], cases[3]["pct_of_ceiling"] = 40.0, 91.0
    cases += [_row("matmul", "fwd", {"M": 1024, "N": 4096, "K": 4096}, "tritonops-default", 1.5)]
    cases += _rows_case("softmax", 32768, 2.0, 80.0, 3.0)
    rows = {(r[0], r[1], r[2]): r for r in targets.performance_rows(_results(cases))}
    header = targets.PERFORMANCE_HEADER
    mm = dict(zip(header, rows[("matmul", "fwd", "bfloat16")]))
    assert mm["shapes timed"] == "2/2" and mm["vs torch"] == "1.00x" and mm["tuned vs default"] == "1.50x"
    assert mm["% of ceiling"] == "40-91%" and mm["vs SDPA flash"] == "-"
    sm = dict(zip(header, rows[("softmax", "fwd", "bfloat16")]))
    assert sm["vs torch.compile"] == "1.50x" and sm["% of ceiling"] == "80-80%"
    text = "\n".join(targets.summary_markdown(_results(cases, gpu=False)))
    assert text.startswith("> **NO GPU") and "copy 4000 GB/s" in text


# --------------------------------------------------------------------------- perf.publish


def _entry(config, ms):
    return {"winner": config.to_dict(), "timing": {"p20": ms, "p50": ms, "p80": ms}}


def _bundle(path: Path, files: list[dict]) -> Path:
    path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files}))
    return path


def _file(fingerprint, identity, entries, kernel="softmax"):
    return {"fingerprint": fingerprint, "identity": identity, "kernel": kernel, "entries": entries}


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(ROOT / "README.md", root / "README.md")  # the real README has the section's markers
    return root


def test_publish_ships_only_what_this_checkout_can_use(tmp_path):
    key = SoftmaxKey(4096, 4096, "bfloat16", False, False)
    text = encode_key(key)
    default = SOFTMAX_TUNER.default(key)
    other = next(c for c in SOFTMAX_TUNER.candidates(key) if c != default)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_results(_matmul_case(8192, 8192, 8192, 1.0, 1.1, 850.0))))
    (folder / "env.txt").write_text("NVIDIA H200, driver 570.00\n")
    _tar(folder / "report.tar.gz", {"report/report.md": b"# report", "report/speedup.png": b"\x89PNG",
                                    "../evil.md": b"x", "report/run.sh": b"x"}, symlink="report/link.png")
    bad_winner = {**other.to_dict(), "BLOCK_N": 12345}
    _bundle(folder / "tuned.json", [
        _file(H200, SOFTMAX_TUNER.identity, {text: _entry(other, 2.0),
                                             encode_key(key._replace(N=8192)): {"winner": bad_winner}}),
        _file("nvidia-h100-80gb-hbm3-sm90-triton3.6", SOFTMAX_TUNER.identity, {text: _entry(other, 1.0)}),
        _file(H200, "softmax-0123456789abcdef-v1", {text: _entry(other, 1.0)}),
    ])
    root = _checkout(tmp_path)
    written, skipped = publish.publish(folder, root)
    dest = root / "perf" / "results" / "nvidia-h200"
    assert sorted(p.name for p in dest.iterdir()) == ["env.txt", "report.md", "results.json", "speedup.png",
                                                      "summary.md"]
    assert not (tmp_path / "evil.md").exists() and not (root / "perf" / "results" / "evil.md").exists()
    assert sum("not a plain report" in s for s in skipped) == 3
    assert any("12345" in s for s in skipped)
    assert any("another device" in s and "h100" in s for s in skipped)
    assert any("no tuner here has this identity" in s for s in skipped)
    shipped = root / "tritonops" / "configs" / "nvidia-h200.json"
    files, problems = read_bundle(shipped)
    assert not problems and [(f["fingerprint"], f["identity"]) for f in files] == [(H200, SOFTMAX_TUNER.identity)]
    assert files[0]["entries"] == {text: _entry(other, 2.0)}
    readme = (root / "README.md").read_text()
    block = readme.split(publish.README_BEGIN)[1].split(publish.README_END)[0]
    assert "NVIDIA H200" in block and "| matmul | fwd | bfloat16 | 1/1 | 1.10x |" in block
    assert "matmul fwd bfloat16 8192^3: > 780 TFLOP/s | met | 850 TFLOP/s" in block
    assert "No GPU results" not in readme and readme.count(publish.README_BEGIN) == 1
    assert "## Performance" in readme and "## What a GPU would run" in readme  # the rest stays

    # a second run: of two entries for one key the faster is shipped; the README block is replaced
    _bundle(folder / "tuned.json", [_file(H200, SOFTMAX_TUNER.identity, {text: _entry(default, 1.5)})])
    written, skipped = publish.publish(folder, root)
    assert not [s for s in skipped if "tuned.json" in s]
    files, _ = read_bundle(shipped)
    assert files[0]["entries"][text]["winner"] == default.to_dict()
    assert (root / "README.md").read_text().count("Measured on NVIDIA H200") == 1


def test_publish_replaces_the_previous_run_and_ships_nothing_invalid(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_results(_matmul_case(1024, 4096, 4096, 1.0, 1.0))))
    _bundle(folder / "tuned.json", [_file(H200, "softmax-0123456789abcdef-v1", {})])
    root = _checkout(tmp_path)
    dest = root / "perf" / "results" / "nvidia-h200"
    dest.mkdir(parents=True)
    for name in ("old_plot.png", "report.md", "bench.log", "results-full.json"):
        (dest / name).write_text("an earlier run")
    written, skipped = publish.publish(folder, root)
    assert sorted(p.name for p in dest.iterdir()) == ["results-full.json", "results.json", "summary.md"]
    assert "report.tar.gz: not there" in skipped
    assert not (root / "tritonops" / "configs").exists() and any("no configs to ship" in w for w in written)
    assert "(no report came back)" in (root / "README.md").read_text()
    # a cut archive is skipped, not a crash halfway
    whole = _tar(tmp_path / "whole.tar.gz", {"report/report.md": os.urandom(20000)})  # incompressible
    (folder / "report.tar.gz").write_bytes(whole.read_bytes()[:200])
    written, skipped = publish.publish(folder, root)
    assert any(s.startswith("report.tar.gz: ") and "Error" in s for s in skipped), skipped
    assert (dest / "summary.md").exists()
    with pytest.raises(publish.Refused, match="where the run would be published"):
        publish.publish(dest, root)  # would clear its own input
    assert (dest / "results.json").exists()


def test_publish_refuses_what_is_not_a_gpu_run(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    root = _checkout(tmp_path)
    with pytest.raises(publish.Refused, match="results.json"):
        publish.publish(folder, root)
    (folder / "results.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(publish.Refused, match="not a perf.bench results file"):
        publish.publish(folder, root)
    (folder / "results.json").write_text(json.dumps(_results([], gpu=False)))
    with pytest.raises(publish.Refused, match="interpreter"):
        publish.publish(folder, root)
    nameless = _results([])
    nameless["device"]["name"] = "???"
    (folder / "results.json").write_text(json.dumps(nameless))
    with pytest.raises(publish.Refused, match="no letters or digits"):
        publish.publish(folder, root)
    (folder / "results.json").write_text(json.dumps(_results([{"op": "matmul", "shape": None}])))
    with pytest.raises(publish.Refused, match="not a results row"):
        publish.publish(folder, root)
    (folder / "results.json").write_text(json.dumps(_results([])))
    for readme in ("# no markers\n", f"# only the first\n{publish.README_BEGIN}\n",
                   f"{publish.README_END}\n# in the wrong order\n{publish.README_BEGIN}\n"):
        (root / "README.md").write_text(readme)
        with pytest.raises(publish.Refused, match="performance:begin"):
            publish.publish(folder, root)
    assert not (root / "perf").exists() and not (root / "tritonops").exists()
    assert publish.main([str(folder), "--root", str(root)]) == 2


def test_shipped_configs_are_valid_for_the_tuners_here():
    """Every entry of tritonops/configs/*.json is well formed and, where its kernel's source and
    space are this checkout's, a config of that tuner's space (an entry of changed code is
    never used: the next publish drops it); the tuners read that folder, and the package
    installs it."""
    configs = ROOT / "tritonops" / "configs"
    assert all(path.parent == configs for path in SHIPPED_CONFIGS)
    assert SHIPPED_CONFIGS == sorted(configs.glob("*.json"))
    assert 'tritonops = ["configs/*.json"]' in (ROOT / "pyproject.toml").read_text()
    by_identity = {t.identity: t for t in TUNERS.values()}
    for path in SHIPPED_CONFIGS:
        files, problems = read_bundle(path)
        assert not problems, (path, problems)
        for f in files:
            tuner = by_identity.get(f["identity"])
            for text, entry in f["entries"].items():
                assert tuner is None or tuner.entry_problem(text, entry, this_device=False) is None, (path, text)


# --------------------------------------------------------------------------- perf/gpu_check.sh


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run under the interpreter; on a GPU the script "
                                                      "is run as itself, not from its own test suite")
def test_gpu_check_dry_run_brings_back_what_publish_takes(tmp_path, monkeypatch):
    """The script's every step under the interpreter, on one op: at most 8 flat files, each step
    done, a bundle whose configs publish ships and a tuner then serves as shipped."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_TESTS": "tests/test_perf.py::test_work_counts", "GPU_CHECK_TUNE_OPS": "softmax",
           "GPU_CHECK_TUNE_PRESET": "smoke", "GPU_CHECK_TUNE_BUDGET": "3", "GPU_CHECK_PRESET": "smoke",
           "GPU_CHECK_BENCH_OPS": "softmax"}
    env.pop("TRITON_INTERPRET", None)  # every step chooses the interpreter itself without a GPU
    r = subprocess.run(["bash", str(ROOT / "perf" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.log", "env.txt", "report.tar.gz", "results.json", "status.txt", "tests.log",
                     "tune.log", "tuned.json"], names
    assert all((out / n).is_file() for n in names)
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == ["env", "tests", "tune", "export", "bench", "export", "report",
                                                       "archive"]
    assert all(" rc=0 " in line + " " for line in status), status
    assert "1 passed" in (out / "tests.log").read_text()
    files, problems = read_bundle(out / "tuned.json")
    assert not problems and {f["kernel"] for f in files} == {"softmax", "softmax_bwd"}
    with tarfile.open(out / "report.tar.gz") as tar:
        assert "report/report.md" in tar.getnames()

    root = _checkout(tmp_path)
    written, skipped = publish.publish(out, root, allow_interpreter=True)
    assert not skipped, skipped
    shipped = root / "tritonops" / "configs" / "cpu-triton-interpreter.json"
    (f,) = [f for f in read_bundle(shipped)[0] if f["kernel"] == "softmax"]
    text, entry = next(iter(f["entries"].items()))
    monkeypatch.setattr(SOFTMAX_TUNER, "shipped", [shipped])
    monkeypatch.setattr(SOFTMAX_TUNER, "_shipped", None)
    key = SoftmaxKey(*json.loads(text))
    with SOFTMAX_TUNER.override(mode="cached", cache_dir=tmp_path / "empty-cache"):
        assert SOFTMAX_TUNER.select(key).to_dict() == entry["winner"]
        assert SOFTMAX_TUNER.sources[key] == "shipped"
    assert CacheDir(tmp_path / "empty-cache").files() == []


def test_gpu_check_runs_every_test_file_once_the_kernels_first(tmp_path):
    env = {**os.environ, "GPU_CHECK_LIST_TESTS": "1"}
    env.pop("GPU_CHECK_TESTS", None)
    r = subprocess.run(["bash", str(ROOT / "perf" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    assert sorted(listed) == sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py"))
    assert listed[:2] == ["tests/test_matmul_variants.py", "tests/test_attention_paths.py"]
    assert listed[-1] == "tests/test_gpu_compile.py"
