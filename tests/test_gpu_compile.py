"""Every kernel family compiles for Hopper (sm90) with its default configs and fits in
the H100's shared memory: checked without a GPU by tests/sm90_compile.py, which compiles
the launches the real launchers make (see its docstring)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.mark.parametrize("family", ["matmul", "softmax", "norm", "attention"])
def test_kernels_compile_for_sm90(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(SCRIPT), family], capture_output=True, text=True, env=env, timeout=600)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    failed = [f"{x['kernel']} {x.get('constants')} warps={x.get('num_warps')} stages={x.get('num_stages')}: "
              f"{x.get('error')}" for x in results if not x["ok"]]
    assert r.returncode == 0 and results and not failed, "\n".join(failed) or r.stderr[-3000:]
