"""The persistent cache: one JSON file per (device fingerprint, kernel identity).

    $AUTOTUNE_CACHE_DIR (default ~/.cache/autotune)/<fingerprint>/<kernel identity>.json

(a package built on autotune may add a variable and its own default: see settings.py).

Writes are read-merge-write under a file lock, into a temp file renamed over
the old one, so N processes writing at once lose nothing and a reader never sees
half a file. A file that cannot be read (corrupt, or another format) is a
warning and is rebuilt, never a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

from filelock import FileLock

from . import settings

FORMAT = "autotune-cache-1"
BUNDLE_FORMAT = "autotune-bundle-1"


def default_cache_dir() -> Path:
    """The cache root that settings name now (read at each call: the variables may change)."""
    return Path(settings.get("cache_dir")).expanduser()


def encode_key(key: tuple) -> str:
    return json.dumps(list(key))


def decode_key(text: str) -> tuple:
    return tuple(json.loads(text))


def entry_time(entry: dict) -> float:
    """The winner's median time; an entry without one never beats one with one."""
    try:
        return float(entry["timing"]["p50"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def merge_entries(old: dict | None, new: dict) -> dict:
    """Two entries for one key: the faster winner is kept; per-config timings are united."""
    if old is None:
        return new
    keep, other = (new, old) if entry_time(new) <= entry_time(old) else (old, new)
    merged = dict(keep)
    timings = {json.dumps(t["config"], sort_keys=True): t for t in other.get("timings", [])}
    timings.update({json.dumps(t["config"], sort_keys=True): t for t in keep.get("timings", [])})
    merged["timings"] = list(timings.values())
    return merged


class KernelFile:
    """The cache file of one kernel identity on one device."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = dict(header)  # fingerprint, kernel, identity
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)

    def read(self) -> dict[str, dict]:
        """key (encoded) -> entry; {} when the file is missing or unreadable (with a warning)."""
        data = _read_json(self.path)
        if data is None:
            return {}
        if data.get("format") != FORMAT or data.get("identity") != self.header.get("identity"):
            warnings.warn(f"autotune: cache file {self.path} is of another format or kernel; it will be rebuilt",
                          RuntimeWarning, stacklevel=2)
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def update(self, entries: dict[str, dict]) -> dict[str, dict]:
        """Merge `entries` into the file (faster winner per key) and return the file's entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            current = self.read()
            for key, entry in entries.items():
                current[key] = merge_entries(current.get(key), entry)
            _write_json_atomic(self.path, {"format": FORMAT, **self.header, "entries": current})
        return current

    def to_dict(self) -> dict:
        return {"format": FORMAT, **self.header, "entries": self.read()}


class CacheDir:
    """All kernel files under one root, grouped by device fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def kernel_file(self, fingerprint: str, kernel: str, identity: str) -> KernelFile:
        return KernelFile(self.root / fingerprint / f"{identity}.json",
                          {"fingerprint": fingerprint, "kernel": kernel, "identity": identity})

    def files(self, fingerprint: str | None = None, kernel: str | None = None) -> list[KernelFile]:
        out = []
        if not self.root.is_dir():
            return out
        for fp_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if fingerprint is not None and fp_dir.name != fingerprint:
                continue
            for path in sorted(fp_dir.glob("*.json")):
                data = _read_json(path, quiet=True) or {}
                name = data.get("kernel") or path.stem.rsplit("-", 2)[0]
                if kernel is not None and name != kernel:
                    continue
                out.append(KernelFile(path, {"fingerprint": fp_dir.name, "kernel": name,
                                             "identity": data.get("identity", path.stem)}))
        return out

    def export(self, path: str | os.PathLike, fingerprint: str | None = None, kernel: str | None = None) -> int:
        """Write every matching file into one bundle; returns the number of entries."""
        files = [f.to_dict() for f in self.files(fingerprint, kernel)]
        _write_json_atomic(Path(path), {"format": BUNDLE_FORMAT, "files": files})
        return sum(len(f["entries"]) for f in files)

    def import_bundle(self, path: str | os.PathLike) -> int:
        """Merge a bundle (from export) into this cache, keeping the faster of two entries."""
        count = 0
        for f in read_bundle(path):
            kf = self.kernel_file(f["fingerprint"], f["kernel"], f["identity"])
            kf.update(f["entries"])
            count += len(f["entries"])
        return count

    def clear(self, kernel: str | None = None) -> int:
        removed = 0
        for f in self.files(kernel=kernel):
            with f._lock:
                f.path.unlink(missing_ok=True)
            removed += 1
        return removed


def read_bundle(path: str | os.PathLike) -> list[dict]:
    """The kernel files of a bundle; raises ValueError for something that is not one."""
    data = _read_json(Path(path), quiet=True)
    if data is None or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("files"), list):
        raise ValueError(f"{path} is not an autotune bundle (written by `autotune export`)")
    files = []
    for f in data["files"]:
        if not all(isinstance(f.get(k), str) for k in ("fingerprint", "kernel", "identity")):
            raise ValueError(f"{path}: a kernel file in the bundle lacks its fingerprint, kernel or identity")
        files.append({**f, "entries": f.get("entries") or {}})
    return files


def bundle_entries(paths: Iterable[Path], fingerprint: str, identity: str) -> dict[str, dict]:
    """Entries for one kernel identity on one device from shipped bundles (missing files skipped)."""
    out: dict[str, dict] = {}
    for path in paths:
        if not Path(path).is_file():
            continue
        try:
            files = read_bundle(path)
        except ValueError as e:
            warnings.warn(f"autotune: ignoring shipped configs: {e}", RuntimeWarning, stacklevel=2)
            continue
        for f in files:
            if f["fingerprint"] == fingerprint and f["identity"] == identity:
                for key, entry in f["entries"].items():
                    out[key] = merge_entries(out.get(key), entry)
    return out


def _read_json(path: Path, quiet: bool = False) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if not quiet:
            warnings.warn(f"autotune: cache file {path} is unreadable ({e}); it will be rebuilt",
                          RuntimeWarning, stacklevel=3)
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
