"""Rank-consistent tuning under torch.distributed.

While a process group of several ranks is initialised, a Tuner in mode "on"
does not tune at first use: it uses its default and queues the key. At
`sync()`, which every rank calls at the same point of the program (after the
first step, say), the ranks pool their queued keys, share them out (key i to
rank i mod world size), tune their share, gather every winner, and all adopt
the same configs. No rank waits on tuning another rank never starts: the only
collectives are inside `sync()`, which all ranks call.
"""

from __future__ import annotations

from typing import Iterable

from .cache import decode_key, encode_key
from .registry import TUNERS
from .tuner import Tuner


def sync(tuners: Iterable[Tuner] | None = None, group=None, strategy: str | None = None,
         max_evals: int | None = None, max_seconds: float | None = None) -> dict[str, int]:
    """Tune every rank's pending keys across the ranks; returns {kernel: keys adopted}."""
    import torch.distributed as dist

    by_name = {t.name: t for t in (tuners if tuners is not None else TUNERS.values())}
    mine = sorted((name, encode_key(k)) for name, t in by_name.items() for k in t.pending)
    if not (dist.is_available() and dist.is_initialized()):
        world, rank, everyone = 1, 0, [mine]
    else:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    todo = sorted(set().union(*map(set, everyone)))
    tuned = {}
    for i, (name, enc) in enumerate(todo):
        if i % world == rank and name in by_name:
            entry = by_name[name].tune(decode_key(enc), strategy=strategy, max_evals=max_evals,
                                       max_seconds=max_seconds, store=False)
            if entry is not None:
                tuned[f"{name}\n{enc}"] = entry
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, tuned, group=group)
    else:
        gathered = [tuned]
    adopted: dict[str, int] = {}
    for part in gathered:
        for item, entry in sorted(part.items()):
            name, enc = item.split("\n", 1)
            if name in by_name:
                by_name[name].adopt(decode_key(enc), entry, store=True)
                adopted[name] = adopted.get(name, 0) + 1
    for (name, enc) in todo:  # a key no rank could tune keeps its default, on every rank
        if name in by_name:
            by_name[name].pending.discard(decode_key(enc))
    return adopted
