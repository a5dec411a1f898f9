"""``attnstore inspect --verify``: read every stored object of a store and list the damaged rows.

Each chunk (or shard) of every array is fetched and checked as :class:`~attnstore.store.integrity.CheckedStore`
checks it on a read (absent, truncated, checksum, blosc frame); nothing is decoded into arrays, so a
damaged chunk can never crash the check. Chunks holding only uncommitted rows (a killed run's tail) are
not damage, whatever their state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnstore import schema as S
from attnstore.store.integrity import ArrayInfo, CheckedStore
from attnstore.store.location import Location, Source, locate

BATCH = 64  # objects fetched concurrently


@dataclass(frozen=True)
class Damage:
    """One damaged object: its array and key, its rows in words, what is wrong, and the (episode, rollout)
    of the committed inference rows it holds."""

    array: str
    key: str
    rows: str
    problem: str
    inferences: tuple[tuple[int, int, int | None], ...] = ()  # (row, episode, rollout or None: unknown)


@dataclass
class VerifyReport:
    store: str
    objects: int = 0
    arrays: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def text(self) -> str:
        """The ``Integrity`` section of ``attnstore inspect --verify``."""
        out = ["Integrity (every chunk read and checked)",
               f"  checked:      {self.objects} chunks of {self.arrays} arrays"]
        if self.ok:
            out.append("  damaged:      none")
            return "\n".join(out)
        rows = sorted({r for d in self.damaged for r in d.inferences})
        out.append(f"  damaged:      {len(self.damaged)} chunk(s), {len(rows)} committed inference row(s)")
        out.extend(f"    {d.array}: {d.rows}: {d.problem}" for d in self.damaged)
        if rows:
            shown = ", ".join(_label(r) for r in rows[:40]) + (" ..." if len(rows) > 40 else "")
            out.append(f"  damaged (episode, rollout): {shown}")
        return "\n".join(out)


def verify_store(source: Source | Location, storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check every object of every array of the store; the report lists what is damaged."""
    import zarr
    from zarr.core.sync import sync

    from attnstore.store.open import read_spec

    loc = locate(source, storage_options)
    read_spec(loc)  # a one-line error for what is not an attnstore store
    root = loc.read_json("zarr.json") or {}
    store: CheckedStore = loc.store()
    store.arm(bool(root.get("consolidated_metadata")))
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    report = VerifyReport(loc.name)
    for name, arr in sorted(group.arrays()):
        meta = arr.metadata.to_dict()
        info = ArrayInfo.from_metadata(name, meta)
        report.arrays += 1
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        grid = [range(math.ceil(n / c)) for n, c in zip(info.shape, info.chunks)]
        coords = list(itertools.product(*grid))
        for start in range(0, len(coords), BATCH):
            part = coords[start:start + BATCH]
            keys = [chunk_key(name, c, sep) for c in part]
            datas = sync(_fetch(store, keys))
            report.objects += len(part)
            for key, c, data in zip(keys, part, datas):
                problem = store.verdict(info, c, data, None)
                rows = info.rows(c)
                if problem and store.matters(info, c, rows):
                    report.damaged.append(Damage(name, key, store.rows.describe(info, rows), problem,
                                                 _inferences(store, info, rows)))
    return report


def chunk_key(name: str, coords: tuple[int, ...], sep: str = "/") -> str:
    """The default v3 chunk key.

    >>> chunk_key("attention", (3, 0, 0)), chunk_key("episode", (2,), "."), chunk_key("scalar", ())
    ('attention/c/3/0/0', 'episode/c.2', 'scalar/c')
    """
    return f"{name}/c{sep}{sep.join(str(i) for i in coords)}" if coords else f"{name}/c"


async def _fetch(store: CheckedStore, keys: list[str]) -> list[Any]:
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    return list(await asyncio.gather(*(store._store.get(k, proto) for k in keys)))


def _inferences(store: CheckedStore, info: ArrayInfo, rows: range) -> tuple[tuple[int, int, int | None], ...]:
    """(row, episode, rollout) of the committed inference rows among ``rows`` (rollout None: unreadable)."""
    episode, rollout = store.rows.episode, store.rows.rollout
    if info.axis != S.INFERENCE or episode is None:
        return ()
    out = []
    for row in rows:
        if row < episode.size and episode[row] != S.UNCOMMITTED:
            ro = int(rollout[row]) if rollout is not None and row < rollout.size else None
            out.append((row, int(episode[row]), ro))
    return tuple(out)


def _label(row: tuple[int, int, int | None]) -> str:
    """``(episode, rollout)`` of a damaged row.

    >>> _label((7, 2, 3)), _label((7, 2, None))
    ('(2, 3)', '(2, ?)')
    """
    return f"({row[1]}, {'?' if row[2] is None else row[2]})"
