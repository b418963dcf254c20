"""Plots and a markdown report from perf.bench results. Never measures, never imports torch.

    python3 -m perf.report results.json [more.json ...] -o DIR

Writes into DIR:
    <op>_<mode>_<dtype>.png   metric (TFLOP/s or GB/s) against size, log x, one line per
                              provider (per device when several files), dashed ceiling line;
                              one panel per value of the op's fixed dims (e.g. N, K).
    speedup.png               geometric-mean speed-up over torch per op, mode and dtype.
    replay.png                autotuner replay: best-so-far ms against evaluations per
                              strategy (only when a results file has a "replay" section).
    report.md                 the tables and the images.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .schema import BASE_PROVIDERS, PROVIDERS, SCHEMA, SCHEMA_VERSION, md_table, speedup_table  # noqa: E402

UNITS = {"M": "M (rows of A)", "cols": "columns (elements per row)", "L": "sequence length L = S"}


# --------------------------------------------------------------------------- loading


def load(paths) -> list[dict]:
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if data.get("schema") != SCHEMA:
            if "replay" not in data:
                raise SystemExit(f"{p}: neither a {SCHEMA} results file (schema={data.get('schema')!r}) "
                                 "nor a replay file")
            # a replay-only file (perf.replay --out): its curves, nothing else
            summary = data.get("replay_summary") or {}
            device = summary.get("device") or "unknown device"
            data = {"replay": data["replay"], "cases": [], "ops": {}, "ceilings": {}, "_replay_only": True,
                    "_replay_summary": summary,
                    "device": {"name": f"replay table ({'synthetic' if summary.get('synthetic') else device})",
                               "gpu": None}}
        if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
            print(f"warning: {p} has schema_version {data['schema_version']}, this report knows {SCHEMA_VERSION}",
                  file=sys.stderr)
        data["_path"] = str(p)
        runs.append(data)
    # files of one device share its label (a full run split by op merges into one set of lines),
    # unless they measured the same cases: then the file tells them apart
    keys = [{(c["op"], c["mode"], c["dtype"], c["provider"], json.dumps(c["shape"], sort_keys=True))
             for c in r.get("cases", [])} for r in runs]
    for i, r in enumerate(runs):
        lab = device_label(r)
        clash = any(device_label(o) == lab and keys[i] & keys[j] for j, o in enumerate(runs) if j != i)
        r["_label"] = f"{lab} [{Path(r['_path']).parent.name}/{Path(r['_path']).name}]" if clash else lab
    return runs


def device_label(run: dict) -> str:
    d = run.get("device", {})
    if run.get("_replay_only"):
        return str(d.get("name"))
    return d.get("name", "?") if d.get("gpu") else "interpreter (not perf)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def fmt_size(v) -> str:
    if isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}k"
    return str(v)


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def op_meta(runs, op) -> dict:
    for r in runs:
        if op in r.get("ops", {}):
            return r["ops"][op]
    return {}


def ceiling_of(run: dict, metric: str, dtype: str):
    c = run.get("ceilings") or {}
    if metric == "TFLOP/s":
        return (c.get("matmul_tflops") or {}).get(dtype)
    return c.get("copy_GBps")


def all_rows(runs):
    for r in runs:
        for row in r.get("cases", []):
            yield r, row


def group_key(shape: dict, group: list) -> tuple:
    return tuple((g, shape.get(g)) for g in group)


def x_dim(meta: dict, rows) -> str:
    if meta.get("x"):
        return meta["x"]
    return next(iter(rows[0]["shape"]))  # an op the report does not know: its first dim


def has_gpu_run(runs) -> bool:
    bench_runs = [r for r in runs if not r.get("_replay_only")]
    return not bench_runs or any(r.get("device", {}).get("gpu") for r in bench_runs)


# --------------------------------------------------------------------------- plots

STYLES = ["o-", "s-", "^-", "D-", "v-", "P-", "X-", "*-", "h-", "<-", ">-"]


def plot_op(runs, op, mode, dtype, rows, out: Path) -> Path:
    meta = op_meta(runs, op)
    metric = meta.get("metric") or next((r["metric"]["name"] for _, r in rows if "metric" in r), "")
    x = x_dim(meta, [r for _, r in rows])
    group = meta.get("group") or []
    groups = sorted({group_key(r["shape"], group) for _, r in rows}, key=lambda g: tuple(str(v) for _, v in g))
    fig, axes = _panels(len(groups))
    series_names = sorted({(run["_label"], r["provider"]) for run, r in rows},
                          key=lambda t: (t[0], _provider_order(t[1])))
    multi = len({lab for lab, _ in series_names}) > 1
    # colour by provider (the same in every plot), marker and line style by device
    labels = list(dict.fromkeys(lab for lab, _ in series_names))
    providers = sorted({prov for _, prov in series_names}, key=_provider_order)
    colour = {p: provider_colour(p) for p in providers}
    marker = {lab: "os^Dv"[i % 5] for i, lab in enumerate(labels)}
    line = {lab: ["-", "-.", ":"][i % 3] for i, lab in enumerate(labels)}
    for ax, g in zip(axes, groups):
        xs_all = set()
        for lab, prov in series_names:
            pts = sorted((r["shape"][x], r["metric"]["value"]) for run, r in rows
                         if run["_label"] == lab and r["provider"] == prov and "metric" in r
                         and group_key(r["shape"], group) == g and x in r["shape"])
            if not pts:
                continue
            xs_all.update(p[0] for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker[lab], ls=line[lab],
                    color=colour[prov], ms=4, lw=1.4, label=f"{prov} @ {lab}" if multi else prov)
        for i, run in enumerate(r for r in runs if any(rr is r for rr, _ in rows)):
            c = ceiling_of(run, metric, dtype)
            if c:
                ax.axhline(c, ls="--", lw=1, color=str(0.2 + 0.25 * (i % 3)),
                           label=f"ceiling {fmt_num(c)} {metric}" + (f" @ {run['_label']}" if multi else ""))
        ax.set_xscale("log", base=2)
        if xs_all:
            ticks = sorted(xs_all)
            ax.set_xticks(ticks)
            ax.set_xticklabels([fmt_size(t) for t in ticks], rotation=45 if len(ticks) > 6 else 0)
            ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel(UNITS.get(x, x))
        ax.set_ylabel(f"{metric} (higher is better)")
        ax.set_title(", ".join(f"{k}={fmt_size(v)}" for k, v in g) or op, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    devices = ", ".join(dict.fromkeys(run["_label"] for run in runs if any(rr is run for rr, _ in rows)))
    fig.suptitle(f"{op} {mode}, {dtype} on {devices}", fontsize=12)
    return _save(fig, runs, out / f"{slug(op)}_{mode}_{dtype}.png")


def provider_colour(p: str) -> str:
    """The same colour for a provider in every plot."""
    if p in PROVIDERS:
        return f"C{PROVIDERS.index(p)}"
    return f"C{8 + sum(map(ord, p)) % 2}"


def _provider_order(p: str) -> tuple:
    return (BASE_PROVIDERS.index(p) if p in BASE_PROVIDERS else len(BASE_PROVIDERS), p)


def _panels(n: int):
    """A figure of `n` panels, two a row, and those panels (the grid's spare cells blank)."""
    n = max(1, n)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def _save(fig, runs, path: Path) -> Path:
    """The figure as a PNG, stamped as no performance numbers when no run had a GPU."""
    if not has_gpu_run(runs):
        fig.text(0.5, 0.5, "NO GPU: interpreter wall-clock times\nNOT performance numbers", ha="center",
                 va="center", fontsize=20, color="red", alpha=0.25, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedups(runs) -> dict:
    """(op, mode, dtype) -> {series: geomean speed-up over torch}, only the series that have one."""
    multi = len({run["_label"] for run in runs}) > 1
    table = speedup_table((f"{r['provider']} @ {run['_label']}" if multi else r["provider"], r)
                          for run, r in all_rows(runs))
    table = {k: {s: v for s, v in d.items() if v is not None} for k, d in table.items()}
    return {k: d for k, d in table.items() if d}


def plot_speedup(runs, table: dict, out: Path) -> Path | None:
    if not table:
        return None
    cats = list(table)
    series = sorted({s for d in table.values() for s in d}, key=lambda s: _provider_order(s.split(" @ ")[0]))
    colors = {s: provider_colour(s.split(" @ ")[0]) for s in series}
    # each category gets one bar per series it has (compact), colours fixed per series
    y, centers, bars = 0.0, [], []
    for c in cats:
        present = [s for s in series if table[c].get(s)]
        ys = [y + k for k in range(len(present))]
        bars += [(yy, table[c][s], s) for yy, s in zip(ys, present)]
        centers.append(y + (len(present) - 1) / 2 if present else y)
        y += max(1, len(present)) + 0.8
    devices = list(dict.fromkeys(s.split(" @ ")[1] for s in series if " @ " in s))
    hatch = {s: ["", "//", "..", "xx"][devices.index(s.split(" @ ")[1]) % 4] if " @ " in s else "" for s in series}
    fig, ax = plt.subplots(figsize=(9, 0.22 * y + 1.6))
    for s in series:
        pts = [(yy, v) for yy, v, ss in bars if ss == s]
        ax.barh([p[0] for p in pts], [p[1] for p in pts], height=0.85, color=colors[s], hatch=hatch[s],
                edgecolor="white" if hatch[s] else None, label=s)
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.set_yticks(centers)
    ax.set_yticklabels([f"{op} {mode} {dtype}" for op, mode, dtype in cats], fontsize=8)
    ax.invert_yaxis()
    positive = [v for d in table.values() for v in d.values() if v]
    if positive and (max(positive) / min(positive) > 20):
        ax.set_xscale("log")
    ax.set_xlabel("speed-up over torch eager (geometric mean over shapes; > 1 is faster)")
    ax.set_title("speed-up over torch on " + ", ".join(dict.fromkeys(r["_label"] for r in runs)), fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, runs, out / "speedup.png")


def plot_replay(runs, out: Path) -> Path | None:
    tables = [(run, name, curves) for run in runs for name, curves in (run.get("replay") or {}).items()]
    if not tables:
        return None
    fig, axes = _panels(len(tables))
    for ax, (run, name, curves) in zip(axes, tables):
        best_all, longest = None, 0
        for i, (strategy, curve) in enumerate(curves.items()):
            pts = [(k + 1, v) for k, v in enumerate(curve) if isinstance(v, (int, float))]
            if not pts:
                continue
            best_all = min(best_all, pts[-1][1]) if best_all is not None else pts[-1][1]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], drawstyle="steps-post", lw=1.4,
                    marker=STYLES[i % len(STYLES)][0] if len(pts) <= 40 else None, ms=3,
                    label=f"{strategy} ({len(curve)} evals)")
            longest = max(longest, len(pts))
        if best_all is not None:
            ax.axhline(best_all, ls="--", lw=1, color="0.35", label=f"best found {best_all:.4g} ms")
        if longest > 50:  # a long exhaustive curve beside a short local search: log x shows both
            ax.set_xscale("log")
        ax.set_xlabel("evaluations (configs timed)" + (", log scale" if longest > 50 else ""))
        ax.set_ylabel("best time so far (ms, lower is better)")
        ax.set_title(name + ("" if len({r["_label"] for r in runs}) == 1 else f" @ {run['_label']}"), fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("autotuner replay: search strategies over a measured table", fontsize=12)
    return _save(fig, runs, out / "replay.png")


# --------------------------------------------------------------------------- markdown


def write_markdown(runs, figures: dict, speed: dict, speed_png, replay_png, out: Path) -> Path:
    md = ["# tritonops benchmark report", ""]
    if all(r.get("_replay_only") for r in runs):  # replays of timing tables only: no runs of ours to list
        return write_replay_markdown(runs, replay_png, out, md)
    if not has_gpu_run(runs):
        md += ["> **NO GPU.** Every number below is a wall-clock time of Triton's CPU interpreter on tiny "
               "shapes: these are NOT performance numbers; they only show that the runner and the report work.", ""]
    md += ["## Runs", ""]
    rows = []
    for r in runs:
        if r.get("_replay_only"):
            continue
        d, run = r.get("device", {}), r.get("run", {})
        rows.append([r["_label"], d.get("capability") or "-", d.get("driver") or "-", d.get("torch"), d.get("triton"),
                     d.get("cuda") or "-", run.get("preset"), run.get("date") or d.get("date"),
                     f"{run.get('seconds', '?')} s" + ("" if run.get("complete") else " (incomplete)"),
                     run.get("timer", "")])
    md += md_table(["device", "cc", "driver", "torch", "triton", "cuda", "preset", "date", "took", "timer"], rows)
    for r in runs:
        if r.get("run", {}).get("aborted"):
            md += [f"**{r['_label']}: run aborted**: {r['run']['aborted']}", ""]
    md += ["## Ceilings", "", "Measured in the same run: device-to-device copy (bytes read + written) and "
           "torch.matmul 8192^3 on random data.", ""]
    rows = []
    for r in (r for r in runs if not r.get("_replay_only")):
        c = r.get("ceilings") or {}
        mm = c.get("matmul_tflops") or {}
        rows.append([r["_label"], fmt_num(c.get("copy_GBps")), fmt_num(mm.get("float16")), fmt_num(mm.get("bfloat16"))])
    md += md_table(["device", "copy GB/s", "fp16 TFLOP/s", "bf16 TFLOP/s"], rows)
    status = [(r["_label"], op, i.get("status"), i.get("reason", ""), i.get("seconds", "-"))
              for r in runs for op, i in r.get("ops", {}).items()]
    md += ["## Ops", ""] + md_table(["device", "op", "status", "reason", "seconds"], status)
    if speed:
        md += ["## Speed-up over torch", "", "Geometric mean over shapes of torch's median time over the "
               "provider's (> 1: faster than torch eager).", ""]
        if speed_png:
            md += [f"![speed-up]({speed_png.name})", ""]
        series = sorted({s for d in speed.values() for s in d}, key=lambda s: _provider_order(s.split(" @ ")[0]))
        md += md_table(["op", "mode", "dtype", *series],
                       [[*k, *(f"{speed[k][s]:.3g}x" if speed[k].get(s) else "-" for s in series)] for k in speed])
    errors = []
    md += ["## Results per op", ""]
    for (op, mode, dtype), path in figures.items():
        rows = [(run, r) for run, r in all_rows(runs) if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        metric = op_meta(runs, op).get("metric") or ""
        md += [f"### {op} {mode} {dtype}", "", f"![{op} {mode} {dtype}]({path.name})", ""]
        series = sorted({(run["_label"], r["provider"]) for run, r in rows},
                        key=lambda t: (t[0], _provider_order(t[1])))
        multi = len({s[0] for s in series}) > 1
        shapes = list(dict.fromkeys(json.dumps(r["shape"]) for _, r in rows))
        table = []
        for sh in shapes:
            cells = []
            for lab, prov in series:
                r = next((r for run, r in rows if run["_label"] == lab and r["provider"] == prov
                          and json.dumps(r["shape"]) == sh), None)
                if r is None:
                    cells.append("")
                elif "metric" in r:
                    sp = r.get("speedup_vs_torch")
                    pct = r.get("pct_of_ceiling")
                    cells.append(fmt_num(r["metric"]["value"]) + (f" ({sp:.2f}x)" if sp and prov != "torch" else "")
                                 + (f" {pct:.0f}%" if pct else ""))
                elif "error" in r:
                    errors.append((op, mode, dtype, sh, prov, lab, r["error"]))
                    cells.append("error")
                else:
                    cells.append("skipped")
            table.append([", ".join(f"{k}={v}" for k, v in json.loads(sh).items()), *cells])
        md += [f"{metric}; in brackets the speed-up over torch, then the % of the ceiling.", ""]
        md += md_table(["shape", *(f"{p} @ {lab}" if multi else p for lab, p in series)], table)
    if replay_png:
        md += replay_section(runs, replay_png)
    if errors:
        md += ["## Errors", ""]
        seen = {}
        for op, mode, dtype, sh, prov, lab, err in errors:
            seen.setdefault((prov, err), []).append(f"{op} {mode} {dtype} {sh}")
        for (prov, err), where in seen.items():
            md += [f"- **{prov}** ({len(where)} cases, e.g. {where[0]}): `{err.replace('`', chr(39))}`"]
        md += [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def replay_section(runs, replay_png) -> list[str]:
    md = ["## Autotuner replay", "", "Each search strategy replayed over one measured table of configs: "
          "the median best time found after each evaluation.", "", f"![replay]({replay_png.name})", ""]
    rows = []
    for r in runs:
        summary = r.get("_replay_summary") or {}
        for table in summary.get("tables", [summary]):
            for key, result in (table.get("keys") or {}).items():
                for name, stats in result.get("strategies", {}).items():
                    within = stats.get("within") or {}
                    rows.append([key, name, *(f"{within[w]['median']:g} ({within[w]['hits']}/{stats['runs']})"
                                              + (f", p90 {within[w]['p90']:g}" if "p90" in within[w] else "")
                                              if w in within else "-" for w in ("2%", "5%"))])
    if rows:
        md += ["Distinct configs evaluated until one is within 2% / 5% of the table's best: the median over "
               "the runs (a run that never gets there counts as the budget), in brackets the runs that "
               "got there, then the 90th percentile over the runs.", ""]
        md += md_table(["table", "strategy", "within 2%", "within 5%"], rows)
    return md


def write_replay_markdown(runs, replay_png, out: Path, md: list[str]) -> Path:
    if replay_png:
        md += replay_section(runs, replay_png)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m perf.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON files from perf.bench (or perf.replay --out)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load(args.results)
    combos: dict = {}
    for run, r in all_rows(runs):
        combos.setdefault((r["op"], r["mode"], r["dtype"]), []).append((run, r))
    figures = {}
    for (op, mode, dtype), rows in combos.items():
        if any("metric" in r for _, r in rows):
            figures[(op, mode, dtype)] = plot_op(runs, op, mode, dtype, rows, out)
    speed = speedups(runs)
    speed_png = plot_speedup(runs, speed, out)
    replay_png = plot_replay(runs, out)
    md = write_markdown(runs, figures, speed, speed_png, replay_png, out)
    made = [*figures.values(), *(x for x in (speed_png, replay_png) if x), md]
    print(f"wrote {len(made)} files to {out}: " + ", ".join(p.name for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
