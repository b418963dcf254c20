"""Turn the files perf/gpu_check.sh brought back from a GPU into the repository's files.

    python3 -m perf.publish DIR [--root ROOT]

DIR holds gpu_check's files: results.json, tuned.json, report.tar.gz, env.txt, status.txt and
the logs. Into the checkout at ROOT (default: this one) it writes, <gpu> being results.json's
device name as a plain name (e.g. nvidia-h200):

    perf/results/<gpu>/             results.json, report.md and its plots, env.txt, status.txt,
                                    the logs, and summary.md (python3 -m perf.targets' text),
                                    replacing those of the run published there before (its
                                    .md and .png files and those names)
    tritonops/configs/<gpu>.json    the shipped configs: every entry of tuned.json that this
                                    checkout's tuners accept, merged with the entries shipped
                                    before (of two, the faster; stale ones are dropped)
    README.md                       the Performance section's block between its markers

Nothing read is trusted: results.json must be a perf.bench file of a GPU run; only plain
.md and .png files are taken from the archive; every tuned entry must belong to this GPU and
to a tuner of this checkout with the same kernel source and space version, and its config must
be one of that tuner's space (names and values: the space's rules and the GPU's limits are
checked again on the GPU before any launch). Exit 0: all published; 1: published, but some
parts were skipped (listed); 2: nothing written.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from .backend import prepare_backend
from .schema import SCHEMA

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("results.json", "env.txt", "status.txt", "tests.log", "tune.log", "bench.log")
REPORT_FILE = re.compile(r"report/([A-Za-z0-9][A-Za-z0-9_.-]*\.(?:md|png))")
MAX_REPORT_FILE = 16 << 20
README_BEGIN = "<!-- performance:begin (written by python3 -m perf.publish) -->"
README_END = "<!-- performance:end -->"


class Refused(Exception):
    """Nothing can be published from this folder."""


def read_results(folder: Path, allow_interpreter: bool) -> dict:
    path = folder / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Refused(f"{path}: {e}") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise Refused(f"{path} is not a perf.bench results file")
    device = results.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("name"), str):
        raise Refused(f"{path} names no device")
    if not device.get("gpu") and not allow_interpreter:
        raise Refused(f"{path} is a run under the interpreter, not on a GPU: nothing to publish "
                      "(--allow-interpreter publishes it anyway, to try this command)")
    return results


def copy_files(folder: Path, dest: Path) -> list[str]:
    """gpu_check's plain files into dest; the names copied."""
    copied = []
    for name in COPIED:
        src = folder / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def extract_report(archive: Path, dest: Path) -> tuple[list[str], list[str]]:
    """report/<name>.md and .png regular files of the archive into dest, flat; (written, skipped and why)."""
    written, skipped = [], []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isdir() and member.name.rstrip("/") == "report":
                    continue
                match = REPORT_FILE.fullmatch(member.name)
                if not match or not member.isfile():
                    skipped.append(f"{archive.name}: {member.name!r}: not a plain report/*.md or *.png file")
                    continue
                if member.size > MAX_REPORT_FILE:
                    skipped.append(f"{archive.name}: {member.name}: {member.size} bytes, over {MAX_REPORT_FILE}")
                    continue
                data = tar.extractfile(member).read()
                (dest / match.group(1)).write_bytes(data)
                written.append(match.group(1))
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:  # a damaged or cut archive
        skipped.append(f"{archive.name}: {type(e).__name__}: {e}")
    return written, skipped


def ship_configs(bundle: Path, shipped: Path, fingerprint_prefix: str) -> tuple[int, list[str], list[str]]:
    """Merge `bundle` into the shipped bundle file `shipped`, both checked entry by entry.
    Returns (entries shipped, what of `bundle` was skipped, what of the earlier file was dropped)."""
    from autotune import CacheDir
    from autotune.registry import TUNERS

    import tritonops  # noqa: F401 - registers the tuners whose identities the entries must carry

    by_identity = {t.identity: t for t in TUNERS.values()}

    def check(f: dict, key: str, entry: dict) -> str | None:
        if not f["fingerprint"].startswith(fingerprint_prefix):
            return f"tuned on another device ({f['fingerprint']}), not {fingerprint_prefix}*"
        tuner = by_identity.get(f["identity"])
        if tuner is None:
            return ("no tuner here has this identity: its kernel source or space version changed since it "
                    "was tuned")
        return tuner.entry_problem(key, entry, this_device=False)

    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheDir(tmp)
        dropped = []
        if shipped.exists():
            try:
                dropped = cache.import_bundle(shipped, check)[1]
            except ValueError as e:
                dropped = [f"{shipped}: {e}"]
        try:
            _, skipped = cache.import_bundle(bundle, check)
        except ValueError as e:
            skipped = [str(e)]
        if cache.files():
            shipped.parent.mkdir(parents=True, exist_ok=True)
            count = cache.export(shipped)
        else:  # nothing valid, old or new: no file rather than an empty one
            shipped.unlink(missing_ok=True)
            count = 0
    return count, skipped, dropped


def readme_block(readme: Path) -> tuple[str, int, int]:
    """The README's text and where its Performance block starts and ends (between the markers)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        raise Refused(f"{readme}: {e}") from None
    start = text.find(README_BEGIN)
    end = text.find(README_END, start + len(README_BEGIN)) if start >= 0 else -1
    if end < 0:
        raise Refused(f"{readme} has no {README_BEGIN} ... {README_END} block to write into")
    return text, start + len(README_BEGIN), end


def update_readme(readme: Path, block: list[str]) -> None:
    """Replace what lies between the Performance section's markers with `block`."""
    text, start, end = readme_block(readme)
    readme.write_text(text[:start] + "\n" + "\n".join(block).rstrip("\n") + "\n" + text[end:], encoding="utf-8")


def clear_previous_run(dest: Path) -> None:
    """The files an earlier publish wrote into dest (a newer run replaces them all; git keeps them)."""
    for path in dest.iterdir():
        if path.is_file() and (path.name in COPIED or path.suffix in (".md", ".png")):
            path.unlink()


def publish(folder: Path, root: Path, allow_interpreter: bool = False) -> tuple[list[str], list[str]]:
    """Everything the module doc says; returns (what was written, what was skipped and why)."""
    from autotune.device import device_slug

    from .targets import summary_markdown

    # every check that can refuse comes before anything is written
    results = read_results(folder, allow_interpreter)
    readme = root / "README.md"
    readme_block(readme)
    gpu = bool(results["device"].get("gpu"))
    name = device_slug(results["device"]["name"])
    if not name:
        raise Refused(f"the device name {results['device']['name']!r} has no letters or digits to name a folder")
    try:
        summary = summary_markdown(results)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise Refused(f"{folder / 'results.json'}: {type(e).__name__}: {e}") from None
    dest = root / "perf" / "results" / name
    if dest.exists() and dest.resolve() == folder.resolve():
        raise Refused(f"{folder} is where the run would be published: publish from the folder gpu_check wrote")
    dest.mkdir(parents=True, exist_ok=True)
    clear_previous_run(dest)
    written = [f"{dest}/{n}" for n in copy_files(folder, dest)]
    skipped: list[str] = []
    if (folder / "report.tar.gz").is_file():
        files, bad = extract_report(folder / "report.tar.gz", dest)
        written += [f"{dest}/{n}" for n in files]
        skipped += bad
    else:
        skipped.append("report.tar.gz: not there")
    (dest / "summary.md").write_text("\n".join([f"# {results['device']['name']}", "", *summary]), encoding="utf-8")
    written.append(f"{dest}/summary.md")
    if (folder / "tuned.json").is_file():
        shipped = root / "tritonops" / "configs" / f"{name}.json"
        # a GPU's fingerprint starts with the name of results.json's device; the interpreter's with its own
        count, bad, dropped = ship_configs(folder / "tuned.json", shipped, f"{name}-sm" if gpu else "interpreter-sm")
        written.append(f"{shipped} ({count} entries)" if count else f"no configs to ship: {shipped} not written")
        skipped += [f"tuned.json: {why}" for why in bad]
        skipped += [f"{shipped.name} as shipped before: {why}" for why in dropped]
    else:
        skipped.append("tuned.json: not there")
    link = f"perf/results/{name}"
    report = (f"[{link}]({link}/report.md) (plots and every number there, the targets in "
              f"[summary.md]({link}/summary.md))" if (dest / "report.md").exists()
              else f"[{link}]({link}/summary.md) (no report came back)")
    update_readme(readme, [f"The newest run, {report}:", "", *summary])
    written.append(f"{readme} (Performance section)")
    return written, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m perf.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the files perf/gpu_check.sh wrote (the device tool's files_at)")
    p.add_argument("--root", default=str(ROOT), help="the checkout to write into (default: this one)")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="publish a run under the interpreter too (only to try this command: not performance)")
    args = p.parse_args(argv)
    prepare_backend()  # before tritonops is imported: the interpreter where there is no GPU
    try:
        written, skipped = publish(Path(args.folder), Path(args.root), args.allow_interpreter)
    except Refused as e:
        print(f"perf.publish: {e}", file=sys.stderr)
        return 2
    for line in written:
        print(f"wrote {line}")
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
