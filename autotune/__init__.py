"""A general autotuner for Triton kernels, with a persistent per-GPU cache.

Config (data), Space (candidates and pruning), strategies (ask/tell), timers,
a process-safe cache, Tuner (key -> config), `override` (tuner settings for a
`with` block), `settings` (the environment variables read) and the `autotune`
command.
"""

from . import settings
from .cache import CacheDir
from .config import Config
from .decorator import autotune
from .device import device_fingerprint, device_properties
from .registry import TunableOp, override, register, register_tuner
from .search import DEFAULT_STRATEGY, STRATEGIES, make_strategy
from .space import ConfigList, Space
from .timing import GPUTimer, Timing, WallClockTimer
from .tuner import Tuner, bucket, default_mode

__all__ = [
    "CacheDir", "Config", "ConfigList", "DEFAULT_STRATEGY", "GPUTimer", "STRATEGIES", "Space", "Timing", "TunableOp", "Tuner",
    "WallClockTimer", "autotune", "bucket", "default_mode", "device_fingerprint", "device_properties",
    "make_strategy", "override", "register", "register_tuner", "settings",
]
