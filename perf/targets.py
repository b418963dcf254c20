"""What a perf.bench results file says against the project's speed targets, and the table of
ratios the README's Performance section shows. Reads JSON only: no torch, no plotting.

    python3 -m perf.targets results.json            # the targets, then the table, as markdown

Targets (provider "tritonops", the tuned one, against the baselines of the same run):
    matmul        fp16/bf16: geometric-mean speed-up over torch.matmul >= 1.0 over the preset's
                  shapes (each mode and dtype measured), and > 780 TFLOP/s forward at 8192^3.
    rows          softmax, log_softmax, layer_norm, rms_norm, rows of 4096 columns or more: at
                  least 90% of the measured copy bandwidth, and never slower than torch.compile.
    attention     forward (attention, attention_decode): at least SDPA's flash backend at every
                  shape (its median time at most flash's).

A target is "met" when every shape it covers was measured and passes, "missed" when a measured
shape fails, "partly measured" when the measured shapes pass but some have no time, and "not
measured" when nothing it covers has a time (errors, skips, a missing baseline or ceiling, an
op, mode or dtype the run did not measure: every target of the run's modes and dtypes, and of
fp16 and bf16 for matmul, is listed). Correctness is not a target here: the table shows the
largest relative error of ours against torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .schema import NOT_PERF, SCHEMA, finite_number, geomean, md_table, shape_label

OURS = "tritonops"
MATMUL_TFLOPS_8192 = 780.0
ROW_OPS = ("softmax", "log_softmax", "layer_norm", "rms_norm")
ROW_MIN_COLS = 4096
ROW_PCT_OF_COPY = 90.0
ATTENTION_FWD_OPS = ("attention", "attention_decode")


@dataclass
class Target:
    name: str          # e.g. "matmul fwd bfloat16: geomean vs torch >= 1.0"; the op's name first
    status: str        # "met", "missed", "partly measured" or "not measured"
    value: str         # the number the target is about, as text
    detail: str = ""   # the worst shape, what was not measured
    failing: list = field(default_factory=list)  # shape labels that miss it


def _timed(row: dict | None) -> bool:
    return row is not None and finite_number(row.get("p50")) and row["p50"] > 0


def _metric(row: dict | None) -> float | None:
    metric = row.get("metric") if _timed(row) else None
    return metric["value"] if isinstance(metric, dict) and finite_number(metric.get("value")) else None


def _groups(results: dict) -> dict[tuple, dict[str, dict[str, dict]]]:
    """(op, mode, dtype) -> shape label -> provider -> row, in the file's order; ValueError for
    a case that is not a results row."""
    out: dict = {}
    cases = results.get("cases", [])
    if not isinstance(cases, list):
        raise ValueError("the results' cases are not a list")
    for r in cases:
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("op", "mode", "dtype", "provider"))
                and isinstance(r.get("shape"), dict)):
            raise ValueError(f"a case that is not a results row: {str(r)[:200]}")
        out.setdefault((r["op"], r["mode"], r["dtype"]), {}).setdefault(shape_label(r["shape"]), {})[r["provider"]] = r
    return out


def _verdict(name: str, checked: list[tuple[str, bool]], untimed: int, value: str, detail: str) -> Target:
    """checked: (shape label, passes) for every measured shape; untimed: shapes with no time."""
    if untimed:
        detail = (detail + "; " if detail else "") + f"{untimed} shape(s) not measured"
    if not checked:
        return Target(name, "not measured", value, detail)
    failing = [label for label, ok in checked if not ok]
    return Target(name, "missed" if failing else "partly measured" if untimed else "met", value, detail, failing)


def _expected(results: dict, ops, modes=None, dtypes=()) -> list[tuple[str, str, str]]:
    """The (op, mode, dtype) groups a target covers: what the run measured of `ops`, and what it
    was asked to measure (its modes, or `modes`; its dtypes and `dtypes`), in a fixed order."""
    run = results.get("run") or {}
    measured = [g for g in _groups(results) if g[0] in ops]
    want_modes = list(modes or run.get("modes") or [])
    want_dtypes = list(dict.fromkeys([*(run.get("dtypes") or []), *dtypes]))
    asked = [(op, mode, dtype) for op in ops for mode in want_modes for dtype in want_dtypes]
    if modes:
        measured = [g for g in measured if g[1] in modes]
    return list(dict.fromkeys(asked + measured))


def matmul_targets(results: dict) -> list[Target]:
    out = []
    groups = _groups(results)
    for op, mode, dtype in _expected(results, ("matmul",), dtypes=("float16", "bfloat16")):
        if dtype not in ("float16", "bfloat16"):
            continue
        shapes = groups.get((op, mode, dtype), {})
        speedups = [(label, rows[OURS]["speedup_vs_torch"]) for label, rows in shapes.items()
                    if _timed(rows.get(OURS)) and finite_number(rows[OURS].get("speedup_vs_torch"))]
        gm = geomean(v for _, v in speedups)
        slower = [(label, v) for label, v in speedups if v < 1.0]
        worst = min(speedups, key=lambda t: t[1], default=None)
        name = f"matmul {mode} {dtype}: geomean vs torch.matmul >= 1.0"
        value = f"{gm:.3f}x over {len(speedups)} shapes" if gm else "-"
        detail = (f"{len(slower)} shape(s) below 1.0x, the slowest {worst[1]:.3f}x at {worst[0]}" if slower
                  else f"every shape >= 1.0x, the lowest {worst[1]:.3f}x" if worst
                  else "" if shapes else "not in the run")
        target = _verdict(name, [("the geomean", gm >= 1.0)] if gm else [], len(shapes) - len(speedups),
                          value, detail)
        if len(speedups) < len(shapes) and gm:  # a geomean over some of the shapes settles nothing
            target.status = "partly measured"
        target.failing = []  # the detail names the shapes
        out.append(target)
        if mode == "fwd":
            big = shapes.get(shape_label({"M": 8192, "N": 8192, "K": 8192}), {}).get(OURS)
            name = f"matmul fwd {dtype} 8192^3: > {MATMUL_TFLOPS_8192:g} TFLOP/s"
            tflops = _metric(big)
            if tflops is not None:
                out.append(_verdict(name, [("M=8192 N=8192 K=8192", tflops > MATMUL_TFLOPS_8192)], 0,
                                    f"{tflops:.0f} TFLOP/s", ""))
            else:
                out.append(Target(name, "not measured", "-", "no timed 8192^3 case"))
    return out


def row_targets(results: dict) -> list[Target]:
    out = []
    groups = _groups(results)
    for op, mode, dtype in _expected(results, ROW_OPS):
        wide = {label: rows for label, rows in groups.get((op, mode, dtype), {}).items()
                if next(iter(rows.values()))["shape"].get("cols", 0) >= ROW_MIN_COLS}
        none = ("" if wide else "not in the run" if (op, mode, dtype) not in groups
                else f"no shape of {ROW_MIN_COLS} columns or more in the run")
        pct_checked, vs_checked, pct_untimed, vs_untimed = [], [], 0, 0
        pcts, ratios = [], []
        for label, rows in wide.items():
            ours = rows.get(OURS)
            pct = ours.get("pct_of_ceiling") if _timed(ours) else None
            if finite_number(pct):
                pct_checked.append((label, pct >= ROW_PCT_OF_COPY))
                pcts.append((label, pct))
            else:
                pct_untimed += 1
            compiled = rows.get("torch.compile")
            if _timed(ours) and _timed(compiled):
                ratio = compiled["p50"] / ours["p50"]  # > 1: ours faster
                vs_checked.append((label, ratio >= 1.0))
                ratios.append((label, ratio))
            else:
                vs_untimed += 1
        worst_pct = min(pcts, key=lambda t: t[1], default=None)
        out.append(_verdict(
            f"{op} {mode} {dtype}, cols >= {ROW_MIN_COLS}: >= {ROW_PCT_OF_COPY:g}% of copy bandwidth", pct_checked,
            pct_untimed, f"lowest {worst_pct[1]:.0f}%" if worst_pct else "-",
            f"at {worst_pct[0]}" if worst_pct else none))
        worst = min(ratios, key=lambda t: t[1], default=None)
        out.append(_verdict(
            f"{op} {mode} {dtype}, cols >= {ROW_MIN_COLS}: never slower than torch.compile", vs_checked, vs_untimed,
            f"lowest {worst[1]:.3f}x torch.compile" if worst else "-", f"at {worst[0]}" if worst else none))
    return out


def attention_targets(results: dict) -> list[Target]:
    out = []
    groups = _groups(results)
    for op, mode, dtype in _expected(results, ATTENTION_FWD_OPS, modes=("fwd",)):
        shapes = groups.get((op, mode, dtype), {})
        checked, ratios, untimed = [], [], 0
        for label, rows in shapes.items():
            ours, flash = rows.get(OURS), rows.get("sdpa-flash")
            if _timed(ours) and _timed(flash):
                ratio = flash["p50"] / ours["p50"]
                checked.append((label, ratio >= 1.0))
                ratios.append((label, ratio))
            else:
                untimed += 1
        worst = min(ratios, key=lambda t: t[1], default=None)
        out.append(_verdict(f"{op} fwd {dtype}: at least SDPA flash at every shape", checked, untimed,
                            f"lowest {worst[1]:.3f}x flash" if worst else "-",
                            f"at {worst[0]}" if worst else "" if shapes else "not in the run"))
    return out


def unfinished_ops(results: dict) -> set[str]:
    """Ops the run began and did not finish (killed, or the CUDA context lost): their last shapes
    may be missing from the cases altogether."""
    ops = results.get("ops") or {}
    return {op for op, info in ops.items() if isinstance(info, dict) and info.get("status") == "ok"
            and "seconds" not in info} if isinstance(ops, dict) else set()


def evaluate(results: dict) -> list[Target]:
    """Every target of what the run measured or was asked to measure, in the order above; a
    target of an op the run did not finish is at best partly measured."""
    if results.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} results file (schema={results.get('schema')!r})")
    run = results.get("run") or {}
    for field_name in ("modes", "dtypes"):
        values = run.get(field_name, [])
        if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
            raise ValueError(f"the run's {field_name} are not a list of names: {values!r}")
    found = matmul_targets(results) + row_targets(results) + attention_targets(results)
    unfinished = unfinished_ops(results)
    for target in found:
        if target.name.split()[0] in unfinished and target.status == "met":
            target.status = "partly measured"
            target.detail = (target.detail + "; " if target.detail else "") + "the run stopped in this op"
    return found


# --------------------------------------------------------------------------- the README's table


def _ratio_geomean(shapes: dict, other: str) -> float | None:
    """Geomean over shapes of other's median time over ours (> 1: ours faster)."""
    return geomean(rows[other]["p50"] / rows[OURS]["p50"] for rows in shapes.values()
                   if _timed(rows.get(OURS)) and _timed(rows.get(other)))


def performance_rows(results: dict) -> list[list[str]]:
    """Per op, mode and dtype: shapes timed, geomean speed-up of ours over torch eager, over
    torch.compile and over SDPA flash (attention), ours over our untuned defaults, and the
    lowest and highest share of the measured ceiling."""
    rows = []
    for (op, mode, dtype), shapes in _groups(results).items():
        cells = [op, mode, dtype]
        timed = sum(_timed(r.get(OURS)) for r in shapes.values())
        cells.append(f"{timed}/{len(shapes)}")
        for other in ("torch", "torch.compile", "sdpa-flash", "tritonops-default"):
            gm = _ratio_geomean(shapes, other)
            cells.append(f"{gm:.2f}x" if gm else "-")
        pcts = [r[OURS]["pct_of_ceiling"] for r in shapes.values()
                if _timed(r.get(OURS)) and finite_number(r[OURS].get("pct_of_ceiling"))]
        cells.append(f"{min(pcts):.0f}-{max(pcts):.0f}%" if pcts else "-")
        errs = [r[OURS]["rel_err_vs_torch"] for r in shapes.values()
                if finite_number((r.get(OURS) or {}).get("rel_err_vs_torch"))]
        cells.append(f"{max(errs):.1e}" if errs else "-")
        rows.append(cells)
    return rows


PERFORMANCE_HEADER = ["op", "mode", "dtype", "shapes timed", "vs torch", "vs torch.compile", "vs SDPA flash",
                      "tuned vs default", "% of ceiling", "max rel. err vs torch"]


def targets_markdown(targets: list[Target]) -> list[str]:
    rows = [[t.name, t.status, t.value, t.detail + (f"; misses at {', '.join(t.failing[:4])}"
                                                    + (" ..." if len(t.failing) > 4 else "") if t.failing else "")]
            for t in targets]
    return md_table(["target", "status", "value", "where"], rows)


def ceilings_line(results: dict) -> str:
    c = results.get("ceilings") or {}
    mm = c.get("matmul_tflops") or {}
    copy = c.get("copy_GBps")
    parts = [f"copy {copy:.0f} GB/s" if finite_number(copy) else "copy not measured"]
    parts += [f"torch.matmul 8192^3 {k} {v:.0f} TFLOP/s" for k, v in mm.items() if finite_number(v)]
    return ", ".join(parts)


def device_line(results: dict) -> str:
    d, run = results.get("device") or {}, results.get("run") or {}
    return (f"{d.get('name')} (cc {d.get('capability')}, {d.get('sm_count')} SMs, driver {d.get('driver')}), "
            f"torch {d.get('torch')}, Triton {d.get('triton')}, CUDA {d.get('cuda')}, Python {d.get('python')}; "
            f"preset {run.get('preset')}, {run.get('date') or d.get('date')}")


def summary_markdown(results: dict) -> list[str]:
    """The targets and the ratio table, with the device and the ceilings they were measured against."""
    md = [] if (results.get("device") or {}).get("gpu") else [f"> **{NOT_PERF}**", ""]
    run = results.get("run") or {}
    if run.get("aborted") or run.get("complete") is False:
        md += [f"> **The run did not complete** ({run.get('aborted') or 'stopped before its end'}): "
               "what it did not measure is listed as not measured.", ""]
    md += [f"Measured on {device_line(results)}.", "", f"Ceilings measured in the same run: {ceilings_line(results)}.",
          "", "Ratios are geometric means over the shapes of the other provider's median time over ours "
          "(> 1: ours faster); ours is the tuned provider. % of ceiling: the lowest and highest over the shapes "
          "(TFLOP/s against torch.matmul's 8192^3 rate, GB/s against the copy bandwidth).", ""]
    md += md_table(PERFORMANCE_HEADER, performance_rows(results))
    md += ["Targets:", ""] + targets_markdown(evaluate(results))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m perf.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results JSON file from perf.bench")
    args = p.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text())
        lines = summary_markdown(results)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # a file that is not a results file
        print(f"perf.targets: {args.results}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
