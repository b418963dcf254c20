"""The persistent cache: one JSON file per (device fingerprint, kernel identity).

    $AUTOTUNE_CACHE_DIR (default ~/.cache/autotune)/<fingerprint>/<kernel identity>.json

(a package built on autotune may add a variable and its own default: see settings.py).

Writes are read-merge-write under a file lock, into a temp file renamed over
the old one, so N processes writing at once lose nothing and a reader never sees
half a file. Nothing read from disk is trusted: a file that cannot be read
(corrupt, or another format) is a warning and is rebuilt; an entry that is not
a JSON-list key with a `winner` config is skipped with a warning; a fingerprint
or kernel identity from a file becomes a path only if it is a plain name. What a
config's values mean is checked by the tuner against its Space (tuner.py).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from . import settings
from .config import Config

FORMAT = "autotune-cache-1"
BUNDLE_FORMAT = "autotune-bundle-1"


# A fingerprint or identity names a directory or file: a plain name, never a path that would
# lead a write outside the cache root: no separators (/ \\ and a drive's :), no control
# characters or characters Windows refuses, no leading dot (".", "..", hidden files), no "..",
# no trailing dot or space (Windows drops them: two names, one file), at most 200 UTF-8 bytes.
SAFE_NAME = re.compile(r'[^./\\:<>"|?*\x00-\x1f\x7f]([^/\\:<>"|?*\x00-\x1f\x7f]*[^./\\:<>"|?*\x00-\x1f\x7f ])?')

_warned: set = set()


def warn_once(what: Any, message: str) -> None:
    """A RuntimeWarning for `what` (a file and entry, a directory) once per process: a cache
    is read again at every change, and one bad entry should not warn at every read."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def is_plain_name(text: Any) -> bool:
    """`text` is a plain file name (see SAFE_NAME)."""
    return isinstance(text, str) and bool(SAFE_NAME.fullmatch(text)) and ".." not in text and _utf8_len(text) <= 200


def check_name(text: Any, what: str) -> str:
    """`text` if it is a plain file name (see SAFE_NAME), else ValueError."""
    if not is_plain_name(text):
        raise ValueError(f"{what} {text!r} is not a plain name (no separators, no leading dot, no '..')")
    return text


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no file name
        return 1 << 30


def identity_kernel(identity: str) -> str:
    """The kernel name of an identity, "<kernel>-<source hash>-v<space version>" (Tuner.identity)."""
    return identity.rsplit("-", 2)[0]


def default_cache_dir() -> Path:
    """The cache root that settings name now (read at each call: the variables may change)."""
    return Path(settings.get("cache_dir")).expanduser()


def encode_key(key: tuple) -> str:
    return json.dumps(list(key))


def _key_value(value: Any) -> Any:
    """A key field from JSON: a scalar, or a list of them (a tuple argument's value), as a tuple."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return tuple(_key_value(v) for v in value)
    raise ValueError(f"a key field cannot be {type(value).__name__}")


def key_from_json(values: Any) -> tuple:
    """A key from its JSON value (a list of scalars, or of lists of them), lists as tuples;
    ValueError for anything else."""
    if not isinstance(values, list):
        raise ValueError(f"a key is a list, not {type(values).__name__}")
    return tuple(_key_value(v) for v in values)


def decode_key(text: str) -> tuple:
    """The key that encode_key wrote; ValueError for text that is not a JSON list of scalars
    (or of lists of them)."""
    try:
        return key_from_json(json.loads(text))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"key {str(text)[:200]!r} is not a JSON list of numbers, strings and booleans "
                         f"({str(e)[:100]})") from None


def entry_problem(text: Any, entry: Any) -> str | None:
    """Why a stored (key, entry) pair is malformed, or None: the key must be a JSON list and the
    entry a dict whose `winner` is a config (`timings`, if there, a list). Whether the config
    suits the kernel is the tuner's check (Tuner.entry_problem)."""
    try:
        decode_key(text)
    except ValueError as e:
        return str(e)
    if not isinstance(entry, dict):
        return f"the entry is a {type(entry).__name__}, not an object"
    if not isinstance(entry.get("winner"), dict):
        return "the entry has no winner config"
    try:
        Config.from_dict(entry["winner"])
    except (TypeError, ValueError) as e:
        return f"the winner is not a config: {e}"
    if not isinstance(entry.get("timings", []), list):
        return "the entry's timings are not a list"
    return None


def timing_records(entry: dict) -> list[dict]:
    """The entry's per-config records that have a config (others are dropped, not trusted)."""
    records = entry.get("timings", [])
    return [t for t in records if isinstance(t, dict) and isinstance(t.get("config"), dict)] \
        if isinstance(records, list) else []


def time_ms(value: Any) -> float:
    """A stored time in ms when it is one (a finite, non-negative number), else inf: a time read
    from disk (NaN, negative, a string, true) never beats a measured one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("inf")
    try:
        ms = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return float("inf")
    return ms if math.isfinite(ms) and ms >= 0 else float("inf")


def entry_time(entry: Any) -> float:
    """The winner's median time; an entry without one never beats one with one."""
    timing = entry.get("timing") if isinstance(entry, dict) else None
    return time_ms(timing.get("p50")) if isinstance(timing, dict) else float("inf")


def merge_entries(old: dict | None, new: dict) -> dict:
    """Two entries for one key: the faster winner is kept; per-config timings are united."""
    if old is None:
        return new
    keep, other = (new, old) if entry_time(new) <= entry_time(old) else (old, new)
    merged = dict(keep)
    timings = {json.dumps(t["config"], sort_keys=True): t for t in timing_records(other)}
    # the faster entry's record of a config wins, an error record included (a config that
    # failed or computed a wrong answer there is not to be trusted on its older time), but a
    # full timing is never replaced by the probe of an early stop (which says less)
    for t in timing_records(keep):
        text = json.dumps(t["config"], sort_keys=True)
        if t.get("stopped_early") and text in timings and _full_timing(timings[text]):
            continue
        timings[text] = t
    merged["timings"] = list(timings.values())
    return merged


def _full_timing(record: dict) -> bool:
    """A record with a usable time (see time_ms) that was not cut short by an early stop."""
    return entry_time(record) < math.inf and not record.get("stopped_early")


class KernelFile:
    """The cache file of one kernel identity on one device."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = dict(header)  # fingerprint, kernel, identity
        self.written = 0  # mtime() of the file as the last update() left it
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)

    def read(self) -> dict[str, dict]:
        """key (encoded) -> entry; {} when the file is missing or unreadable (with a warning).
        Malformed entries (see entry_problem) are left out, each with one warning."""
        data = _read_json(self.path)
        if data is None:
            return {}
        if data.get("format") != FORMAT or data.get("identity") != self.header.get("identity"):
            warn_once((self.path, "format"), f"autotune: cache file {self.path} is of another format or kernel; "
                                             f"it will be rebuilt")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            warn_once((self.path, "entries"), f"autotune: cache file {self.path} has no entries object; "
                                              f"it will be rebuilt")
            return {}
        return well_formed(entries, self.path)

    def mtime(self) -> tuple | int:
        """What changes when the file is rewritten: its mtime and inode (every write renames a
        new file over it, so two writes within the clock's resolution still differ); 0 if absent."""
        try:
            st = self.path.stat()
        except OSError:
            return 0
        return st.st_mtime_ns, st.st_ino

    def update(self, entries: dict[str, dict],
               valid: Callable[[str, dict], bool] | None = None) -> dict[str, dict]:
        """Merge `entries` into the file (faster winner per key) and return the file's entries.

        valid: (key, stored entry) -> whether a stored entry may stay; one that may not is
        replaced, never merged, so a bad entry with a fast time cannot outlive a good one.
        Raises OSError when the directory cannot be written (see Tuner, which carries on)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            current = self.read()
            for key, entry in entries.items():
                old = current.get(key)
                current[key] = merge_entries(old if old is None or valid is None or valid(key, old) else None,
                                             entry)
            _write_json_atomic(self.path, {"format": FORMAT, **self.header, "entries": current})
            self.written = self.mtime()  # under the lock: the version these entries are
            with contextlib.suppress(OSError):  # best effort: the write itself succeeded
                remove_temp_files(self.path)  # left by writers killed mid-write; the lock keeps live ones out
        return current

    def to_dict(self) -> dict:
        return {"format": FORMAT, **self.header, "entries": self.read()}


class CacheDir:
    """All kernel files under one root, grouped by device fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def check_writable(self) -> None:
        """OSError, naming the directory, when files cannot be created under the root."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OSError(e.errno, f"the cache directory {self.root} cannot be written ({e.strerror or e})") from None

    def kernel_file(self, fingerprint: str, kernel: str, identity: str) -> KernelFile:
        """The file of one kernel identity on one device; ValueError for a fingerprint or identity
        that is not a plain name (from a bundle, say), which could name a path outside the root."""
        path = self.root / check_name(fingerprint, "device fingerprint") / f"{check_name(identity, 'kernel identity')}.json"
        return KernelFile(path, {"fingerprint": fingerprint, "kernel": kernel, "identity": identity})

    def files(self, fingerprint: str | None = None, kernel: str | None = None) -> list[KernelFile]:
        out = []
        if not self.root.is_dir():
            return out
        for fp_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if fingerprint is not None and fp_dir.name != fingerprint:
                continue
            for path in sorted(fp_dir.glob("*.json")):
                name = _kernel_name(path)
                if kernel is not None and name != kernel:
                    continue
                # the identity is the file's name (what a tuner looks for), never a value read from it
                out.append(KernelFile(path, {"fingerprint": fp_dir.name, "kernel": name, "identity": path.stem}))
        return out

    def export(self, path: str | os.PathLike, fingerprint: str | None = None, kernel: str | None = None) -> int:
        """Write every matching file into one bundle; returns the number of entries."""
        files = [f.to_dict() for f in self.files(fingerprint, kernel)]
        _write_json_atomic(Path(path), {"format": BUNDLE_FORMAT, "files": files})
        return sum(len(f["entries"]) for f in files)

    def import_bundle(self, path: str | os.PathLike,
                      check: Callable[[dict, str, dict], str | None] | None = None) -> tuple[int, list[str]]:
        """Merge a bundle (from export) into this cache, keeping the faster of two entries.

        check: (kernel file of the bundle, key, entry) -> why the entry is not valid, or None
        (the command passes the registered tuner's check). Returns (entries imported, what was
        skipped and why); a bundle that is not one at all is a ValueError."""
        count, skipped = 0, []
        files, problems = read_bundle(path)
        skipped += problems
        for f in files:
            entries = {}
            for key, entry in f["entries"].items():
                why = check(f, key, entry) if check is not None else None
                if why is None:
                    entries[key] = entry
                else:
                    skipped.append(f"{f['fingerprint']}/{f['identity']} key {key}: {why}")
            if entries:
                keep = (lambda k, e: check(f, k, e) is None) if check is not None else None
                # the kernel's name from its identity, never the bundle's own field: a renamed
                # one would rename the file's kernel for show, export and clear --kernel
                kernel = identity_kernel(f["identity"])
                self.kernel_file(f["fingerprint"], kernel, f["identity"]).update(entries, keep)
                count += len(entries)
        return count, skipped

    def clear(self, kernel: str | None = None) -> int:
        """Delete the kernel files (of one kernel, or all) and the temp files that writers killed
        mid-write left; returns the number of kernel files removed. OSError after trying them all
        if some could not be removed."""
        removed, failed = 0, []
        for f in self.files(kernel=kernel):
            try:
                with f._lock:
                    f.path.unlink(missing_ok=True)
                removed += 1
            except OSError as e:
                failed.append(f"{f.path}: {e.strerror or e}")
        if self.root.is_dir():
            for fp_dir in (p for p in self.root.iterdir() if p.is_dir()):
                for tmp in fp_dir.glob(".*.json.*.tmp"):
                    target = fp_dir / _temp_target(tmp)
                    if kernel is None or _kernel_name(target, read=False) == kernel:
                        try:
                            with FileLock(str(target) + ".lock", timeout=120):
                                tmp.unlink(missing_ok=True)
                        except OSError as e:
                            failed.append(f"{tmp}: {e.strerror or e}")
        if failed:
            raise OSError(f"could not remove {len(failed)} file(s): " + "; ".join(failed))
        return removed


def _kernel_name(path: Path, read: bool = True) -> str:
    """The kernel a cache file belongs to: its header's, if it is a plain name, else the file's
    name less the "-<source hash>-v<version>" of the identity."""
    data = (_read_json(path, quiet=True) or {}) if read else {}
    name = data.get("kernel")
    return name if is_plain_name(name) else identity_kernel(path.stem)


def _temp_target(tmp: Path) -> str:
    """The file a temp file of _write_json_atomic was to replace: ".<name>.<random>.tmp" -> <name>."""
    return tmp.name[1:-len(".tmp")].rsplit(".", 1)[0]


def remove_temp_files(path: Path) -> None:
    """Delete the temp files left for `path` by writers that died before renaming them. Call it
    holding the file's lock: a live writer writes its temp file only under that lock."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _temp_target(tmp) == path.name:
            tmp.unlink(missing_ok=True)


def sort_entries(entries: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """(the well-formed entries, key -> why for each malformed one): see entry_problem."""
    good, bad = {}, {}
    for key, entry in entries.items():
        why = entry_problem(key, entry)
        if why is None:
            good[key] = entry
        else:
            bad[key] = why
    return good, bad


def well_formed(entries: dict, origin: Any) -> dict[str, dict]:
    """The entries that are well formed (entry_problem), each other one left out with a warning."""
    good, bad = sort_entries(entries)
    for key, why in bad.items():
        warn_once((str(origin), key, "malformed"), f"autotune: {origin}: skipping entry {key}: {why}")
    return good


def read_bundle(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The kernel files of a bundle, each with its well-formed entries, and what was left out
    and why (a kernel file without plain names or an entries object, a malformed entry).
    Raises ValueError for something that is not a bundle at all."""
    data = _read_json(Path(path), quiet=True)
    if data is None or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("files"), list):
        raise ValueError(f"{path} is not an autotune bundle (written by `autotune export`)")
    files, skipped = [], []
    for i, f in enumerate(data["files"]):
        where = f"{path}: kernel file {i}"
        if not isinstance(f, dict):
            skipped.append(f"{where}: not an object")
            continue
        try:
            for name in ("fingerprint", "identity"):
                check_name(f.get(name), name)
            if not isinstance(f.get("kernel"), str):
                raise ValueError(f"kernel {f.get('kernel')!r} is not a name")
        except ValueError as e:
            skipped.append(f"{where}: {e}")
            continue
        entries = f.get("entries", {})
        if not isinstance(entries, dict):
            skipped.append(f"{where} ({f['identity']}): its entries are a {type(entries).__name__}, not an object")
            continue
        good, bad = sort_entries(entries)
        skipped += [f"{f['fingerprint']}/{f['identity']} key {key}: {why}" for key, why in bad.items()]
        files.append({**f, "entries": good})
    return files, skipped


def _read_json(path: Path, quiet: bool = False) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except RecursionError:  # nested past Python's limit: not a file autotune wrote
        data = None
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file: nothing is stored there
        return None
    except OSError as e:
        if not quiet:
            warn_once(("unusable", str(path.parent.parent)),
                      f"autotune: the cache directory {path.parent.parent} cannot be read ({e.strerror or e}): "
                      f"its tuned configs are not used, and configs tuned now are kept in memory if it "
                      f"cannot be written either")
        return None
    except ValueError as e:
        if not quiet:
            warn_once((str(path), "unreadable", str(e)),
                      f"autotune: cache file {path} is unreadable ({e}); it will be rebuilt")
        return None
    if not isinstance(data, dict):
        if not quiet:
            warn_once((str(path), "not an object"), f"autotune: cache file {path} is not a JSON object; "
                                                    f"it will be rebuilt")
        return None
    return data


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
