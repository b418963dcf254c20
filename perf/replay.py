"""Replay the tuner's search strategies over a timing table (per key: config -> ms).

    python3 -m perf.replay [--table TABLE.json] [--out replay.json]    # replay (a synthetic table if none)
    python3 -m perf.replay --measure --shapes 4096x4096x4096,16x4096x11008 --dtype float16 --table T.json
                                                                        # GPU: time every config first

For each key and strategy it reports how many evaluations it needs to come
within 2% of the table's best, and the best-so-far curve (perf.report's
replay plot). Random sampling is averaged over seeds. Without a table the
table is synthetic (a roofline-like model of the matmul space with noise),
and the output says so. `python3 -m perf.bench --replay N` times a small
table of its own and replays it with the same `replay_timings`.

A table is {"kernel", "synthetic", "device", "keys": {key as JSON: {"default":
config JSON, "timings": {config JSON: ms, or null where the config failed}}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Mapping

from .backend import prepare_backend

WITHIN = 0.02
RANDOM_SEEDS = 20


# --------------------------------------------------------------------------- replay


def _mean(values: list) -> float | None:
    """The mean of the runs' best-so-far at one evaluation; None while any run has found
    no working config yet (there is no best to average)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def replay_timings(timings: Mapping, start, space, *, seeds: int = RANDOM_SEEDS, within: float = WITHIN) -> dict:
    """Each autotune search strategy replayed over the timings of one key.

    timings:  Config -> ms (None: the config failed), the whole of what a strategy may ask for.
    start:    the config a search starts from (the heuristic default), one of `timings`.
    space:    the Space behind the configs: its order (exhaustive) and neighbours (local).

    Returns {"configs", "best_ms", "curves": {strategy: best-so-far ms after each evaluation,
    None before a config has worked; random: the mean over `seeds` seeds}, "strategies":
    {strategy: evaluations to come within `within` of the best, and how often it got there}}.
    """
    from autotune import STRATEGIES, make_strategy

    configs = sorted(timings, key=space.order)
    ok = [ms for ms in timings.values() if ms is not None]
    best = min(ok) if ok else None
    curves, stats = {}, {}
    for name in STRATEGIES:
        runs = []
        for seed in range(seeds if name == "random" else 1):
            s = make_strategy(name, configs, start=start, neighbours=space.neighbours, seed=seed)
            curve, so_far = [], None
            while (c := s.ask()) is not None:
                ms = timings.get(c)
                s.tell(c, ms)
                if ms is not None:
                    so_far = ms if so_far is None else min(so_far, ms)
                curve.append(so_far)
            runs.append(curve)
        length = max(len(r) for r in runs)
        curves[name] = [_mean([r[min(i, len(r) - 1)] for r in runs]) for i in range(length)]
        target = None if best is None else best * (1 + within)
        hits = [next((i + 1 for i, v in enumerate(r) if v is not None and target is not None and v <= target), None)
                for r in runs]
        reached = [h for h in hits if h]
        finals = [r[-1] for r in runs if r and r[-1] is not None]
        stats[name] = {"evaluations_to_within": sum(reached) / len(reached) if reached else None,
                       "reached": len(reached) / len(runs),
                       "final_vs_best": min(finals) / best if finals else None, "evaluations": length}
    return {"configs": len(configs), "best_ms": best, "curves": curves, "strategies": stats}


def replay(table: dict) -> dict:
    """`replay_timings` for every key of a matmul timing table."""
    from autotune import Config
    from tritonops.tuning.matmul import MATMUL_SPACE

    out = {"synthetic": table.get("synthetic", False), "device": table.get("device"), "within": WITHIN, "keys": {}}
    for key, data in table["keys"].items():
        timings = {Config.from_json(c): ms for c, ms in data["timings"].items()}
        out["keys"][key] = replay_timings(timings, Config.from_json(data["default"]), MATMUL_SPACE)
    return out


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
            bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
            tiles = math.ceil(M / bm) * math.ceil(N / bn)
            waves = math.ceil(tiles / 132)
            # useful fraction of each tile, and how well the tile feeds the tensor cores
            waste = (M * N) / (tiles * bm * bn)
            intensity = (bm * bn) / (bm + bn) / 64.0
            pipe = {2: 0.8, 3: 0.95, 4: 1.0, 5: 0.97}[c.num_stages]
            warps = 1.0 if (bm * bn >= 128 * 128) == (c.num_warps == 8) else 0.85
            k_eff = {16: 0.7, 32: 0.85, 64: 1.0, 128: 0.95}[bk]
            eff = min(1.0, 0.35 + 0.65 * min(1.0, intensity)) * pipe * warps * k_eff * waste
            ms = waves * (bm * bn * K * 2) / (eff * 990e12 / 132) * 1e3
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
        entry = MATMUL_TUNER.tune(key, strategy="random" if budget else "exhaustive", max_evals=budget,
                                  store=False)
        if entry is None:
            raise RuntimeError(f"no config of matmul key {list(key)} ran")
        timings = {Config.from_dict(t["config"]): t["timing"]["p50"] if "timing" in t else None
                   for t in entry["timings"]}
        table[json.dumps(list(key))] = table_entry(Config.from_dict(entry["default"]["config"]), timings)
    return {"kernel": "matmul", "synthetic": False, "device": device_properties()["name"], "keys": table}


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m perf.replay", description=__doc__.splitlines()[0])
    parser.add_argument("--table", help="timing table JSON (written with --measure, read otherwise)")
    parser.add_argument("--measure", action="store_true", help="time every config on the GPU into --table")
    parser.add_argument("--shapes", default="4096x4096x4096,16x4096x11008,1024x14336x4096")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--budget", type=int, help="with --measure: time this many configs per shape (random)")
    parser.add_argument("--out", help="replay results JSON (perf.report draws its 'replay' section)")
    args = parser.parse_args(argv)
    gpu = prepare_backend()
    if args.measure:
        if not gpu:
            print("replay: --measure needs a GPU", file=sys.stderr)
            return 2
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        table = measure_table(shapes, args.dtype, args.budget)
        Path(args.table or "matmul_timing_table.json").write_text(json.dumps(table, indent=1))
    elif args.table:
        table = json.loads(Path(args.table).read_text())
    else:
        table = synthetic_table()
        print("replay: no timing table given: a SYNTHETIC table (a model, not measurements)")
    result = replay(table)
    for key, r in result["keys"].items():
        best = "none ran" if r["best_ms"] is None else f"{r['best_ms']:.4f} ms"
        print(f"{key}: {r['configs']} configs, best {best}")
        for name, s in r["strategies"].items():
            n, final = s["evaluations_to_within"], s["final_vs_best"]
            print(f"  {name:10s} within {WITHIN:.0%} of best after "
                  f"{'never' if n is None else f'{n:6.1f}'} evaluations "
                  f"(reached in {s['reached']:.0%} of runs; {s['evaluations']} evaluations in all; "
                  f"final {'-' if final is None else f'{final:.3f}'}x best)")
    if args.out:
        replay_section = {f"{key}{' (synthetic)' if result['synthetic'] else ''}": r["curves"]
                          for key, r in result["keys"].items()}
        Path(args.out).write_text(json.dumps({"replay": replay_section, "replay_summary": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
