"""A Tuner's identity (the cache file's name) covers every JIT function its kernels call.

Each version of a small kernel package is written under its own package name, so each
import is a fresh one (no module, bytecode or line cache of an older version is reused);
the packages import their parts relatively, so versions differ only where edited.
"""

import hashlib
import importlib
import json
import os
import subprocess
import sys
import types

import pytest

from autotune import Config, Space, Tuner
from autotune.tuner import source_hash

COMMON = '''
import triton
import triton.language as tl

FACTOR = tl.constexpr({factor})


@triton.jit
def scale(x):
    return x * {scale}


@triton.jit
def scaled_by_factor(x):
    return x * FACTOR


@triton.jit
def unrelated(x):
    return x + {unrelated}
'''

KERNELS = '''
import triton
import triton.language as tl

from . import common


@triton.jit
def _inner(x):
    return x - {inner}


@triton.jit
def helper(x):
    return _inner(x) + {helper}


@triton.jit
def direct_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, helper(tl.load(x_ptr + offs)))


@triton.jit
def attribute_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, common.scale(tl.load(x_ptr + offs)))


@triton.jit
def factor_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, common.scaled_by_factor(tl.load(x_ptr + offs)))


@triton.jit
def unused_here(x):
    return x * {unused}
'''

BASE = {"factor": 2, "scale": 2, "unrelated": 1, "inner": 1, "helper": 3, "unused": 5}
KERNEL_NAMES = ("direct_kernel", "attribute_kernel", "factor_kernel")
SPACE = Space({"BLOCK": [16, 32]}, num_warps=[4], num_stages=[1])


@pytest.fixture
def write_version(tmp_path, monkeypatch):
    """version(name, **edits) -> the kernels module of a fresh package with BASE edited."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def version(name, **edits):
        package = f"jitpkg_{name}"
        values = {**BASE, **edits}
        root = tmp_path / package
        root.mkdir()
        (root / "__init__.py").write_text("")
        (root / "common.py").write_text(COMMON.format(**values))
        (root / "kernels.py").write_text(KERNELS.format(**values))
        importlib.invalidate_caches()
        written.append(package)
        return importlib.import_module(f"{package}.kernels")

    yield version
    for name in [m for m in sys.modules if m.split(".")[0] in written]:
        del sys.modules[name]


def identity(source) -> str:
    return Tuner("k", SPACE, lambda key: Config({"BLOCK": 16}), sources=[source]).identity


def identities(module: types.ModuleType) -> dict:
    return {name: identity(getattr(module, name)) for name in KERNEL_NAMES}


def test_editing_a_called_helper_changes_the_identity(write_version):
    base = identities(write_version("base"))
    assert identities(write_version("same")) == base  # the same code, imported afresh: the same identity
    assert len(set(base.values())) == len(base)

    edits = {
        "helper": {"helper": 4},  # called by name from the same module
        "inner": {"inner": 2},  # called by helper: transitively
        "scale": {"scale": 3},  # called as common.scale, a module attribute
        "factor": {"factor": 3},  # a tl.constexpr global a called helper reads
    }
    changed_kernels = {"helper": {"direct_kernel"}, "inner": {"direct_kernel"}, "scale": {"attribute_kernel"},
                       "factor": {"factor_kernel"}}
    for name, edit in edits.items():
        edited = identities(write_version(name, **edit))
        changed = {k for k in KERNEL_NAMES if edited[k] != base[k]}
        assert changed == changed_kernels[name], (name, changed)


def test_editing_an_uncalled_jit_function_keeps_the_identity(write_version):
    base = identities(write_version("base"))
    assert identities(write_version("unrelated", unrelated=7)) == base  # in the called module
    assert identities(write_version("unused", unused=7)) == base  # in the kernel's own module


def test_a_module_source_covers_the_helpers_it_calls_elsewhere(write_version):
    base = identity(write_version("base"))
    assert identity(write_version("scale", scale=3)) != base  # common.scale is called from the module
    assert identity(write_version("factor", factor=3)) != base
    assert identity(write_version("unrelated", unrelated=7)) == base


def test_wrapped_kernels_strings_and_functions_stay_accepted(write_version):
    module = write_version("base")
    assert source_hash("def kernel(): v1") == hashlib.sha256(b"def kernel(): v1").hexdigest()[:16]
    assert source_hash(identities) == hashlib.sha256(
        importlib.import_module("inspect").getsource(identities).encode()).hexdigest()[:16]

    class Wrapped:  # as triton.autotune / triton.heuristics hold a kernel in .fn
        fn = module.direct_kernel

    assert source_hash(Wrapped()) == source_hash(module.direct_kernel)


IDENTITIES = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from autotune import Config, Space, Tuner
space = Space({"BLOCK": [16, 32]}, num_warps=[4], num_stages=[1])
out = {}
for package in sys.argv[2:]:
    module = importlib.import_module(package + ".kernels")
    kernel = module.direct_kernel
    out[package] = [type(kernel).__name__,
                    Tuner("k", space, lambda key: Config({"BLOCK": 16}), sources=[kernel]).identity]
print(json.dumps(out))
"""


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_the_identity_is_the_same_with_and_without_the_interpreter(write_version, tmp_path, interpret):
    base, helper = write_version("base"), write_version("helper", helper=4)
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    r = subprocess.run([sys.executable, "-c", IDENTITIES, str(tmp_path), "jitpkg_base", "jitpkg_helper"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # `@triton.jit` gives a JITFunction when compiling, an InterpretedFunction under the interpreter
    assert out["jitpkg_base"][0] == ("InterpretedFunction" if interpret == "1" else "JITFunction")
    assert out["jitpkg_base"][1] == identity(base.direct_kernel)
    assert out["jitpkg_helper"][1] == identity(helper.direct_kernel) != out["jitpkg_base"][1]
