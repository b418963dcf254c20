"""Replay the tuner's search strategies over a timing table (config -> ms).

    python3 -m perf.replay --table perf/data/kerneltuner/RTX_3090.json.gz   # a Kernel Tuner cache
    python3 -m perf.replay [--table TABLE.json] [--out replay.json]          # ours (a synthetic one if none)
    python3 -m perf.replay --measure --shapes 4096x4096x4096,16x4096x11008 --dtype float16 --table T.json
                                                                              # GPU: time every config first

For each table and strategy it runs the strategy SEEDS times (once for strategies the
seed does not change) with a budget of BUDGET distinct configs and reports the median
number of configs evaluated until one is within 2% and within 5% of the table's best (a
run that never gets there counts as the budget), how many runs got there, and the median
best-so-far curve (perf.report's replay plot). A run stops once it is within the
tightest target; its curve holds its last value after that.

Two kinds of table:
  * a Kernel Tuner cache file (`.json` or `.json.gz`, read by autotune.kerneltuner): every
    config it holds is the space, with no heuristic default (each run starts from a config
    its seed draws); perf/data/kerneltuner has two brute-forced ones;
  * ours, {"kernel", "synthetic", "device", "keys": {key as JSON: {"default": config JSON,
    "timings": {config JSON: ms, or null where the config failed}}}} for the matmul Space,
    measured with --measure, or synthetic (a roofline-like model of the matmul space with
    noise, said so in the output) when no table is given. `python3 -m perf.bench --replay N`
    times a small table of its own and replays it with the same `replay_timings`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Mapping

from .backend import prepare_backend

WITHIN = (0.02, 0.05)
SEEDS = 30
BUDGET = 1000


# --------------------------------------------------------------------------- replay


def _median_curve(runs: list[list], length: int) -> list:
    """The median over runs of the best-so-far after each evaluation, each run held at its
    last value once it stopped; None while any run has found no working config yet."""
    out = []
    for i in range(length):
        values = [r[min(i, len(r) - 1)] if r else None for r in runs]
        out.append(None if any(v is None for v in values) else statistics.median(values))
    return out


def run_strategy(name: str, configs: list, timings: Mapping, start, space, *, seed: int, budget: int,
                 stop_at: float | None = None) -> list:
    """One run of strategy `name` over `timings`: the best-so-far ms after each evaluation
    (None before a config has worked), stopping at `budget` configs or once the best so far
    is at most `stop_at` ms."""
    from autotune import make_strategy

    s = make_strategy(name, configs, start=start, neighbours=space.neighbours, seed=seed, max_evals=budget)
    curve, so_far = [], None
    while (c := s.ask()) is not None:
        ms = timings.get(c)
        s.tell(c, ms)
        if ms is not None:
            so_far = ms if so_far is None else min(so_far, ms)
        curve.append(so_far)
        if stop_at is not None and so_far is not None and so_far <= stop_at:
            break
    return curve


def replay_timings(timings: Mapping, start, space, *, seeds: int = SEEDS, budget: int = BUDGET,
                   within: tuple = WITHIN, strategies=None) -> dict:
    """Each autotune search strategy replayed over the timings of one key.

    timings:  Config -> ms (None: the config failed), the whole of what a strategy may ask for.
    start:    the config a search starts from (the heuristic default), one of `timings`; None:
              the table has no default, and each run starts from a config its seed draws.
    space:    the Space behind the configs: its order (exhaustive) and neighbours (local, ils).
    strategies: names to replay (default: every one in autotune.STRATEGIES).

    Returns {"configs", "best_ms", "budget", "seeds", "curves": {strategy: median best-so-far
    ms after each evaluation}, "strategies": {strategy: {"runs", "within": {"2%": {"median":
    evaluations until within 2% of the best (a miss counts as `budget`), "hits": runs that got
    there, "p90" and "worst": the 90th percentile and the most of the runs' evaluations},
    "5%": ...}, "final_vs_best": the median run's best / the table's best,
    "evaluations": the longest run}}}.
    """
    from autotune import STRATEGIES

    configs = sorted(timings, key=space.order)
    ok = [ms for ms in timings.values() if ms is not None]
    best = min(ok) if ok else None
    budget = min(budget, len(configs))
    curves, stats = {}, {}
    for name in strategies or STRATEGIES:
        runs = []
        for seed in range(seeds):
            if seed and start is not None and not STRATEGIES[name].seeded:
                runs.append(runs[0])  # the same start and a strategy the seed does not change: the same run
                continue
            # without a heuristic default, each run starts from a config the seed draws, from a
            # stream of its own (the strategy's Random(seed) would otherwise draw the same bits)
            first = start if start is not None else random.Random(f"start {seed}").choice(configs)
            runs.append(run_strategy(name, configs, timings, first, space, seed=seed, budget=budget,
                                     stop_at=None if best is None else best * (1 + min(within))))
        length = max(len(r) for r in runs)
        curves[name] = _median_curve(runs, length)
        reached = {}
        for w in within:
            target = None if best is None else best * (1 + w)
            hits = [next((i + 1 for i, v in enumerate(r) if v is not None and v <= target), None)
                    if target is not None else None for r in runs]
            counts = sorted(h or budget for h in hits)
            reached[f"{w:.0%}"] = {"median": statistics.median(counts), "hits": sum(h is not None for h in hits),
                                   "p90": counts[math.ceil(0.9 * len(counts)) - 1], "worst": counts[-1]}
        finals = [r[-1] / best if r and r[-1] is not None and best else math.inf for r in runs]
        stats[name] = {"runs": len(runs), "within": reached, "final_vs_best": statistics.median(finals),
                       "evaluations": length}
    return {"configs": len(configs), "best_ms": best, "budget": budget, "seeds": seeds, "curves": curves,
            "strategies": stats}


def replay(table: dict, **kwargs) -> dict:
    """`replay_timings` for every key of a timing table: ours (matmul) or a Kernel Tuner cache's."""
    from autotune import Config
    from autotune.kerneltuner import is_cache, table_from_cache

    out = {"synthetic": table.get("synthetic", False), "device": table.get("device"), "within": list(WITHIN),
           "keys": {}}
    if is_cache(table):
        t = table_from_cache(table, table.get("_source", "<cache>"))
        out.update(device=t.device, kernel=t.kernel)
        name = f"{t.kernel} on {t.device} ({len(t.timings)} configs)"
        out["keys"][name] = replay_timings(t.timings, None, t.space, **kwargs)
        return out
    from tritonops.tuning.matmul import MATMUL_SPACE

    if not isinstance(table.get("keys"), dict):
        raise ValueError(f"{table.get('_source', 'the table')}: neither a Kernel Tuner cache nor a timing table "
                         "of ours (no 'keys')")
    for key, data in table["keys"].items():
        timings = {Config.from_json(c): ms for c, ms in data["timings"].items()}
        out["keys"][key] = replay_timings(timings, Config.from_json(data["default"]), MATMUL_SPACE, **kwargs)
    return out


def read_table(path: str | Path) -> dict:
    """A timing table file, `.json` or `.json.gz`, parsed (checked when it is replayed); a
    file that cannot be read or parsed is a ValueError naming it."""
    from autotune.kerneltuner import load_json

    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a timing table is a JSON object")
    data["_source"] = str(path)
    return data


# --------------------------------------------------------------------------- tables


def table_entry(default, timings: Mapping) -> dict:
    """One key of a timing table from its default Config and {Config: ms or None}."""
    return {"default": default.to_json(), "timings": {c.to_json(): ms for c, ms in timings.items()}}


def synthetic_table(seed: int = 0) -> dict:
    """A plausible H100-like matmul landscape: waves of tiles, tile efficiency, pipelining, noise."""
    from tritonops.tuning.matmul import MATMUL_SPACE, MATMUL_TUNER, matmul_call_keys, matmul_heuristic

    rng = random.Random(seed)
    shapes = [(4096, 4096, 4096, "float16"), (16, 4096, 11008, "float16"), (1024, 14336, 4096, "bfloat16"),
              (128, 11008, 4096, "float16")]
    limits = {"max_shared_mem": 232448, "warp_size": 32}
    table = {}
    for M, N, K, dtype in shapes:
        key = matmul_call_keys(M, N, K, dtype)[0]  # the forward of torch.matmul
        configs = MATMUL_SPACE.configs(MATMUL_TUNER.problem(key), limits)
        default = matmul_heuristic(key)
        if default not in configs:
            configs.append(default)
        rows = {}
        for c in configs:
            bm, bn, bk, split = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"]
            tiles = math.ceil(M / bm) * math.ceil(N / bn) * split
            waves = math.ceil(tiles / 132)
            # useful fraction of each tile, and how well the tile feeds the tensor cores
            waste = (M * N) / (tiles * bm * bn)
            intensity = (bm * bn) / (bm + bn) / 64.0
            pipe = {2: 0.8, 3: 0.95, 4: 1.0, 5: 0.97}[c.num_stages]
            warps = 1.0 if (bm * bn >= 128 * 128) == (c.num_warps == 8) else 0.85
            k_eff = {16: 0.7, 32: 0.85, 64: 1.0, 128: 0.95}[bk]
            eff = min(1.0, 0.35 + 0.65 * min(1.0, intensity)) * pipe * warps * k_eff * waste
            eff *= 1.08 if c["TMA"] else 1.0  # descriptor loads and a persistent grid
            ms = waves * (bm * bn * K / split * 2) / (eff * 990e12 / 132) * 1e3
            ms += 0.002 * (split > 1)  # the split-K reduction's launch
            rows[c] = ms * (1 + rng.gauss(0, 0.01))
        table[json.dumps(list(key))] = table_entry(default, rows)
    return {"kernel": "matmul", "synthetic": True, "device": "synthetic (model, not measured)", "keys": table}


def measure_table(shapes: list[tuple], dtype: str, budget: int | None = None) -> dict:
    """Every config of the matmul space for the forward key of each shape (or a seeded random
    `budget` of them), timed on the GPU by the tuner itself."""
    from autotune import Config, device_properties
    from tritonops.tuning.matmul import MATMUL_TUNER, matmul_call_keys

    table = {}
    for M, N, K in shapes:
        key = matmul_call_keys(M, N, K, dtype)[0]
        # every config timed in full: a table holds times, never an early stop's probe
        entry = MATMUL_TUNER.tune(key, strategy="random" if budget else "exhaustive", max_evals=budget,
                                  store=False, early_stop=False)
        if entry is None:
            raise RuntimeError(f"no config of matmul key {list(key)} ran")
        timings = {Config.from_dict(t["config"]): t["timing"]["p50"] if "timing" in t else None
                   for t in entry["timings"]}
        table[json.dumps(list(key))] = table_entry(Config.from_dict(entry["default"]["config"]), timings)
    return {"kernel": "matmul", "synthetic": False, "device": device_properties()["name"], "keys": table}


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m perf.replay", description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="append",
                        help="timing table (.json or .json.gz: ours, or a Kernel Tuner cache file); may be "
                             "repeated; with --measure, the file to write")
    parser.add_argument("--strategies", help="comma-separated strategies (default: all)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"runs per seeded strategy (default {SEEDS})")
    parser.add_argument("--budget", type=int, default=BUDGET,
                        help=f"distinct configs a run may evaluate (default {BUDGET})")
    parser.add_argument("--measure", action="store_true", help="time every config on the GPU into --table")
    parser.add_argument("--shapes", default="4096x4096x4096,16x4096x11008,1024x14336x4096")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--sample", type=int, help="with --measure: time this many configs per shape (random)")
    parser.add_argument("--out", help="replay results JSON (perf.report draws its 'replay' section)")
    args = parser.parse_args(argv)
    from autotune import STRATEGIES

    strategies = args.strategies.split(",") if args.strategies else None
    unknown = sorted(set(strategies or ()) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; expected some of {sorted(STRATEGIES)}")
    if args.seeds < 1 or args.budget < 1:
        parser.error("--seeds and --budget must be at least 1")
    gpu = prepare_backend()
    if args.measure:
        if not gpu:
            print("replay: --measure needs a GPU", file=sys.stderr)
            return 2
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        table = measure_table(shapes, args.dtype, args.sample)
        path = (args.table or ["matmul_timing_table.json"])[0]
        Path(path).write_text(json.dumps(table, indent=1))
        tables = [table]
    elif args.table:
        try:
            tables = [read_table(t) for t in args.table]
        except ValueError as e:
            print(f"replay: {e}", file=sys.stderr)
            return 2
    else:
        tables = [synthetic_table()]
        print("replay: no timing table given: a SYNTHETIC table (a model, not measurements)")
    results = []
    for table in tables:
        t0 = time.perf_counter()
        try:
            result = replay(table, seeds=args.seeds, budget=args.budget, strategies=strategies)
        except ValueError as e:
            print(f"replay: {e}", file=sys.stderr)
            return 2
        results.append(result)
        for key, r in result["keys"].items():
            print(format_summary(key, r) + f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        replay_section = {f"{key}{' (synthetic)' if result['synthetic'] else ''}": r["curves"]
                          for result in results for key, r in result["keys"].items()}
        summary = results[0] if len(results) == 1 else {"synthetic": any(r["synthetic"] for r in results),
                                                         "device": ", ".join(str(r["device"]) for r in results),
                                                         "tables": results}
        Path(args.out).write_text(json.dumps({"replay": replay_section, "replay_summary": summary}, indent=1))
    return 0


def format_summary(key: str, r: dict) -> str:
    """One table's replay as text: per strategy, the median evaluations to each target and the hits."""
    best = "none ran" if r["best_ms"] is None else f"{r['best_ms']:.4f} ms"
    lines = [f"{key}: {r['configs']} configs, best {best}; budget {r['budget']}, {r['seeds']} seeds "
             f"(a miss counts as the budget)"]
    for name, s in r["strategies"].items():
        parts = [f"within {w}: {v['median']:g} ({v['hits']}/{s['runs']}; p90 {v['p90']:g})"
                 for w, v in s["within"].items()]
        lines.append(f"  {name:10s} " + ", ".join(parts) + f"; final {s['final_vs_best']:.3f}x best")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
