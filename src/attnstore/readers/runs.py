"""Which store a reader reads: the store it was given, or one run of a study.

A study is what :func:`attnstore.open_study` reads: a folder or URL holding runs (searched for attnstore
stores), or a glob of them. :func:`pick_run` resolves ``(source, run)`` to one store's
:class:`~attnstore.store.location.Location` and a short name for it, without opening the other runs
(so runs of a study need not share layers to be viewed one by one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnstore.errors import SelectionError
from attnstore.store.location import Location, Source, locate


def pick_run(source: Source, run: str | None = None,
             storage_options: Mapping[str, Any] | None = None) -> tuple[Location, str]:
    """``source`` itself when it is a store, else its run named ``run``; and the name to show for it.

    A study holding a single run needs no ``run``. Errors are one line: ``run`` given for a single
    store, a study of several runs without ``run``, an unknown run (listing the study's runs).
    """
    from attnstore.store.study import discover, run_names

    loc = locate(source, storage_options)
    pattern = loc.store_object is None and any(c in loc.name for c in "*?[")
    if loc.store_object is not None or (not pattern and loc.read_json("zarr.json") is not None):
        if run is not None:
            raise SelectionError(f"--run {run}: {loc.name} is one store, not a study of runs; drop --run")
        return loc, store_name(loc.name)
    locations = discover(loc, dict(loc.storage_options) or None)
    if not locations:  # neither a store nor a study: the store's own message (does not exist, not zarr, ...)
        from attnstore.store.open import read_spec

        if pattern:
            raise SelectionError(f"no attnstore stores match {loc.name}")
        read_spec(loc)
        raise SelectionError(f"no attnstore stores found in {loc.name}")
    names = run_names(locations)
    listed = ", ".join(names)
    if run is None:
        if len(names) == 1:
            return locations[0], names[0].replace("/", "_")
        raise SelectionError(f"{loc.name} is a study of {len(names)} runs ({listed}): choose one with --run R")
    if run not in names:
        raise SelectionError(f"run '{run}' is not in the study {loc.name}: its runs are {listed}")
    return locations[names.index(run)], run.replace("/", "_")


def store_name(name: str) -> str:
    """A store's short name for titles and file names: its last path part without ``.zarr``.

    >>> store_name("s3://lab/runs/run1.zarr/"), store_name("outputs/eval/attention.zarr"), store_name("/")
    ('run1', 'attention', 'attention')
    """
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr") or "attention"
