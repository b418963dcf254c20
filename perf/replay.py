"""Replay the tuner's search strategies on a timing table (config x key -> ms).

    python perf/replay.py [--table TABLE.json] [--out replay.json]    # replay (synthetic table if none)
    python perf/replay.py --measure --shapes 4096x4096x4096,1x4096x11008 --dtype float16 --table T.json
                                                                       # GPU: time every config

For each key and strategy it reports how many evaluations it needs to come
within 2% of the table's best, and the best-so-far curve (for report.py's
replay plot). Random sampling is averaged over seeds. Without a GPU table the
table is synthetic (a roofline-like model of the matmul space with noise), and
the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WITHIN = 0.02
RANDOM_SEEDS = 20


def synthetic_table(seed: int = 0) -> dict:
    """A plausible H100-like matmul landscape: waves of tiles, tile efficiency, pipelining, noise."""
    from tritonops.ops.matmul import MATMUL_SPACE, matmul_heuristic

    rng = random.Random(seed)
    keys = [(4096, 4096, 4096, "float16"), (16, 4096, 11008, "float16"), (1024, 14336, 4096, "bfloat16"),
            (128, 11008, 4096, "float16")]
    table = {}
    for M, N, K, dtype in keys:
        problem = {"M": M, "N": N, "K": K, "itemsize": 2}
        limits = {"max_shared_mem": 232448, "warp_size": 32}
        configs = MATMUL_SPACE.configs(problem, limits)
        default = matmul_heuristic((M, N, K, dtype))
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
            rows[c.to_json()] = ms * (1 + rng.gauss(0, 0.01))
        table[json.dumps([M, N, K, dtype])] = {"default": default.to_json(), "timings": rows}
    return {"kernel": "matmul", "synthetic": True, "device": "synthetic (model, not measured)", "keys": table}


def measure_table(shapes: list[tuple], dtype: str, budget: int | None = None) -> dict:
    """Every config of the matmul space for each shape (or a seeded random `budget` of them),
    timed on the GPU."""
    from autotune import bucket, device_properties
    from tritonops.ops.matmul import MATMUL_TUNER

    table = {}
    for M, N, K in shapes:
        key = (bucket(M), N, K, dtype, True, True, False)
        entry = MATMUL_TUNER.tune(key, strategy="random" if budget else "exhaustive", max_evals=budget,
                                  store=False)
        rows = {json.dumps(t["config"], sort_keys=True): t["timing"]["p50"] if "timing" in t else None
                for t in entry["timings"]}
        table[json.dumps(list(key))] = {"default": json.dumps(entry["default"]["config"], sort_keys=True),
                                        "timings": rows}
    return {"kernel": "matmul", "synthetic": False, "device": device_properties()["name"], "keys": table}


def replay(table: dict) -> dict:
    from autotune import Config, make_strategy
    from tritonops.ops.matmul import MATMUL_SPACE

    out = {"synthetic": table.get("synthetic", False), "device": table.get("device"), "within": WITHIN, "keys": {}}
    for key, data in table["keys"].items():
        timings = {Config.from_json(c): ms for c, ms in data["timings"].items()}
        configs = sorted(timings, key=MATMUL_SPACE.order)
        best = min(ms for ms in timings.values() if ms is not None)
        start = Config.from_json(data["default"])
        curves, needed = {}, {}
        for name in ("exhaustive", "random", "local"):
            runs = []
            for seed in range(RANDOM_SEEDS if name == "random" else 1):
                s = make_strategy(name, configs, start=start, neighbours=MATMUL_SPACE.neighbours, seed=seed)
                curve, so_far = [], math.inf
                while (c := s.ask()) is not None:
                    ms = timings.get(c)
                    s.tell(c, ms)
                    so_far = min(so_far, ms if ms is not None else math.inf)
                    curve.append(so_far)
                runs.append(curve)
            length = max(len(r) for r in runs)
            mean_curve = [sum(r[min(i, len(r) - 1)] for r in runs) / len(runs) for i in range(length)]
            hits = [next((i + 1 for i, v in enumerate(r) if v <= best * (1 + WITHIN)), None) for r in runs]
            curves[name] = mean_curve
            needed[name] = {"evaluations_to_within": (sum(h for h in hits if h) / len([h for h in hits if h])
                                                      if any(hits) else None),
                            "reached": sum(1 for h in hits if h) / len(hits),
                            "final_vs_best": min(r[-1] for r in runs) / best, "evaluations": length}
        out["keys"][key] = {"configs": len(configs), "best_ms": best, "curves": curves, "strategies": needed}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", help="timing table JSON (written with --measure, read otherwise)")
    parser.add_argument("--measure", action="store_true", help="time every config on the GPU into --table")
    parser.add_argument("--shapes", default="4096x4096x4096,16x4096x11008,1024x14336x4096")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--budget", type=int, help="with --measure: time this many configs per shape (random)")
    parser.add_argument("--out", help="replay results JSON (report.py draws its 'replay' section)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.measure:
        if not torch.cuda.is_available():
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
        print(f"{key}: {r['configs']} configs, best {r['best_ms']:.4f} ms")
        for name, s in r["strategies"].items():
            n = s["evaluations_to_within"]
            print(f"  {name:10s} within {WITHIN:.0%} of best after "
                  f"{'never' if n is None else f'{n:6.1f}'} evaluations "
                  f"(reached in {s['reached']:.0%} of runs; {s['evaluations']} evaluations in all; "
                  f"final {s['final_vs_best']:.3f}x best)")
    if args.out:
        replay_section = {f"{key}{' (synthetic)' if result['synthetic'] else ''}": r["curves"]
                          for key, r in result["keys"].items()}
        Path(args.out).write_text(json.dumps({"replay": replay_section, "replay_summary": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
