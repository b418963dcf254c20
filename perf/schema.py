"""The results file that perf.bench writes and perf.report reads: its name and version,
the provider names, the no-GPU warning, the summaries both of them print, and the small
helpers every reader of a results file uses.

Imports nothing beyond the standard library: the report only reads JSON, and plots
on a machine without torch.
"""

from __future__ import annotations

import math
from typing import Iterable

SCHEMA = "tritonops-bench"
SCHEMA_VERSION = 1
NOT_PERF = ("NO GPU: kernels ran under Triton's CPU interpreter and were timed with a wall clock on "
            "tiny shapes. These are NOT performance numbers; they only show that the runner works.")

# tritonops = tuned (each Tuner in mode "on" on a GPU); tritonops-default = every Tuner in mode "off"
BASE_PROVIDERS = ("tritonops", "tritonops-default", "torch", "torch.compile")
# provider -> the torch.nn.attention.SDPBackend it restricts F.scaled_dot_product_attention to
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
PROVIDERS = BASE_PROVIDERS + tuple(SDPA_BACKENDS)


def finite_number(value) -> bool:
    """Whether a value read back from JSON is a finite number (not a bool, None or a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def geomean(values: Iterable) -> float | None:
    """Geometric mean of the positive finite numbers among `values` (None, errors and junk
    read back from JSON are left out); None when there are none."""
    vals = [v for v in values if finite_number(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def shape_label(shape: dict) -> str:
    """A case's shape as text, e.g. "M=16 N=4096 K=4096"."""
    return " ".join(f"{k}={v}" for k, v in shape.items())


def md_table(header, rows) -> list[str]:
    """A markdown table, and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def speedup_table(rows: Iterable[tuple[str, dict]]) -> dict[tuple, dict[str, float | None]]:
    """(op, mode, dtype) -> {series: geometric mean over shapes of speedup_vs_torch}, from
    (series name, result row) pairs. torch's own rows (1.0 by definition) are left out; a
    series none of whose rows has a speed-up (errors, skips) maps to None."""
    groups: dict = {}
    for series, r in rows:
        if r.get("provider") == "torch":
            continue
        groups.setdefault((r["op"], r["mode"], r["dtype"]), {}).setdefault(series, []).append(
            r.get("speedup_vs_torch"))
    return {k: {s: geomean(v) for s, v in d.items()} for k, d in groups.items()}
