"""Benchmark tritonops against torch, torch.compile and the SDPA backends. Measures only;
perf.report draws the plots.

From the checkout root:

    python3 -m perf.bench                                # GPU: --preset quick; no GPU: --preset smoke
    python3 -m perf.bench --preset full --out perf/results/h100/results.json
    python3 -m perf.bench --ops matmul,attention --modes fwd --dtypes bfloat16 --tune-budget 20
    python3 -m perf.bench --preset quick --time-budget 200 --replay 16 --out /tmp/r.json

Providers: tritonops (tuned: every autotune.Tuner in mode "on", capped by --tune-budget
evaluations per key, tuning done by an untimed first call), tritonops-default (every Tuner
in mode "off": the heuristic configs; both set through autotune.override), torch (eager;
cuBLAS for matmul), torch.compile (compiled once per case, outside timing) and, for
attention, each SDPA backend.
A provider that fails on a case is recorded with its error; the run goes on.

Without a GPU the kernels run under Triton's CPU interpreter and the times are wall-clock
times of tiny shapes: NOT performance numbers (the results say "gpu": false).

The results file is rewritten after every op, so a run that is killed leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch  # does not import triton

from . import cases, replay  # neither imports triton: prepare_backend() comes first
from .backend import prepare_backend
from .schema import NOT_PERF, PROVIDERS, SCHEMA, SCHEMA_VERSION, shape_label, speedup_table

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- timing


class Timer:
    """p20/p50/p80 in ms: triton.testing.do_bench on a GPU (L2 flushed before each run),
    a wall clock without one."""

    def __init__(self, gpu: bool, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 5):
        self.gpu, self.warmup_ms, self.rep_ms, self.cpu_reps = gpu, warmup_ms, rep_ms, cpu_reps

    def describe(self) -> str:
        if self.gpu:
            return f"triton.testing.do_bench(warmup={self.warmup_ms} ms, rep={self.rep_ms} ms), quantiles 0.2/0.5/0.8"
        return f"wall clock, {self.cpu_reps} runs (interpreter: not a performance number)"

    def __call__(self, fn) -> tuple[float, float, float]:
        from autotune import GPUTimer, WallClockTimer

        timer = GPUTimer(self.warmup_ms, self.rep_ms) if self.gpu else WallClockTimer(self.cpu_reps)
        t = timer(fn, None, None)
        return float(t.p20), float(t.p50), float(t.p80)


def sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- device and ceilings


def device_info(gpu: bool) -> dict:
    import triton

    info = {
        "name": "cpu (Triton interpreter)", "capability": None, "sm_count": None, "memory_GiB": None,
        "driver": None, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "interpreter": not gpu, "note": None if gpu else NOT_PERF,
    }
    if gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_GiB=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - provenance only
            info["driver"] = "unknown"
    return info


def measure_ceilings(gpu: bool, timer: Timer, preset: str) -> dict:
    """Copy bandwidth (bytes read + written) and dense fp16/bf16 torch.matmul TFLOP/s."""
    if not gpu:
        return {"copy_GBps": None, "matmul_tflops": {}, "note": "no GPU: no ceilings"}
    out: dict = {"copy_GBps": None, "matmul_tflops": {}, "details": {}}
    nbytes = (1 << 30) if preset == "full" else (512 << 20)
    try:
        src = torch.randn(nbytes // 2, device="cuda", dtype=torch.float16)
        dst = torch.empty_like(src)
        p20, p50, p80 = timer(lambda: dst.copy_(src))
        out["copy_GBps"] = 2 * nbytes / (p50 * 1e-3) / 1e9
        out["details"]["copy"] = {"bytes": nbytes, "p20": p20, "p50": p50, "p80": p80,
                                  "how": "torch device-to-device copy_, bytes read + written"}
        del src, dst
    except Exception as e:  # noqa: BLE001
        out["details"]["copy"] = {"error": _err(e)}
    n = cases.SQUARE_8192["M"]
    for dtype in ("float16", "bfloat16"):
        try:
            dt = getattr(torch, dtype)
            a = torch.randn(n, n, device="cuda", dtype=dt)
            b = torch.randn(n, n, device="cuda", dtype=dt)
            p20, p50, p80 = timer(lambda: torch.matmul(a, b))
            out["matmul_tflops"][dtype] = 2 * n**3 / (p50 * 1e-3) / 1e12
            out["details"][f"matmul_{dtype}"] = {"M": n, "N": n, "K": n, "p20": p20, "p50": p50, "p80": p80,
                                                 "how": "torch.matmul (cuBLAS) on random data"}
            del a, b
        except Exception as e:  # noqa: BLE001
            out["details"][f"matmul_{dtype}"] = {"error": _err(e)}
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- tuners


def provider_overrides(provider: str, gpu: bool, tune_budget: int | None = None,
                       tune_seconds: float | None = None) -> dict | None:
    """The autotune.override fields every registered Tuner runs a provider under; None for
    a provider that runs no Tuner. A budget of None leaves the tuners' own."""
    if provider == "tritonops-default":
        return {"mode": "off"}
    if provider != "tritonops":
        return None
    if not gpu:
        return {}  # interpreter: tuners keep their mode (off); their memory is still forgotten
    fields = {"mode": "on", "max_evals": tune_budget, "max_seconds": tune_seconds}
    return {k: v for k, v in fields.items() if v is not None}


def tuner_selections(limit: int = 12) -> list[dict]:
    """What the tuners chose since their last reset: tuner, key, config, where it came from."""
    from autotune.registry import TUNERS

    out = []
    for name, t in TUNERS.items():
        for key, source in list(t.sources.items()):
            try:
                config = t.select(key).to_dict()  # memoised: a dict lookup
            except Exception:  # noqa: BLE001
                config = None
            out.append({"tuner": name, "key": list(key), "config": config, "source": source})
    return out[:limit]


# --------------------------------------------------------------------------- one case


class CudaContextLost(RuntimeError):
    pass


def _err(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    if len(lines) > 1 and len(text) < 200:
        text += f" ... {lines[-1]}"
    return text[:500]


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den else num


class Runner:
    def __init__(self, args, gpu: bool, timer: Timer, results: dict, out: Path | None):
        self.args, self.gpu, self.timer, self.results, self.out = args, gpu, timer, results, out
        self.device = torch.device("cuda" if gpu else "cpu")

    # ---------------------------------------------------------------- results file
    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out)

    # ---------------------------------------------------------------- providers
    def provider_context(self, provider: str):
        """Every Tuner in the provider's mode and budgets, with a fresh memory, restored after."""
        fields = provider_overrides(provider, self.gpu, self.args.tune_budget, self.args.tune_seconds)
        if fields is None:
            return contextlib.nullcontext()
        import autotune

        return autotune.override(**fields)

    def skip_reason(self, provider: str) -> str | None:
        if not self.gpu and provider == "tritonops-default" and not self.args.time_default_on_cpu:
            return "interpreter: every tuner is in mode off, so tuned == default; not timed twice"
        if not self.gpu and provider == "torch.compile" and not self.args.explicit_providers:
            return ("no GPU: torch.compile on CPU compiles C++ for minutes and says nothing about a GPU; "
                    "ask for it with --providers")
        return None

    # ---------------------------------------------------------------- a case
    def measure(self, spec, ours, shape: dict, dtype: str, mode: str, provider: str, inputs, refs: dict) -> dict:
        """One row of results: p20/p50/p80 and the metric, or an error."""
        row = {"op": spec.name, "mode": mode, "dtype": dtype, "shape": dict(shape), "provider": provider}
        if spec.params:
            row["params"] = spec.params
        reason = self.skip_reason(provider)
        if reason:
            row["skipped"] = reason
            return row
        out = fn = run = dy = leaves = None
        caught: list = []
        try:
            with self.provider_context(provider):
                with warnings.catch_warnings(record=True) as caught:  # the first call's warnings only
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    fn = spec.provider_fn(provider, shape, ours)
                    if mode == "fwd":
                        run = lambda: fn(*inputs)  # noqa: E731
                        result = run()  # compile / tune: not timed
                    else:
                        leaves = [t.detach().requires_grad_(True) for t in inputs]
                        out = fn(*leaves)
                        gen = torch.Generator(device=out.device).manual_seed(1)  # one dy for every provider
                        dy = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
                        gi = cases.grad_inputs(spec, leaves)
                        if mode == "bwd":  # the backward pass alone, over one recorded graph
                            run = lambda: torch.autograd.grad(out, gi, dy, retain_graph=True)  # noqa: E731
                        else:  # fwd_bwd: a training step's share, forward and backward
                            run = lambda: torch.autograd.grad(fn(*leaves), gi, dy)  # noqa: E731
                        result = run()
                    sync(self.gpu)
                    row["first_call_s"] = round(time.perf_counter() - t0, 3)
                    if provider.startswith("tritonops"):
                        row["configs"] = tuner_selections()
                        if not row["configs"]:
                            row["note"] = "no autotune.Tuner chose a config for this op: tuned == default"
                        elif not self.gpu:
                            row["note"] = "interpreter: tuners in mode off, tuned == default"
                        ref = self.reference(spec, shape, mode, inputs, refs, dy)
                        if ref is not None:
                            got = result if isinstance(result, (tuple, list)) else (result,)
                            row["rel_err_vs_torch"] = max(rel_err(g, r) for g, r in zip(got, ref))
                    del result
                p20, p50, p80 = self.timer(run)
            row.update(p20=p20, p50=p50, p80=p80)
            value = cases.metric_value(spec, shape, dtype, mode, p50)
            row["metric"] = {"name": spec.metric, "value": value}
        except Exception as e:  # noqa: BLE001 - a failing provider never stops the run
            row["error"] = _err(e)
            why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            if why:  # e.g. SDPA says in warnings why each backend refused the case
                row["error"] = (row["error"] + " | warnings: " + " | ".join(dict.fromkeys(why)))[:800]
            self.check_context()
        finally:
            del out, fn, run, dy, leaves
        if "error" not in row:
            why = [str(w.message).strip().splitlines()[0][:300] for w in caught if str(w.message).strip()]
            if why:
                row["warnings"] = list(dict.fromkeys(why))[:3]
        return row

    def reference(self, spec, shape, mode, inputs, refs: dict, dy=None):
        """torch eager's output (fwd) or gradients for `dy` (bwd) on the same inputs, once per case."""
        if mode not in refs:
            try:
                fn = spec.torch_fn(shape)
                if mode == "fwd":
                    refs[mode] = (fn(*inputs).detach(),)
                else:
                    leaves = [t.detach().requires_grad_(True) for t in inputs]
                    refs[mode] = tuple(torch.autograd.grad(fn(*leaves), cases.grad_inputs(spec, leaves), dy))
            except Exception:  # noqa: BLE001 - only a sanity check
                refs[mode] = None
        return refs[mode]

    def check_context(self) -> None:
        """After an error: is the CUDA context still usable? If not, nothing more can run."""
        if not self.gpu:
            return
        try:
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            raise CudaContextLost(_err(e)) from e
        gc.collect()
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- an op
    def plan(self, name: str):
        """(spec, shapes, providers) of an op in this run."""
        spec = cases.OPS[name]
        shapes = spec.shapes.get(self.args.preset, [])
        if self.args.max_shapes:
            shapes = shapes[: self.args.max_shapes]
        providers = [p for p in self.args.providers or spec.providers() if p in spec.providers()]
        return spec, shapes, providers

    def cost(self, name: str) -> float:
        if name == "<replay>":
            return self.args.replay * 1.5
        spec, shapes, providers = self.plan(name)
        return cases.cost(spec, shapes, self.args.modes,
                          [p for p in providers if self.skip_reason(p) is None]) * len(self.args.dtypes)

    def run_op(self, name: str, deadline: float | None) -> None:
        spec, shapes, providers = self.plan(name)
        info = {**cases.describe(spec), "status": "ok"}
        self.results["ops"][name] = info
        if not shapes:
            info.update(status="skipped", reason=f"no shapes in preset {self.args.preset}")
            print(f"== {name}: skipped, no shapes in preset {self.args.preset}", flush=True)
            return
        try:
            ours = spec.load()
        except Exception as e:  # noqa: BLE001 - an op being written may not import yet
            ours = None
            info.update(status="missing", reason=f"tritonops.{name} does not import: {_err(e)}")
            print(f"== {name}: SKIPPED tritonops.{name} does not import ({_err(e)}); torch providers only",
                  flush=True)
        if ours is None:
            providers = [p for p in providers if not p.startswith("tritonops")]
            if not self.args.torch_only_when_missing:
                self.write()
                return
        modes = cases.op_modes(spec, self.args.modes)
        print(f"== {name}: {len(shapes)} shapes x {modes} x {self.args.dtypes} x {providers}", flush=True)
        t_op = time.perf_counter()
        rows: list[dict] = self.results["cases"]  # appended case by case: a crash keeps what was measured
        for dtype in self.args.dtypes:
            dt = getattr(torch, dtype)
            for shape in shapes:
                torch.manual_seed(0)
                try:
                    inputs = spec.inputs(shape, dt, self.device)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory
                    for mode in modes:
                        for p in providers:
                            rows.append({"op": name, "mode": mode, "dtype": dtype, "shape": dict(shape),
                                         "provider": p, "error": f"inputs: {_err(e)}"})
                    self.check_context()
                    self.write()
                    continue
                for mode in modes:
                    refs: dict = {}
                    case_rows = []
                    for p in providers:
                        if deadline is not None and time.perf_counter() > deadline:
                            row = {"op": name, "mode": mode, "dtype": dtype, "shape": dict(shape), "provider": p,
                                   "skipped": "time budget of this op spent"}
                        else:
                            try:
                                row = self.measure(spec, ours, shape, dtype, mode, p, inputs, refs)
                            except CudaContextLost as e:  # keep this case's rows, then stop the run
                                case_rows.append({"op": name, "mode": mode, "dtype": dtype, "shape": dict(shape),
                                                  "provider": p, "error": f"CUDA context lost: {e}"})
                                self.finish_case(case_rows)
                                rows.extend(case_rows)
                                self.write()
                                raise
                        case_rows.append(row)
                        self.print_row(row)
                    self.finish_case(case_rows)
                    rows.extend(case_rows)
                del inputs
                if self.gpu:
                    torch.cuda.empty_cache()
                self.write()  # after every shape: a kill loses at most the shape in progress
        info["seconds"] = round(time.perf_counter() - t_op, 1)
        self.write()
        print(f"== {name}: {info['seconds']} s", flush=True)

    def finish_case(self, rows: list[dict]) -> None:
        """speedup_vs_torch and pct_of_ceiling for the rows of one (op, mode, dtype, shape)."""
        torch_p50 = next((r["p50"] for r in rows if r["provider"] == "torch" and "p50" in r), None)
        ceilings = self.results["ceilings"]
        for r in rows:
            if "p50" not in r:
                continue
            r["speedup_vs_torch"] = torch_p50 / r["p50"] if torch_p50 else None
            metric = r["metric"]
            ceiling = (ceilings.get("matmul_tflops", {}).get(r["dtype"]) if metric["name"] == "TFLOP/s"
                       else ceilings.get("copy_GBps"))
            r["pct_of_ceiling"] = 100.0 * metric["value"] / ceiling if ceiling else None

    def print_row(self, r: dict) -> None:
        head = f"  {r['op']:<11} {r['mode']} {r['dtype']:<8} {shape_label(r['shape']):<28} {r['provider']:<16}"
        if "error" in r:
            print(f"{head} ERROR {r['error']}", flush=True)
        elif "skipped" in r:
            print(f"{head} skipped: {r['skipped']}", flush=True)
        else:
            m = r["metric"]
            pct = f" ({r['pct_of_ceiling']:.0f}% of ceiling)" if r.get("pct_of_ceiling") else ""
            err = f" rel.err {r['rel_err_vs_torch']:.1e}" if "rel_err_vs_torch" in r else ""
            print(f"{head} p50 {r['p50']:9.4g} ms {m['value']:9.4g} {m['name']}{pct} "
                  f"[first call {r['first_call_s']:.1f} s]{err}", flush=True)


# --------------------------------------------------------------------------- replay


def measure_replay(runner: Runner, n_configs: int, shape: dict, dtype: str, deadline: float | None) -> None:
    """Time up to `n_configs` matmul configs around the default of the forward key of
    torch.matmul on `shape` (a table), then replay each search strategy over that table
    with perf.replay.replay_timings: best-so-far ms after each evaluation."""
    from tritonops.tuning.matmul import MATMUL_TUNER, matmul_call_keys

    tuner = MATMUL_TUNER
    key = matmul_call_keys(shape["M"], shape["N"], shape["K"], dtype)[0]
    default = tuner.default(key)
    allowed = set(tuner.candidates(key))
    table, frontier = [default], [default]
    while frontier and len(table) < n_configs:  # breadth-first around the default
        nxt = []
        for c in frontier:
            for nb in tuner.space.neighbours(c):
                if nb in allowed and nb not in table and len(table) < n_configs:
                    table.append(nb)
                    nxt.append(nb)
        frontier = nxt
    launch = tuner.runner(key)
    reference = launch(default)
    times: dict = {}
    errors: dict = {}
    for c in table:
        if deadline is not None and time.perf_counter() > deadline and len(times) >= 2:
            break
        try:
            out = launch(c)
            if not tuner.check(out, reference):
                times[c], errors[str(c)] = None, "wrong result"
                continue
            times[c] = runner.timer(lambda c=c: launch(c))[1]
        except Exception as e:  # noqa: BLE001 - out of resources, compile errors
            times[c], errors[str(c)] = None, _err(e)
    name = f"matmul {dtype} M{shape['M']} N{shape['N']} K{shape['K']} ({len(times)} configs near the default)"
    result = replay.replay_timings(times, default, tuner.space)
    runner.results.setdefault("replay", {})[name] = result["curves"]
    runner.results.setdefault("replay_meta", {})[name] = {
        "tuner": tuner.name, "key": list(key), "timer": runner.timer.describe(), "default": default.to_dict(),
        "table": [{"config": c.to_dict(), "ms": ms} for c, ms in times.items()], "errors": errors,
        "strategies": result["strategies"],
        "note": "the median best-so-far ms after each evaluation over the seeds, each strategy replayed "
                "over the measured table"}
    print(f"== replay: {name}: " + ", ".join(f"{s} {len(v)} evals" for s, v in result["curves"].items()),
          flush=True)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m perf.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=cases.PRESETS, default=None,
                   help="smoke (tiny, interpreter), quick (GPU, ~3 min), full (GPU, LLM shapes); "
                        "default: quick with a GPU, smoke without")
    p.add_argument("--ops", default="all", help=f"comma-separated, or all: {','.join(cases.op_names())}")
    p.add_argument("--modes", default="fwd,bwd", help="comma-separated: fwd, bwd (the backward pass alone), fwd_bwd (both in one timed call)")
    p.add_argument("--dtypes", default=None, help="default: the preset's (quick: bfloat16; full: float16,bfloat16)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of: " + ",".join(PROVIDERS))
    p.add_argument("--max-shapes", type=int, default=0, help="only the first N shapes of each op (0: all)")
    p.add_argument("--tune-budget", type=int, default=None,
                   help="max evaluations per key when tuning (tuner.max_evals); default 8 for quick, "
                        "the tuners' own for full")
    p.add_argument("--tune-seconds", type=float, default=None,
                   help="max seconds per key when tuning (tuner.max_seconds); default 6 for quick")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; each op may use up to twice its share (by cost) of what "
                        "is left; cases past its deadline are recorded as skipped")
    p.add_argument("--warmup-ms", type=int, default=None, help="do_bench warm-up (quick: 10, full: 25)")
    p.add_argument("--rep-ms", type=int, default=None, help="do_bench repetitions (quick: 40, full: 100)")
    p.add_argument("--replay", type=int, default=0, metavar="N",
                   help="time N matmul configs around the default of one key and replay the search "
                        "strategies over them (the report's replay plot); 0: off")
    p.add_argument("--replay-shape", default=None, help="MxNxK for --replay (GPU 4096x4096x4096, smoke 64x64x64)")
    p.add_argument("--cache-dir", default=None,
                   help="the tuning cache every tuner reads and writes in this run (autotune.override "
                        "cache_dir); default: $AUTOTUNE_CACHE_DIR (or its alias $TRITONOPS_CACHE_DIR)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy and matmul ceilings")
    p.add_argument("--time-default-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-only-when-missing", action="store_true",
                   help="still time the torch providers of an op whose tritonops module does not import")
    p.add_argument("--dry-run", action="store_true", help="print the plan (ops, shapes, providers) and exit")
    p.add_argument("--out", default=None, help="results JSON (default: perf/results/<gpu>/results-<preset>.json; "
                                               "without a GPU a file in the temp dir)")
    args = p.parse_args(argv)
    args.explicit_providers = args.providers is not None
    args.providers = [x.strip() for x in args.providers.split(",") if x.strip()] if args.providers else None
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in cases.MODES:
            p.error(f"--modes: {m!r} is not one of {cases.MODES}")
    args.ops = cases.op_names() if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in args.ops:
        if o not in cases.OPS:
            p.error(f"--ops: unknown op {o!r}; known: {','.join(cases.op_names())}")
    return args


def main(argv=None) -> int:
    gpu = prepare_backend()
    args = parse_args(argv)

    warnings.filterwarnings("once")
    if args.preset is None:
        args.preset = "quick" if gpu else "smoke"
    quick = args.preset in ("quick", "smoke")
    args.dtypes = ([d.strip() for d in args.dtypes.split(",")] if args.dtypes else list(cases.PRESET_DTYPES[args.preset]))
    if args.tune_budget is None and quick:
        args.tune_budget = 8
    if args.tune_seconds is None and quick:
        args.tune_seconds = 6.0
    timer = Timer(gpu, warmup_ms=args.warmup_ms or (10 if quick else 25), rep_ms=args.rep_ms or (40 if quick else 100))

    if not gpu:
        print("!" * 100 + f"\n!! {NOT_PERF}\n" + "!" * 100, flush=True)
        if args.preset != "smoke":
            print(f"!! preset {args.preset} under the interpreter: this will be very slow", flush=True)

    import triton  # noqa: F401 - after prepare_backend chose the interpreter
    import tritonops  # noqa: F401 - registers the matmul tuners

    if args.dry_run:
        return dry_run(args, gpu)
    with tuning_cache(args.cache_dir) as cache_dir:
        return run(args, gpu, timer, cache_dir, sys.argv[1:] if argv is None else list(argv))


@contextlib.contextmanager
def tuning_cache(path: str | None):
    """Every registered Tuner reads and writes its tuned configs under `path` (None: where
    autotune's settings say); yields that directory, for the results."""
    from autotune import CacheDir, override

    if path is None:
        yield str(CacheDir().root)
        return
    root = Path(path).resolve()
    with override(cache_dir=root):
        yield str(root)


def _attention_exact_delta() -> bool | str:
    """The attention backward's delta mode ($TRITONOPS_ATTENTION_EXACT_DELTA): it changes the
    backward's work, so every result records it."""
    try:
        from tritonops.ops.attention import exact_delta_enabled

        return exact_delta_enabled()
    except Exception as e:  # noqa: BLE001 - a result without the op still records why
        return f"unknown ({type(e).__name__}: {e})"


def run(args, gpu: bool, timer: Timer, cache_dir: str, argv: list) -> int:
    """Measure what `args` asks for into the results file; the rest of main."""
    info = device_info(gpu)
    if args.out:
        out = Path(args.out)
    elif gpu:
        from autotune.device import device_slug

        out = HERE / "results" / device_slug(info["name"]) / f"results-{args.preset}.json"
    else:  # interpreter numbers do not belong in the repository
        out = Path(tempfile.gettempdir()) / "tritonops-bench-smoke.json"
    t_start = time.perf_counter()
    results = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device": info,
        "run": {"preset": args.preset, "ops": args.ops, "modes": args.modes, "dtypes": args.dtypes,
                "providers": args.providers or "per op", "tune_budget": args.tune_budget,
                "tune_seconds": args.tune_seconds, "time_budget_s": args.time_budget, "timer": timer.describe(),
                "argv": argv, "complete": False, "started": info["date"], "cache_dir": cache_dir,
                "attention_exact_delta": _attention_exact_delta()},
        "ceilings": {}, "ops": {}, "cases": [],
    }
    runner = Runner(args, gpu, timer, results, out)
    runner.write()
    print(f"device: {info['name']} (cc {info['capability']}, driver {info['driver']}), torch {info['torch']}, "
          f"triton {info['triton']}, cuda {info['cuda']}; preset {args.preset}; timer: {timer.describe()}", flush=True)

    deadline_all = t_start + args.time_budget if args.time_budget else None
    try:
        if not args.no_ceilings:
            results["ceilings"] = measure_ceilings(gpu, timer, args.preset)
            c = results["ceilings"]
            if gpu:
                print(f"ceilings: copy {c.get('copy_GBps') or float('nan'):.0f} GB/s, matmul "
                      + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in c["matmul_tflops"].items()), flush=True)
            runner.write()
        units = list(args.ops) + (["<replay>"] if args.replay else [])
        costs = [runner.cost(u) for u in units]
        for i, name in enumerate(units):
            deadline = None
            if deadline_all is not None:
                # an op may use up to twice its share (by cost) of the time left, never more than all of it
                now = time.perf_counter()
                left = max(0.0, deadline_all - now)
                share = costs[i] / max(1e-9, sum(costs[i:]))
                deadline = now + left * min(1.0, 2.0 * share)
            if name == "<replay>":
                rs = args.replay_shape or ("4096x4096x4096" if gpu else "64x64x64")
                M, N, K = (int(v) for v in rs.lower().split("x"))
                try:
                    measure_replay(runner, args.replay, {"M": M, "N": N, "K": K}, args.dtypes[0], deadline)
                except CudaContextLost:
                    raise
                except Exception as e:  # noqa: BLE001
                    results["replay_error"] = _err(e)
                    print(f"== replay: ERROR {_err(e)}", flush=True)
                    runner.check_context()
                runner.write()
            else:
                runner.run_op(name, deadline)
    except CudaContextLost as e:
        results["run"]["aborted"] = f"the CUDA context was lost; nothing after this could run: {e}"
        print(f"!! ABORTED: {results['run']['aborted']}", flush=True)
    results["run"]["complete"] = "aborted" not in results["run"]
    results["run"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["run"]["seconds"] = round(time.perf_counter() - t_start, 1)
    runner.write()
    summary(results)
    if not gpu:
        print("!" * 100 + f"\n!! {NOT_PERF}\n" + "!" * 100, flush=True)
    print(f"results: {out} ({results['run']['seconds']} s)", flush=True)
    return 0


def dry_run(args, gpu: bool) -> int:
    runner = Runner(args, gpu, Timer(gpu), {"ceilings": {}, "ops": {}, "cases": []}, None)
    total = 0
    for name in args.ops:
        spec, shapes, providers = runner.plan(name)
        n = len(shapes) * len(cases.op_modes(spec, args.modes)) * len(providers) * len(args.dtypes)
        total += n
        print(f"{name}: {n} cases, cost {runner.cost(name):.0f}; providers {providers}")
        for shape in shapes:
            print(f"    {' '.join(f'{k}={v}' for k, v in shape.items())}")
    print(f"preset {args.preset}, dtypes {args.dtypes}, modes {args.modes}: {total} cases"
          + (f" + replay of {args.replay} configs" if args.replay else ""))
    return 0


def summary(results: dict) -> None:
    """Geometric-mean speed-up over torch per (op, mode, dtype) and provider; errors counted."""
    speed = speedup_table((r["provider"], r) for r in results["cases"])
    errors: dict = {}
    skipped: dict = {}
    for r in results["cases"]:
        case = (r["op"], r["mode"], r["dtype"], r["provider"])
        errors[case] = errors.get(case, 0) + ("error" in r)
        skipped[case] = skipped.get(case, 0) + ("skipped" in r)
    print("\nspeed-up vs torch (geometric mean over shapes; e = errors, s = skipped)")
    for (op, mode, dtype), provs in speed.items():
        cells = []
        for p, gm in provs.items():
            ne, ns = errors[(op, mode, dtype, p)], skipped[(op, mode, dtype, p)]
            cell = f"{p} {gm:.2f}x" if gm else f"{p} -"
            cells.append(cell + (f" {ne}e" if ne else "") + (f" {ns}s" if ns else ""))
        print(f"  {op:<11} {mode} {dtype:<8} " + " | ".join(cells))
    for name, info in results["ops"].items():
        if info.get("status") != "ok":
            print(f"  {name}: {info.get('status')}: {info.get('reason')}")


if __name__ == "__main__":
    sys.exit(main())
