"""The `autotune` command: tune ahead of time, show, export, import and clear the cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import settings
from .search import DEFAULT_STRATEGY, STRATEGIES


def _prepare_backend() -> bool:
    """Without a GPU, kernels run under Triton's interpreter; set it before any kernel is decorated."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return False
    return True


def _parse_shapes(text: str, dims: str) -> list[tuple]:
    n = len(dims.split("x"))
    shapes = []
    for part in text.split(","):
        part = part.strip()
        try:
            shape = tuple(int(v) for v in part.split("x"))
        except ValueError:
            raise SystemExit(f"autotune: bad shape {part!r}: expected {dims} with whole numbers, e.g. "
                             f"{'x'.join(['1024'] * n)}") from None
        if len(shape) != n or any(v < 1 for v in shape):
            raise SystemExit(f"autotune: bad shape {part!r}: expected {n} positive dims {dims}")
        shapes.append(shape)
    return shapes


def _jobs_from_trace(path: str) -> list[tuple[str, tuple]]:
    """(kernel, key) pairs of a trace (recorded with $AUTOTUNE_RECORD), first occurrence order, no repeats."""
    from .cache import key_from_json
    from .registry import TUNERS

    jobs = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                kernel, key = item["kernel"], key_from_json(item["key"])
            except (ValueError, KeyError, TypeError, RecursionError):
                raise SystemExit(f"autotune: {path}:{n}: not a trace line: {line.strip()[:80]!r}") from None
            if kernel not in TUNERS:
                raise SystemExit(f"autotune: {path}:{n}: unknown kernel {kernel!r}; known: {sorted(TUNERS)}")
            jobs.setdefault((kernel, key), None)
    return list(jobs)


# a row's entry for a key that --op-seconds left untuned; compared by value: rows come back
# from worker processes (--devices) as copies
CAPPED = "capped"


def _tune_jobs(jobs, args, device: int | None = None):
    """Tune (kernel, key, group) jobs in this process; returns [(kernel, key, entry)], the entry
    CAPPED for a key not started because its group (op) had used its --op-seconds."""
    from tqdm import tqdm

    from .registry import TUNERS

    if device is not None:
        torch.cuda.set_device(device)
    rows = []
    started: dict[str, float] = {}  # group -> when its first key began
    bar = tqdm(total=len(jobs), desc="tuning" if device is None else f"tuning on cuda:{device}", unit="key",
               disable=args.quiet or None, position=device or 0)
    for kernel, key, group in jobs:
        seconds = args.seconds
        if args.op_seconds is not None:
            left = args.op_seconds - (time.monotonic() - started.setdefault(group, time.monotonic()))
            if left <= 0:
                bar.update(1)
                rows.append((kernel, key, CAPPED))
                continue
            seconds = left if seconds is None else min(seconds, left)
        bar.set_postfix_str(f"{kernel} {key}")
        entry = TUNERS[kernel].tune(key, strategy=args.strategy, max_evals=args.budget, max_seconds=seconds)
        bar.update(1)
        rows.append((kernel, key, entry))
    bar.close()
    return rows


def _worker(device: int, jobs, args, plugins_env: str | None):
    _prepare_backend()
    from .registry import load_plugins

    if plugins_env is not None:
        os.environ[settings.variable("plugins")] = plugins_env
    load_plugins()
    return _tune_jobs(jobs, args, device)


def _tune_on_devices(jobs, args):
    """One worker process per GPU, the jobs dealt out round-robin; every worker writes the one
    cache (the file lock merges), and the rows come back for the table."""
    import multiprocessing as mp

    count = torch.cuda.device_count() if args.devices == "all" else len(args.devices.split(","))
    devices = list(range(count)) if args.devices == "all" else [int(d) for d in args.devices.split(",")]
    if len(devices) <= 1:
        return _tune_jobs(jobs, args, devices[0] if devices and torch.cuda.is_available() else None)
    shares = [jobs[i::len(devices)] for i in range(len(devices))]
    with mp.get_context("spawn").Pool(len(devices)) as pool:
        parts = pool.starmap(_worker, [(d, share, args, settings.get("plugins"))
                                       for d, share in zip(devices, shares)])
    return [row for part in parts for row in part]


def cmd_tune(args, registry, cache) -> int:
    from .device import device_fingerprint, gpu_available

    if args.op_seconds is not None and not args.op_seconds > 0:
        print(f"autotune: --op-seconds must be a positive number of seconds, not {args.op_seconds:g}",
              file=sys.stderr)
        return 2
    # tuning is for keeping: refuse before any timing when the winners could not be stored
    cache.check_writable()

    if not gpu_available():
        print("autotune: no GPU: kernels run under the Triton interpreter and the times below are "
              "CPU wall-clock times of the interpreter, not GPU timings.")
    print(f"device: {device_fingerprint()}")
    if args.from_trace:
        if args.ops or args.shapes or args.preset:
            print("autotune: --from-trace tunes the trace's keys: give no ops, --shapes or --preset with it",
                  file=sys.stderr)
            return 2
        try:
            jobs = [(kernel, key, kernel) for kernel, key in _jobs_from_trace(args.from_trace)]
        except OSError as e:
            print(f"autotune: {e}", file=sys.stderr)
            return 2
    else:
        jobs = []
        ops = args.ops or sorted(registry)
        unknown = [o for o in ops if o not in registry]
        if unknown:
            print(f"autotune: unknown op(s) {unknown}; known: {sorted(registry)}", file=sys.stderr)
            return 2
        for name in ops:
            op = registry[name]
            if args.shapes:
                shapes = _parse_shapes(args.shapes, op.dims)
            elif args.preset:
                if args.preset not in op.presets:
                    print(f"autotune: op {name} has no preset {args.preset!r}; it has {sorted(op.presets)}",
                          file=sys.stderr)
                    return 2
                shapes = op.presets[args.preset]
            else:
                print(f"autotune: give --shapes ({op.dims}), --preset ({', '.join(sorted(op.presets))}) "
                      f"or --from-trace for {name}", file=sys.stderr)
                return 2
            dtypes = args.dtype.split(",") if args.dtype else list(op.dtypes)
            for shape in shapes:
                for dtype in dtypes:
                    try:
                        pairs = op.keys(shape, dtype)
                    except ValueError as e:
                        print(f"autotune: {name}: {e}", file=sys.stderr)
                        return 2
                    jobs += [(tuner.name, key, name) for tuner, key in pairs]
    # a key two ops share (matmul's and linear's) is tuned once, in the first op's time
    first_group: dict = {}
    for kernel, key, group in jobs:
        first_group.setdefault((kernel, key), group)
    jobs = [(kernel, key, group) for (kernel, key), group in first_group.items()]
    rows = _tune_on_devices(jobs, args) if args.devices else _tune_jobs(jobs, args)
    _print_table(rows)
    capped = sum(e == CAPPED for _, _, e in rows)
    if capped:
        print(f"{capped} of {len(rows)} keys not tuned: their op had used its --op-seconds {args.op_seconds:g}")
    return 0 if all(e is not None for _, _, e in rows) else 1


def _print_table(rows) -> None:
    print(f"\n{'kernel':14s} {'key':44s} {'winner':52s} {'ms':>9s} {'vs default':>10s} {'evals':>5s}")
    for kernel, key, entry in rows:
        if entry is None or entry == CAPPED:
            why = "(no config ran)" if entry is None else "(not tuned: --op-seconds)"
            print(f"{kernel:14s} {str(tuple(key)):44s} {why:52s}")
            continue
        win = _config_text(entry["winner"])
        ms = entry["timing"]["p50"]
        dflt = entry.get("default", {}).get("timing", {}).get("p50")
        speedup = f"{dflt / ms:9.2f}x" if dflt and ms else "      n/a"
        print(f"{kernel:14s} {str(tuple(key)):44s} {win:52s} {ms:9.4f} {speedup:>10s} "
              f"{entry['provenance'].get('evaluations', 0):5d}")


def _config_text(winner: dict) -> str:
    """A stored config on one line, host parameters after the launch options."""
    host = winner.get("host") if isinstance(winner.get("host"), dict) else {}
    fields = {k: v for k, v in winner.items() if k != "host"}
    return ",".join(f"{k}={v}" for k, v in {**fields, **host}.items())


def cmd_show(args, cache) -> int:
    from .cache import entry_time

    files = cache.files(kernel=args.kernel)
    if args.json:
        print(json.dumps([f.to_dict() for f in files], indent=1, sort_keys=True))
        return 0
    if not files:
        print(f"no tuned configs in {cache.root}" + (f" for kernel {args.kernel}" if args.kernel else ""))
        return 0
    for f in files:
        entries = f.read()
        print(f"{f.header['fingerprint']} / {f.header['identity']}: {len(entries)} key(s)")
        for key, entry in sorted(entries.items()):
            win = _config_text(entry["winner"])  # well formed: read() left out the others
            print(f"  {key:44s} {win:52s} {entry_time(entry):9.4f} ms")
    return 0


def cmd_info(args, cache) -> int:
    import triton

    from .device import device_fingerprint, device_properties, gpu_available
    from .tuner import default_mode

    props = device_properties()
    print(f"device:       {props['name']} (sm{props['capability'][0]}{props['capability'][1]})"
          + ("" if gpu_available() else "  [no GPU: Triton interpreter; timings are not GPU timings]"))
    print(f"fingerprint:  {device_fingerprint()}")
    print(f"cache dir:    {cache.root}  ({settings.describe('cache_dir')})")
    try:
        mode = default_mode()
    except ValueError as e:
        mode = f"invalid ({e})"
    print(f"mode:         {mode}  ({settings.describe('mode')})")
    record = settings.get("record")
    print(f"trace:        {record or 'not recorded'}  ({settings.describe('record')})")
    print(f"triton:       {triton.__version__}")
    print(f"torch:        {torch.__version__}")
    return 0


def build_parser(registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autotune", description="Tune Triton kernels per GPU and keep the winners.")
    parser.add_argument("--cache-dir", help=f"cache directory (default: {settings.describe('cache_dir')}, "
                                            f"else {settings.default('cache_dir')})")
    sub = parser.add_subparsers(dest="command", required=True)

    ops_help = "; ".join(f"{o.name} ({o.dims})" for o in registry.values()) or "none registered"
    t = sub.add_parser("tune", help="tune ops for shapes ahead of time", description=f"ops and their dims: {ops_help}")
    t.add_argument("ops", nargs="*", help="ops to tune (default: all)")
    t.add_argument("--shapes", help="shapes as the op's dims joined by x, comma-separated, e.g. 4096x4096x4096,1x4096x11008")
    t.add_argument("--preset", help="a named shape preset of the op")
    t.add_argument("--dtype", help="comma-separated dtypes (default: the op's)")
    t.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=sorted(STRATEGIES),
                   help=f"how to search each key's configs (default: {DEFAULT_STRATEGY})")
    t.add_argument("--budget", type=int, help="at most this many configs timed per key (default: the "
                                              "strategy's own, 50 for bayes and ils)")
    t.add_argument("--seconds", type=float, help="at most this many seconds per key")
    t.add_argument("--op-seconds", type=float,
                   help="at most this many seconds for all of an op's keys (of a trace: a kernel's; with "
                        "--devices: on each GPU): a key is searched for what is left of it, and keys after it "
                        "is spent are not tuned. A preset lists its largest problems first")
    t.add_argument("--from-trace", metavar="FILE",
                   help=f"tune the (kernel, key) pairs of a trace FILE, which a run writes when "
                        f"{settings.describe('record')} names it")
    t.add_argument("--devices", help="'all' (one worker per GPU) or a list like 0,1,3: split the keys over GPUs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("show", help="list tuned configs")
    s.add_argument("--kernel")
    s.add_argument("--json", action="store_true")

    e = sub.add_parser("export", help="write the cache (or one kernel's part) to one bundle file")
    e.add_argument("file")
    e.add_argument("--kernel")
    e.add_argument("--all-devices", action="store_true", help="every device's configs, not only this one's")

    i = sub.add_parser("import", help="merge a bundle into the cache, keeping the faster of two entries")
    i.add_argument("file")

    c = sub.add_parser("clear", help="delete tuned configs")
    c.add_argument("--kernel")

    sub.add_parser("info", help="device fingerprint, cache dir, mode, versions")
    return parser


def main(argv=None) -> int:
    _prepare_backend()
    from .cache import CacheDir
    from .registry import REGISTRY, load_plugins, override

    failed = load_plugins()
    for f in failed:
        print(f"autotune: warning: plugin not loaded: {f}", file=sys.stderr)
    args = build_parser(REGISTRY).parse_args(argv)
    if not args.cache_dir:
        return _run(args, CacheDir())
    # For this command only, so a program that calls main() keeps its own setting: every
    # registered tuner uses the directory (and forgets, after, what it tuned into it), and the
    # AUTOTUNE_ variable, which wins over every alias, names it to worker processes.
    cache_dir = Path(args.cache_dir).expanduser()
    variable = settings.variable("cache_dir")
    before = os.environ.get(variable)
    os.environ[variable] = str(cache_dir)
    try:
        with override(cache_dir=cache_dir):
            return _run(args, CacheDir(cache_dir))
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


def _run(args, cache) -> int:
    from .device import device_fingerprint
    from .registry import REGISTRY

    try:
        if args.command == "tune":
            return cmd_tune(args, REGISTRY, cache)
        if args.command == "show":
            return cmd_show(args, cache)
        if args.command == "export":
            n = cache.export(args.file, None if args.all_devices else device_fingerprint(), args.kernel)
            print(f"exported {_entries(n)} to {args.file}")
            return 0
        if args.command == "import":
            return cmd_import(args, cache)
        if args.command == "clear":
            n = cache.clear(args.kernel)
            print(f"removed {n} cache file(s) from {cache.root}")
            return 0
        return cmd_info(args, cache)
    except OSError as e:  # an unreadable or unwritable cache directory, a file that cannot be written
        print(f"autotune: {args.command}: {e}", file=sys.stderr)
        return 2


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def cmd_import(args, cache) -> int:
    """Merge a bundle, every entry checked first: well formed, and for a kernel registered here
    (found by identity: the same code), valid for its tuner's space (the rules and limits only
    for this device's entries: another device's are its own). Exit 1 when anything was skipped,
    2 for a file that is not a bundle."""
    from .device import device_fingerprint
    from .registry import TUNERS

    here = device_fingerprint()
    by_identity = {t.identity: t for t in TUNERS.values()}

    def check(f: dict, key: str, entry: dict) -> str | None:
        tuner = by_identity.get(f["identity"])
        if tuner is None:
            return None  # code not loaded here: checked for form only, and by its tuner when used
        return tuner.entry_problem(key, entry, this_device=f["fingerprint"] == here)

    try:
        n, skipped = cache.import_bundle(args.file, check)
    except ValueError as e:
        print(f"autotune: {e}", file=sys.stderr)
        return 2
    print(f"imported {_entries(n)} into {cache.root}")
    if skipped:
        print(f"autotune: skipped {len(skipped)} invalid part(s) of {args.file}:", file=sys.stderr)
        for why in skipped:
            print(f"  {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
