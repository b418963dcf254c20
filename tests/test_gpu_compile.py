"""What a GPU would run, checked without one: tests/sm90_compile.py compiles the launches the
real launchers make for sm90, specialised as the JIT specialises them (see its docstring).

- Every kernel family compiles with its default configs and fits the H100's shared memory.
- The structural report of the heuristic defaults meets the Hopper targets: the large matmul
  on wgmma and TMA with a persistent grid, decode shapes filling the GPU, attention forward
  on wgmma and TMA, and no default that spills or exceeds 227 KB of shared memory.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
H100_SMS = 132
H100_SHARED = 232448


def _run(*args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "tests.sm90_compile", *args], capture_output=True, text=True,
                       env=env, timeout=900, cwd=ROOT)
    return r, [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("family", ["matmul", "softmax", "norm", "attention"])
def test_kernels_compile_for_sm90(family):
    r, rows = _run(family)
    failed = [f"{x['case']} {x['kernel']} {x.get('config')}: {x.get('error')}" for x in rows if not x["ok"]]
    assert r.returncode == 0 and rows and not failed, "\n".join(failed) or r.stderr[-3000:]


@functools.lru_cache(maxsize=None)
def _report_run() -> tuple[tuple[dict, ...], str]:
    """The report's rows and stderr, run once for all the tests (a failure too: each test
    asserts on what came back rather than running it again)."""
    try:
        r, rows = _run("--report")
    except subprocess.TimeoutExpired as e:
        return (), f"timed out: {e}"
    return tuple(rows), r.stderr[-3000:]


def _report() -> tuple[dict, ...]:
    rows, stderr = _report_run()
    assert rows, stderr
    return rows


def _rows(op: str, case: str = "") -> list[dict]:
    rows = [r for r in _report() if r["op"] == op and case in r["case"]]
    assert rows, f"no report rows for {op} {case}"
    return rows


REPORT_FIELDS = {"op", "case", "kernel", "config", "grid", "wgmma", "mma_sync", "cp_async", "tma_loads", "tma_stores",
                 "regs", "spills", "smem"}


def test_report_no_default_spills_or_overflows_shared_memory():
    rows = _report()
    assert {r["op"] for r in rows} >= {"matmul", "linear", "attention_fwd", "attention_bwd", "attention_decode",
                                       "softmax_fwd", "softmax_bwd", "rms_norm_fwd", "rms_norm_bwd"}
    bad = [r for r in rows if not r["ok"] or r["spills"] != 0 or r["smem"] > H100_SHARED]
    assert not bad, "\n".join(json.dumps(r) for r in bad)
    assert all(REPORT_FIELDS <= set(r) for r in rows)


@pytest.mark.parametrize("op,case", [("matmul", "8192x8192x8192"), ("linear", "8192x8192x8192")])
def test_report_large_matmul_is_persistent_on_wgmma_and_tma(op, case):
    for r in _rows(op, case):
        assert r["wgmma"] > 0 and r["tma_loads"] > 0 and r["tma_stores"] > 0, r
        assert r["grid"] <= H100_SMS, r


@pytest.mark.parametrize("m", [16, 64])
def test_report_decode_linear_fills_the_gpu(m):
    rows = _rows("linear", f"{m}x4096x4096")
    assert max(r["grid"] for r in rows) >= 2 * H100_SMS, rows


@pytest.mark.parametrize("causal", ["full", "causal"])
def test_report_attention_forward_on_wgmma_and_tma(causal):
    for r in _rows("attention_fwd", causal):
        assert r["wgmma"] > 0 and r["tma_loads"] > 0, r


def test_report_attention_decode_fills_the_gpu():
    rows = _rows("attention_decode")
    assert max(r["grid"] for r in rows) >= H100_SMS, rows
