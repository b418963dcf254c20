"""Seconds to compile N matmul candidates for Hopper (sm90), one after another and through
autotune's compile pool (autotune/precompile.py). No GPU needed; never runs a kernel.

From the checkout root:

    python3 -m perf.compile_bench [--n 16] [--workers W] [--dtype bfloat16] [--out FILE.json]

The candidates are configs of tritonops.tuning.matmul.MATMUL_SPACE for the forward key of a
4096 x 4096 x 4096 matmul (a seeded random sample of N of them, within an H100's limits), and
the jobs are those the tuner would submit: each config's launch through the real launcher,
captured, specialised by Triton's binder. Both runs compile every job into a fresh, empty
TRITON_CACHE_DIR, so nothing is cached:

  serial   one job after another in this process, after one untimed compile (into another
           directory) that pays this process's one-time compiler start-up;
  pooled   the same jobs through a CompilePool of W workers, started and warmed beforehand
           (each worker compiles one job into a throwaway directory): compile throughput, as a
           tuner sees it once its pool runs. The pool's start-up is reported on its own.

Prints a table and, with --out, writes the numbers and the machine's facts as JSON. The
default W is every CPU this process may use (the tuner's own default leaves one for timing).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted: read when triton loads
os.environ["AUTOTUNE_MODE"] = "off"  # the launcher is given each config: no tuner runs meanwhile

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

TARGET_ARGS = ("cuda", 90, 32)  # Hopper, as Triton names it: GPUTarget(backend, arch, warp size)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def into(job, cache_dir: str):
    """The job, compiled into `cache_dir`."""
    return dataclasses.replace(job, env={**job.env, "TRITON_CACHE_DIR": cache_dir})


def matmul_jobs(n: int, dtype: str, target, seed: int = 0):
    """(key, configs, jobs): the jobs of N sampled matmul configs of the 4096^3 forward key."""
    from autotune import precompile
    from tritonops import runtime
    from tritonops.tuning.matmul import MATMUL_TUNER, matmul_call_keys

    runtime.POISON = False  # outputs need no NaN fill: nothing runs
    key = matmul_call_keys(4096, 4096, 4096, dtype)[0]
    configs = MATMUL_TUNER.candidates(key)  # within the stand-in (H100) limits without a GPU
    configs = random.Random(seed).sample(configs, min(n, len(configs)))
    launch = MATMUL_TUNER.runner(key)
    jobs, skipped = [], []
    for config in configs:
        found = precompile.launch_jobs(lambda c=config: launch(c), target)
        jobs += found.jobs
        skipped += found.skipped
    if skipped:
        raise RuntimeError(f"launches that cannot be precompiled: {skipped}")
    return key, configs, jobs


def run_serial(jobs, root: str) -> tuple[float, list]:
    from autotune import precompile

    precompile.run_job(into(jobs[0], tempfile.mkdtemp(prefix="warm-", dir=root)))  # compiler start-up
    cache = tempfile.mkdtemp(prefix="serial-", dir=root)
    t0 = time.perf_counter()
    results = [precompile.run_job(into(job, cache)) for job in jobs]
    return time.perf_counter() - t0, results


def run_pooled(jobs, workers: int, target, root: str) -> tuple[float, float, list]:
    from autotune import precompile

    t0 = time.perf_counter()
    with precompile.CompilePool(workers, target) as pool:
        pool.start()
        warm = [pool.submit(into(jobs[i % len(jobs)], tempfile.mkdtemp(prefix="warm-", dir=root)))
                for i in range(workers)]
        concurrent.futures.wait(warm)
        start_seconds = time.perf_counter() - t0
        cache = tempfile.mkdtemp(prefix="pooled-", dir=root)
        t1 = time.perf_counter()
        futures = [pool.submit(into(job, cache)) for job in jobs]
        results = [f.result() for f in futures]
        seconds = time.perf_counter() - t1
    return seconds, start_seconds, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="matmul configs to compile (default 16)")
    ap.add_argument("--workers", type=int, default=None, help="pool workers (default: every usable CPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    workers = args.workers or usable_cpus()

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # 3.9's notice, once per process
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    load_before = _load()
    target = GPUTarget(*TARGET_ARGS)
    key, configs, jobs = matmul_jobs(args.n, args.dtype, target)
    with tempfile.TemporaryDirectory(prefix="compile-bench-") as root:
        serial, serial_results = run_serial(jobs, root)
        pooled, start, pooled_results = run_pooled(jobs, workers, target, root)

    failed = [r for r in serial_results + pooled_results if not r.ok]
    same = [a.hash for a in serial_results] == [b.hash for b in pooled_results]
    report = {
        "benchmark": "compile_bench",
        "target": f"{TARGET_ARGS[0]} sm{TARGET_ARGS[1]}",
        "key": list(key),
        "n_configs": len(configs),
        "n_jobs": len(jobs),
        "workers": workers,
        "seconds_serial": round(serial, 2),
        "seconds_pooled": round(pooled, 2),
        "speedup": round(serial / pooled, 2) if pooled > 0 else None,
        "seconds_pool_start": round(start, 2),
        "mean_seconds_per_job_serial": round(serial / len(jobs), 2),
        "cache_hits": sum(r.cache_hit for r in serial_results + pooled_results),
        "failed": [f"{r.kernel}: {r.error}" for r in failed],
        "same_hashes_serial_and_pooled": same,
        "machine": {
            "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "triton": triton.__version__, "torch": torch.__version__,
            # other processes' load skews both timings: a busy machine shows no speed-up
            "load_average_1min_before": load_before, "load_average_1min_after": _load(),
        },
    }
    print(f"compile {len(jobs)} matmul jobs ({args.dtype} 4096^3, sm90) on {usable_cpus()} CPUs, "
          f"Triton {triton.__version__}")
    print(f"  {'how':<22}{'seconds':>9}{'per job':>9}")
    print(f"  {'serial':<22}{serial:9.2f}{serial / len(jobs):9.2f}")
    print(f"  {f'pool, {workers} workers':<22}{pooled:9.2f}{pooled / len(jobs):9.2f}")
    print(f"  speed-up {report['speedup']}x; pool start and warm-up {start:.2f} s (paid once per process)")
    if failed or not same:
        print(f"  PROBLEM: {len(failed)} failed compiles; same hashes serial and pooled: {same}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 1 if failed or not same else 0


if __name__ == "__main__":
    raise SystemExit(main())
