"""How long `Tuner.select(key)` takes for a key already seen (the per-call cost of tuning).

    python3 -m perf.bench_lookup [--calls 1000000] [--out lookup.json]

The target is at most 5 µs per lookup. It needs no GPU: the lookup is the
same dict access everywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit
from pathlib import Path

from .backend import prepare_backend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m perf.bench_lookup", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    prepare_backend()
    import torch

    from tritonops.tuning.matmul import MATMUL_TUNER, matmul_key

    a = torch.empty(1, 4096, 4096, dtype=torch.float16)  # the launcher's (B, M, K) and (B, K, N)
    b = torch.empty(1, 4096, 4096, dtype=torch.float16)
    # mode off: the first select takes the heuristic default instead of tuning a 4096^3 matmul on a GPU
    with MATMUL_TUNER.override(mode="off"):
        key = matmul_key(a, b, False)
        MATMUL_TUNER.select(key)  # first call: the slow path
        select_s = min(timeit.repeat(lambda: MATMUL_TUNER.select(key), number=args.calls, repeat=5)) / args.calls
        key_s = min(timeit.repeat(lambda: matmul_key(a, b, False), number=args.calls // 10,
                                  repeat=5)) / (args.calls // 10)
    result = {"select_us": select_s * 1e6, "key_and_select_us": (select_s + key_s) * 1e6, "target_us": 5.0,
              "python": platform.python_version(), "machine": platform.machine(), "calls": args.calls}
    print(f"Tuner.select (seen key): {result['select_us']:.3f} µs; building the key + select: "
          f"{result['key_and_select_us']:.3f} µs (target <= 5 µs)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["key_and_select_us"] <= 5.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
