"""What the cache trusts: configs from every source are checked against the kernel's Space,
malformed files and entries are skipped, a cache directory that cannot be used never fails
an op call, bundles cannot write outside the cache, and stale temp files do not pile up."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import autotune
import tritonops
from autotune import CacheDir, Config, ConfigList, Space, Tuner
from autotune import cli
from autotune.cache import FORMAT, encode_key
from tritonops.testing import assert_close
from tritonops.tuning.matmul import MATMUL_TUNER, matmul_call_keys, matmul_heuristic

from .test_autotune import BEST, CountingTimer, make_tuner

SHAPE = (32, 40, 48)  # M, N, K of the call below: a (32, 48) @ b (48, 40)
KEY = matmul_call_keys(*SHAPE, "float32")[0]
GOOD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 2,
        "host": {"TMA": False, "SPLIT_K": 1, "EPILOGUE_SUBTILE": False}}


def _winner(**changes):
    out = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
           "host": dict(GOOD["host"])}
    for name, value in changes.items():
        if value is _DROP:
            out.pop(name)
        else:
            out[name] = value
    return out


_DROP = object()

# Winners no Space value list allows: each must be skipped, never launched, never a crash.
BAD_WINNERS = {
    "BLOCK_M=-1": _winner(BLOCK_M=-1), "BLOCK_M=0": _winner(BLOCK_M=0), "BLOCK_M=48": _winner(BLOCK_M=48),
    "BLOCK_M=2**20": _winner(BLOCK_M=2 ** 20), "BLOCK_M='64'": _winner(BLOCK_M="64"),
    "BLOCK_M=true": _winner(BLOCK_M=True), "BLOCK_M=64.5": _winner(BLOCK_M=64.5),
    "BLOCK_M=16.0": _winner(BLOCK_M=16.0), "BLOCK_M=null": _winner(BLOCK_M=None), "BLOCK_M={}": _winner(BLOCK_M={}),
    "no BLOCK_M": _winner(BLOCK_M=_DROP), "num_warps=1024": _winner(num_warps=1024),
    "num_warps=0": _winner(num_warps=0), "num_warps=-4": _winner(num_warps=-4),
    "num_warps='4'": _winner(num_warps="4"), "num_warps=4.5": _winner(num_warps=4.5),
    "num_stages=0": _winner(num_stages=0), "BLOCK_K=8": _winner(BLOCK_K=8), "GROUP_M=0": _winner(GROUP_M=0),
    "extra field": _winner(SPLIT_K=2), "host group": _winner(host={"PROGRAMS_PER_SM": 2}),
}
# Entries that are not entries at all.
MALFORMED = {"string": "x", "no winner": {"timing": {"p50": 1.0}}, "winner a list": {"winner": [1, 2]},
             "winner null": {"winner": None}, "list": [1, 2, 3], "timings not a list": {"winner": GOOD, "timings": 5}}


def _cache_file(root: Path, tuner: Tuner) -> Path:
    return CacheDir(root).kernel_file(tuner.fingerprint(), tuner.name, tuner.identity).path


def _write_entries(root: Path, tuner: Tuner, entries: dict) -> Path:
    path = _cache_file(root, tuner)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "fingerprint": tuner.fingerprint(), "kernel": tuner.name, "identity": tuner.identity}
    path.write_text(json.dumps({**header, "entries": entries}))
    return path


def _matmul(m=SHAPE[0], n=SHAPE[1], k=SHAPE[2]):
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = tritonops.matmul(a, b)
    assert_close(out, a.double() @ b.double(), a @ b)
    return out


def test_a_valid_stored_winner_is_used(tmp_path):
    """The other tests' 'skipped' means something: a valid non-default winner is taken."""
    assert Config.from_dict(GOOD) != matmul_heuristic(KEY)
    _write_entries(tmp_path, MATMUL_TUNER, {encode_key(KEY): {"winner": GOOD}})
    with MATMUL_TUNER.override(cache_dir=tmp_path, mode="cached"), warnings.catch_warnings():
        warnings.simplefilter("error")
        _matmul()
        assert MATMUL_TUNER.sources[KEY] == "user-cache" and MATMUL_TUNER.select(KEY) == Config.from_dict(GOOD)


@pytest.mark.parametrize("name", list(BAD_WINNERS) + [f"malformed: {m}" for m in MALFORMED])
def test_invalid_stored_entries_are_skipped_with_one_warning(tmp_path, name):
    entry = {"winner": BAD_WINNERS[name]} if name in BAD_WINNERS else MALFORMED[name.removeprefix("malformed: ")]
    path = _write_entries(tmp_path, MATMUL_TUNER, {encode_key(KEY): entry})
    with MATMUL_TUNER.override(cache_dir=tmp_path, mode="cached"):
        with pytest.warns(RuntimeWarning) as caught:
            _matmul()
        messages = [str(w.message) for w in caught if str(path) in str(w.message)]
        assert len(messages) == 1 and encode_key(KEY) in messages[0], [str(w.message) for w in caught]
        assert MATMUL_TUNER.sources[KEY] == "default"
        with warnings.catch_warnings():  # the same file read again: no second warning
            warnings.simplefilter("error")
            MATMUL_TUNER.reset()
            _matmul()
        # the nearest-key lookup does not carry the entry to other shapes either
        near = matmul_call_keys(64, 40, 48, "float32")[0]
        _matmul(64)
        assert MATMUL_TUNER.sources[near] == "default"


def test_the_nearest_key_only_lends_configs_that_suit_the_key(tmp_path):
    big = matmul_call_keys(256, 40, 48, "float32")[0]
    wide = dict(GOOD, BLOCK_M=128, num_warps=8)  # valid for M=256, past M=32
    _write_entries(tmp_path, MATMUL_TUNER, {encode_key(big): {"winner": wide}})
    with MATMUL_TUNER.override(cache_dir=tmp_path, mode="cached"):
        assert MATMUL_TUNER.select(matmul_call_keys(200, 40, 48, "float32")[0]) == Config.from_dict(wide)
        assert MATMUL_TUNER.select(KEY) == matmul_heuristic(KEY)


@pytest.mark.parametrize("bad_key", ["garbage", "5", '{"M": 32}', '[[1], 2]', encode_key((1, 2))])
def test_a_bad_key_in_the_file_spoils_nothing_else(tmp_path, bad_key):
    near = matmul_call_keys(64, 40, 48, "float32")[0]
    path = _write_entries(tmp_path, MATMUL_TUNER, {bad_key: {"winner": GOOD}, encode_key(near): {"winner": GOOD}})
    with MATMUL_TUNER.override(cache_dir=tmp_path, mode="cached"):
        with pytest.warns(RuntimeWarning, match="skipping"):
            _matmul()  # untuned: the nearest key's winner
        assert MATMUL_TUNER.sources[KEY] == "nearest" and MATMUL_TUNER.select(KEY) == Config.from_dict(GOOD)
    assert bad_key in json.loads(path.read_text())["entries"]  # reading never rewrites the file


def test_keys_must_have_their_fields_types():
    MATMUL_TUNER.make_key(tuple(KEY))
    for i, bad in [(0, "32"), (0, 32.0), (0, True), (3, 16), (4, 1)]:
        values = list(KEY)
        values[i] = bad
        with pytest.raises(ValueError, match="field"):
            MATMUL_TUNER.make_key(values)


def test_shipped_and_adopted_configs_are_checked(tmp_path):
    good, bad = (7,), (8,)
    tuning = make_tuner(tmp_path / "tuning")
    tuning.tune(good)
    path = _cache_file(tmp_path / "tuning", tuning)
    data = json.loads(path.read_text())
    entry = data["entries"][encode_key(good)]
    # a faster invalid entry for the same key in a second bundle must not displace the valid one
    data["entries"][encode_key(bad)] = {**entry, "winner": {"BLOCK": 3, "SPLIT": 1, "num_warps": 4, "num_stages": 1}}
    bundle = tmp_path / "shipped.json"
    CacheDir(tmp_path / "tuning").export(bundle)
    doctored = json.loads(bundle.read_text())
    doctored["files"][0]["entries"] = data["entries"]
    bundle.write_text(json.dumps(doctored))
    faster = json.loads(bundle.read_text())
    faster["files"][0]["entries"][encode_key(good)] = {
        **entry, "winner": {"BLOCK": 64, "SPLIT": 9, "num_warps": 4, "num_stages": 2}, "timing": {"p50": 1e-6}}
    bundle2 = tmp_path / "shipped2.json"
    bundle2.write_text(json.dumps(faster))
    shipped = make_tuner(tmp_path / "user", mode="cached", shipped=[bundle, bundle2])
    with pytest.warns(RuntimeWarning, match="skipping"):
        assert shipped.select(good) == BEST and shipped.sources[good] == "shipped"
    assert shipped.select(bad) == BEST and shipped.sources[bad] == "nearest"  # key 7's, not its own
    # another rank's entry is checked as a file's is
    other = make_tuner(tmp_path / "rank")
    with pytest.warns(RuntimeWarning, match="not adopting"):
        assert other.adopt((9,), {"winner": {"BLOCK": -1, "SPLIT": 1}}) == other.default((9,))
    assert not _cache_file(tmp_path / "rank", other).exists()


def test_bad_timing_records_are_not_reused(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.tune((5,))
    path = _cache_file(tmp_path, tuner)
    data = json.loads(path.read_text())
    data["entries"][encode_key((5,))]["timings"] += ["x", {"config": "y"}, {"config": {"BLOCK": -1}},
                                                     {"config": BEST.to_dict(), "timing": {"p50": "fast"}}]
    path.write_text(json.dumps(data))
    timer = CountingTimer()
    entry = make_tuner(tmp_path, timer).tune((5,))
    assert Config.from_dict(entry["winner"]) == BEST and not timer.calls  # every good record reused


def test_a_bad_stored_entry_never_outlives_a_good_new_one(tmp_path):
    tuner = make_tuner(tmp_path)
    path = _write_entries(tmp_path, tuner, {encode_key((5,)): {
        "winner": {"BLOCK": 3, "SPLIT": 1, "num_warps": 4, "num_stages": 1}, "timing": {"p50": 1e-9}}})
    with pytest.warns(RuntimeWarning, match="skipping"):
        assert tuner.select((5,)) == BEST and tuner.sources[(5,)] == "tuned"
    assert json.loads(path.read_text())["entries"][encode_key((5,))]["winner"] == BEST.to_dict()


def test_space_check_names_what_is_wrong():
    space = Space({"BLOCK": [16, 32, 64], "SPLIT": [1, 2]}, num_warps=[4, 8], num_stages=[1, 2],
                  dot_params=["BLOCK"], constraints=[lambda c, p: c["BLOCK"] * c["SPLIT"] <= 64])
    ok = Config({"BLOCK": 32, "SPLIT": 2}, num_warps=4, num_stages=1)
    assert space.check(ok) is None
    for config, words in [(ok.replace(BLOCK=48), "not one of"), (ok.replace(BLOCK=32.0), "not one of"),
                          (ok.replace(BLOCK=True), "not one of"), (ok.replace(EXTRA=1), "unknown"),
                          (Config({"BLOCK": 32}), "missing"), (ok.replace(num_warps=16), "num_warps"),
                          (ok.replace(BLOCK=64), "rule")]:
        assert words in space.check(config), config
    assert "more threads" in Space({"B": [1]}, num_warps=[64]).check(Config({"B": 1}, num_warps=64),
                                                                     limits={"max_shared_mem": 1})
    listed = ConfigList([Config({"BLOCK": 16}, num_warps=4), Config({"BLOCK": 64, "SPLIT": 2}, num_warps=8)])
    assert listed.check(Config({"BLOCK": 64, "SPLIT": 2}, num_warps=8)) is None
    for config in [Config({"BLOCK": 64}, num_warps=4), Config({"BLOCK": 64, "SPLIT": 2}, num_warps=4),
                   Config({"BLOCK": 16.0}, num_warps=4)]:  # listed values, never a listed config
        assert "not one of the listed" in listed.check(config)

    def overflowing(config, problem):
        raise OverflowError("cannot convert float infinity to integer")

    assert "cannot judge" in Space({"B": [1]}, constraints=[overflowing]).check(Config({"B": 1}))
    for data in [{"BLOCK": 16, "num_warps": "4"}, {"BLOCK": 16, "num_stages": 2.5}, {"BLOCK": 16, "num_warps": True}]:
        with pytest.raises(ValueError):
            Config.from_dict(data)


# --------------------------------------------------------------------------- import and bundles


def _cli(monkeypatch, capsys, cache, *args):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(cache))
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def _bundle(tmp_path, files) -> Path:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"format": "autotune-bundle-1", "files": files}))
    return path


def _matmul_file(entries, **header):
    return {"fingerprint": MATMUL_TUNER.fingerprint(), "kernel": "matmul", "identity": MATMUL_TUNER.identity,
            "format": FORMAT, "entries": entries, **header}


def test_import_checks_every_entry_and_fails_when_it_skips(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    entries = {encode_key(KEY): {"winner": GOOD}, encode_key(KEY._replace(M=64)): {"winner": _winner(BLOCK_M=-1)},
               encode_key(KEY._replace(M=128)): "x", "garbage": {"winner": GOOD}}
    code, out = _cli(monkeypatch, capsys, cache, "import", str(_bundle(tmp_path, [_matmul_file(entries)])))
    assert code == 1 and "imported 1 entry" in out and "skipped 3" in out and "BLOCK_M = -1" in out
    with MATMUL_TUNER.override(cache_dir=cache, mode="cached"):
        assert list(MATMUL_TUNER.user_entries()) == [encode_key(KEY)]
    good = _bundle(tmp_path, [_matmul_file({encode_key(KEY): {"winner": GOOD}})])
    assert _cli(monkeypatch, capsys, cache, "import", str(good))[0] == 0


@pytest.mark.parametrize("files", [
    [_matmul_file("notadict")], [_matmul_file([1, 2])], ["x"], [_matmul_file({}, identity=None)],
    [_matmul_file({}, kernel=5)]])
def test_import_of_a_malformed_kernel_file_is_a_report(tmp_path, monkeypatch, capsys, files):
    code, out = _cli(monkeypatch, capsys, tmp_path / "cache", "import", str(_bundle(tmp_path, files)))
    assert code == 1 and "skipped 1" in out and "Traceback" not in out


@pytest.mark.parametrize("field, value", [("fingerprint", "../../escape"), ("fingerprint", "a/b"),
                                          ("identity", "ABSOLUTE"), ("identity", "../escaped"),
                                          ("fingerprint", ".."), ("identity", "")])
def test_a_bundle_cannot_write_outside_the_cache(tmp_path, monkeypatch, capsys, field, value):
    cache = tmp_path / "deep" / "cache"
    value = str(tmp_path / "escaped") if value == "ABSOLUTE" else value
    bundle = _bundle(tmp_path, [_matmul_file({encode_key(KEY): {"winner": GOOD}}, **{field: value})])
    before = sorted(p for p in tmp_path.rglob("*"))
    code, out = _cli(monkeypatch, capsys, cache, "import", str(bundle))
    assert code == 1 and "not a plain name" in out
    assert sorted(p for p in tmp_path.rglob("*") if not str(p).startswith(str(cache))) == before
    with pytest.raises(ValueError, match="plain name"):
        CacheDir(cache).kernel_file(*(["../x", "k", "id"] if field == "fingerprint" else ["fp", "k", "/abs"]))


@pytest.mark.parametrize("name", ["a" * 201, "\u00e9" * 101, "\ud800", "gpu.", "gpu ", "a<b", "a|b", "a?b", "C:x",
                                  "a\\b", ".x", "a..b", "a\nb", ""])
def test_names_that_are_no_plain_file_name(name):
    with pytest.raises(ValueError, match="plain name"):
        CacheDir("/nonexistent").kernel_file(name, "k", "id")
    assert CacheDir("/nonexistent").kernel_file("nvidia-h100-80gb-hbm3-sm90-triton3.6", "k", "my kernel-1-v1")


# --------------------------------------------------------------------------- unusable cache directories


def test_a_cache_dir_that_is_a_file_never_fails_a_call(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    tuner = make_tuner(not_a_dir)
    with pytest.warns(RuntimeWarning, match="cannot be written") as caught:
        assert tuner.select((5,)) == BEST and tuner.sources[(5,)] == "tuned"
        assert tuner.select((6,)) == BEST
    assert len(caught) == 1  # one warning for the directory, however many keys
    op_dir = tmp_path / "op-file"
    op_dir.write_text("")
    monkeypatch.setenv("TRITONOPS_CACHE_DIR", str(op_dir))
    for name in autotune.settings.variables("cache_dir")[:-1]:  # the variables read before tritonops' own
        monkeypatch.delenv(name, raising=False)
    with MATMUL_TUNER.override(mode="on", max_evals=2), pytest.warns(RuntimeWarning, match="cannot be written"):
        _matmul()  # tuned in memory
        assert MATMUL_TUNER.sources[KEY] == "tuned"


def test_a_read_only_cache_dir_never_fails_a_call(tmp_path, monkeypatch):
    """A directory the user may not write (simulated: this suite may run as root)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    tuner = make_tuner(tmp_path)
    monkeypatch.setattr(autotune.cache.tempfile, "mkstemp", refuse)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        assert tuner.select((5,)) == BEST
    assert tuner.select((5,)) == BEST and not list(tmp_path.rglob("*.json"))


def test_the_command_reports_an_unusable_cache_without_a_traceback(tmp_path, monkeypatch, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code, out = _cli(monkeypatch, capsys, not_a_dir, "tune", "matmul", "--shapes", "16x16x16", "--quiet")
    assert code == 2 and "cannot be written" in out and "Traceback" not in out
    assert _cli(monkeypatch, capsys, not_a_dir, "clear")[0] == 0
    cache = tmp_path / "cache"
    make_tuner(cache).tune((5,))
    monkeypatch.setattr(Path, "unlink", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    code, out = _cli(monkeypatch, capsys, cache, "clear")
    assert code == 2 and "could not remove" in out and "Traceback" not in out


# --------------------------------------------------------------------------- temp files of killed writers


def _stale_temp(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.k1ll3d_x.tmp"
    tmp.write_text('{"format": "autotune-cache-1", "entr')  # what a writer killed mid-write leaves
    return tmp


def test_stale_temp_files_go_at_the_next_write_and_at_clear(tmp_path, monkeypatch, capsys):
    tuner = make_tuner(tmp_path)
    target = _cache_file(tmp_path, tuner)
    other = target.parent / "other-0123456789abcdef-v1.json"
    stale, stale_other = _stale_temp(target), _stale_temp(other)
    tuner.tune((5,))
    assert not stale.exists() and stale_other.exists()  # only the written file's own
    code, out = _cli(monkeypatch, capsys, tmp_path, "clear", "--kernel", "synthetic")
    assert code == 0 and stale_other.exists() and not target.exists()
    assert _cli(monkeypatch, capsys, tmp_path, "clear")[0] == 0
    assert not stale_other.exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


# --------------------------------------------------------------------------- what merely looks valid


def test_a_loose_copy_of_the_default_is_not_the_default(tmp_path):
    """64.0 == 64 and true == 1 in Python: the default's values with other types are skipped."""
    default = matmul_heuristic(KEY).to_dict()
    for name, value in [("BLOCK_M", float(default["BLOCK_M"])), ("GROUP_M", 8.0), ("BLOCK_K", True)]:
        MATMUL_TUNER.reset()
        path = _write_entries(tmp_path / name, MATMUL_TUNER, {encode_key(KEY): {"winner": {**default, name: value}}})
        with MATMUL_TUNER.override(cache_dir=tmp_path / name, mode="cached"):
            with pytest.warns(RuntimeWarning, match=str(path)):
                _matmul()
            assert MATMUL_TUNER.sources[KEY] == "default"
    assert Config({"B": 64}) != Config({"B": 64.0}) != Config({"B": True})


@pytest.mark.parametrize("p50", [float("nan"), -1.0, 10 ** 400, "0", True, None])
def test_a_stored_time_that_is_no_time_never_wins(tmp_path, p50):
    tuner = make_tuner(tmp_path)
    slow = {"BLOCK": 256, "SPLIT": 4, "num_warps": 8, "num_stages": 3}
    text = json.dumps({"format": FORMAT, "fingerprint": tuner.fingerprint(), "kernel": tuner.name,
                       "identity": tuner.identity, "entries": {encode_key((5,)): {
                           "winner": slow, "timing": {"p50": p50}, "timings": [{"config": slow, "timing": {"p50": p50}}]}}})
    path = _cache_file(tmp_path, tuner)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    entry = make_tuner(tmp_path).tune((5,))
    assert Config.from_dict(entry["winner"]) == BEST
    assert json.loads(path.read_text())["entries"][encode_key((5,))]["winner"] == BEST.to_dict()
    bundle = tmp_path / "b.json"
    CacheDir(tmp_path).export(bundle)
    data = json.loads(bundle.read_text())
    data["files"][0]["entries"][encode_key((5,))]["timing"] = {"p50": p50}
    data["files"].append(data["files"][0])  # the same key twice: their times are compared
    bundle.write_text(json.dumps(data))
    assert make_tuner(tmp_path / "empty", mode="cached", shipped=[bundle]).select((5,)) == BEST


def test_import_checks_another_devices_entries_by_names_and_values_only(tmp_path, monkeypatch, capsys):
    """The rules (registers, warps per tile, SM counts) and limits are the other device's."""
    spills_here = dict(GOOD, BLOCK_M=256, BLOCK_N=256)  # valid values; past the accumulator rule
    assert MATMUL_TUNER.entry_problem(encode_key(KEY._replace(M=256, N=256)), {"winner": spills_here})
    entries = {encode_key(KEY._replace(M=256, N=256)): {"winner": spills_here}}
    other = _bundle(tmp_path, [_matmul_file(entries, fingerprint="other-gpu-sm80-triton3.6")])
    assert _cli(monkeypatch, capsys, tmp_path / "a", "import", str(other))[0] == 0
    here = _bundle(tmp_path, [_matmul_file(entries)])
    code, out = _cli(monkeypatch, capsys, tmp_path / "b", "import", str(here))
    assert code == 1 and "_accumulator_fits" in out
    bad = _bundle(tmp_path, [_matmul_file({encode_key(KEY): {"winner": _winner(BLOCK_M=48)}},
                                          fingerprint="other-gpu-sm80-triton3.6")])
    assert _cli(monkeypatch, capsys, tmp_path / "c", "import", str(bad))[0] == 1


def test_import_finds_the_tuner_by_identity_not_by_the_kernel_field(tmp_path, monkeypatch, capsys):
    renamed = _matmul_file({encode_key(KEY): {"winner": _winner(BLOCK_M=-1)},
                            encode_key(KEY._replace(M=64)): {"winner": GOOD}}, kernel="not-matmul")
    code, out = _cli(monkeypatch, capsys, tmp_path / "cache", "import", str(_bundle(tmp_path, [renamed])))
    assert code == 1 and "BLOCK_M = -1" in out
    # the file keeps the kernel's own name: show, export and clear --kernel still find it
    assert [f.header["kernel"] for f in CacheDir(tmp_path / "cache").files(kernel="matmul")] == ["matmul"]


def test_show_and_lookups_survive_odd_values(tmp_path, monkeypatch, capsys):
    tuner = make_tuner(tmp_path)
    path = _write_entries(tmp_path, tuner, {encode_key((5,)): {"winner": BEST.to_dict(), "timing": "fast"},
                                            encode_key((6,)): {"winner": BEST.to_dict(), "timing": {"p50": "x"}}})
    code, out = _cli(monkeypatch, capsys, tmp_path, "show")
    assert code == 0 and "Traceback" not in out and out.count("inf ms") == 2
    path.write_text("[" * 100000 + "]" * 100000)  # nested past Python's recursion limit
    with pytest.warns(RuntimeWarning, match="not a JSON object|unreadable"):
        assert make_tuner(tmp_path, mode="cached").select((5,)) == make_tuner(tmp_path).default((5,))


def test_names_with_spaces_and_keys_with_tuples(tmp_path):
    """A plain name may hold spaces; a key field may be a tuple (a decorator key over a tuple
    argument): both round-trip through the file."""
    tuner = Tuner("my kernel", Space({"B": [1, 2]}, num_warps=[4], num_stages=[1]),
                  lambda key: Config({"B": 1}, num_warps=4, num_stages=1),
                  runner=lambda key: (lambda config: torch.ones(1)), timer=CountingTimer(lambda c: c["B"]),
                  cache_dir=tmp_path, mode="on", strategy="exhaustive")
    key = (8, (2, 3), "float16")
    tuner.tune(key)
    again = Tuner("my kernel", tuner.space, tuner.default, cache_dir=tmp_path, mode="cached")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert again.select(key) == Config({"B": 1}, num_warps=4, num_stages=1)
        assert again.sources[key] == "user-cache"


def test_a_trace_key_with_a_tuple_field(tmp_path, monkeypatch):
    from autotune.registry import TUNERS

    tuner = make_tuner(tmp_path)
    monkeypatch.setitem(TUNERS, tuner.name, tuner)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"kernel": tuner.name, "key": [8, [2, 3]]}) + "\n"
                     + json.dumps({"kernel": tuner.name, "key": [8, [2, 3]]}) + "\n")
    assert cli._jobs_from_trace(str(trace)) == [(tuner.name, (8, (2, 3)))]
    trace.write_text(json.dumps({"kernel": tuner.name, "key": [8, {"x": 1}]}) + "\n")
    with pytest.raises(SystemExit, match="not a trace line"):
        cli._jobs_from_trace(str(trace))
