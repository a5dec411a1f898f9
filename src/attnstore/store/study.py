"""open_study: many runs' stores as one lazy Dataset (a LIBERO study: suites x tasks x episodes, one store per
eval process), on local disk or object storage.

Every run is opened with :func:`~attnstore.store.open.open_attention` (committed rows only, so runs still
writing are read as far as they committed) and the runs are concatenated along ``inference`` and the
per-episode table, with

* ``run`` (the run's name) on the inference axis and ``episode_run`` on the episode table; the inference
  axis is indexed by ``(run, episode, rollout)``;
* per-inference ``task_key`` (``libero_object_3``: task group and id) and ``outcome`` (``success`` /
  ``failure`` / ``unfinished``) joined from each run's episode table, so ``groupby("outcome")`` and
  ``groupby("task_key")`` just work;
* a per-run table on ``run_index`` (policy, policy type, task, task ids, lerobot version, layers, status);
* the runs' specs in ``ds.attrs["attnstore_runs"]`` and the (common) spec as for a single store, so every
  analysis of :mod:`attnstore.readers` works unchanged.

Runs whose capture differs (layers, denoise steps, prefix layers) are refused with a message naming the
difference, unless ``common=True`` keeps only what all runs have; runs with another token layout or head
count are always refused.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.schema import StoreSpec
from attnstore.store.location import Location, Source, describe_failure, locate
from attnstore.store.open import RUN_ATTR, SPEC_ATTR, STATUS_ATTR, open_attention, read_spec

RUN = "run"
EPISODE_RUN = "episode_run"
RUN_INDEX = "run_index"
OUTCOME = "outcome"
TASK_KEY = "task_key"  # "<task_group>_<task_id>", like lerobot's per-task video folders
RUNS_ATTR = "attnstore_runs"
MAX_SEARCH_DEPTH = 4  # a folder is searched for stores down to FOLDER/*/*/*/*.zarr
STUDY_CHUNK_BYTES = 64 * 2**20  # dask chunks of about this many raw bytes span many rows in a study
RUN_FIELDS = {  # per-run table: variable -> key of the run attrs
    "run_policy": "policy",
    "run_policy_type": "policy_type",
    "run_task": "env_task",
    "run_lerobot_version": "lerobot_version",
}


def open_study(
    sources: Source | Sequence[Source],
    *,
    storage_options: Mapping[str, Any] | None = None,
    common: bool = False,
    chunks: Any = "study",
) -> xr.Dataset:
    """Open many runs as one lazy Dataset with a ``run`` coordinate.

    ``sources``: a list of stores (paths, URLs or zarr Store objects), a glob (``runs/*/attention.zarr``,
    ``s3://lab/study/**/attention.zarr``), or a folder (local or URL) holding runs, searched for attnstore
    stores. ``chunks="study"`` (default) makes dask chunks span many inference rows (about 64 MB of raw
    attention each: few tasks for whole-study reductions; dask reads only the rows a selection needs).

    Example::

        study = open_study("outputs/study/libero_object")
        shares = region_shares(study.sel(layer=17, denoise=9))
        shares.groupby("outcome").mean()                         # success vs failure, all runs
        study.attention.sel(run="libero_object_task3", episode=0, rollout=2)
    """
    locations = discover(sources, storage_options)
    if not locations:
        raise StoreError(f"no attnstore stores found in {_describe(sources)}")
    names = run_names(locations)
    from concurrent.futures import ThreadPoolExecutor

    def open_run(loc: Location) -> xr.Dataset:
        if chunks != "study":
            return open_attention(loc, chunks=chunks)
        spec, _ = read_spec(loc)  # dask chunks of many rows straight from the store: one task per chunk
        return open_attention(loc, chunks={S.INFERENCE: _rows_per_chunk(spec)})

    with ThreadPoolExecutor(max_workers=min(8, len(locations))) as pool:  # metadata reads overlap (object stores)
        datasets = list(pool.map(open_run, locations))
    opened = list(zip(names, locations, datasets))
    specs = {name: StoreSpec.from_dict(ds.attrs[SPEC_ATTR]) for name, _, ds in opened}
    spec, keep = reconcile(specs, common)
    wanted = set.intersection(*(set(ds.data_vars) for _, _, ds in opened))
    parts, tables, runs = [], [], {}
    for name, loc, ds in opened:
        ds = ds.sel({S.LAYER: list(keep[S.LAYER]), S.DENOISE: list(keep[S.DENOISE])})
        if S.PREFIX_LAYER in ds.dims:
            ds = ds.sel({S.PREFIX_LAYER: list(keep[S.PREFIX_LAYER])})
        ds = ds.drop_vars([v for v in ds.data_vars if v not in wanted])
        inference, table = _split(ds, name)
        parts.append(inference)
        tables.append(table)
        runs[name] = {"source": loc.name, "status": ds.attrs.get(STATUS_ATTR), "run": ds.attrs.get(RUN_ATTR, {}),
                      "spec": specs[name].to_dict()}
    study = xr.concat(parts, dim=S.INFERENCE, data_vars="minimal", coords="minimal", compat="override",
                      join="override", combine_attrs="drop")
    table = xr.concat(tables, dim=S.EPISODE_INDEX, data_vars="all", coords="different", compat="equals",
                      join="outer", combine_attrs="drop") if tables else None
    if table is not None:
        study = study.merge(table, compat="override", join="outer")
    study = study.merge(run_table(runs))
    study = study.set_xindex([RUN, S.EPISODE, S.ROLLOUT])
    study.attrs = {SPEC_ATTR: spec.to_dict(), RUNS_ATTR: runs, STATUS_ATTR: None, RUN_ATTR: {}}
    return study


def discover(sources: Source | Sequence[Source], storage_options: Mapping[str, Any] | None = None) -> list[Location]:
    """The stores named, matched by a glob, or found under a folder (local or URL), in sorted order."""
    if isinstance(sources, (list, tuple)):
        return [locate(s, storage_options) for s in sources]
    loc = locate(sources, storage_options)
    if loc.store_object is not None:
        return [loc]
    text = loc.name
    if _is_store(loc):
        return [loc]
    if any(c in text for c in "*?["):
        return [locate(p, storage_options) for p in _glob(loc, text)]
    base = text.rstrip("/")
    found: dict[str, Location] = {}
    for depth in range(1, MAX_SEARCH_DEPTH + 1):  # shallow globs: never a walk through the stores' chunks
        pattern = base + "/*" * (depth - 1) + "/*.zarr"
        for p in _glob(loc, pattern):
            if not any(p.startswith(f + "/") for f in found):
                candidate = locate(p, storage_options)
                if _is_store(candidate):
                    found[p] = candidate
    return [found[p] for p in sorted(found)]


def run_names(locations: Sequence[Location]) -> list[str]:
    """A short unique name per run: the folder holding ``attention.zarr`` (``runs/<name>/attention.zarr``).

    >>> run_names([locate("s/runs/task0/attention.zarr"), locate("s/runs/task1/attention.zarr"),
    ...            locate("other/my_run.zarr")])
    ['task0', 'task1', 'my_run']
    >>> run_names([locate("a/x/attention.zarr"), locate("b/x/attention.zarr")])
    ['a/x', 'b/x']
    """
    def parts(loc: Location) -> list[str]:
        items = [p for p in loc.name.rstrip("/").split("/") if p and not p.endswith(":")]
        last = items[-1]
        stem = last[: -len(".zarr")] if last.endswith(".zarr") else last
        return items[:-1] if stem == "attention" and len(items) > 1 else [*items[:-1], stem]

    split = [parts(loc) for loc in locations]
    depth = 1
    while depth < max(len(p) for p in split):
        names = ["/".join(p[-depth:]) for p in split]
        if len(set(names)) == len(names):
            return names
        depth += 1
    names = ["/".join(p) for p in split]
    if len(set(names)) != len(names):
        raise StoreError(f"the same store is named twice: {[loc.name for loc in locations]}")
    return names


def reconcile(specs: Mapping[str, StoreSpec], common: bool) -> tuple[StoreSpec, dict[str, tuple[int, ...]]]:
    """The study's spec and the layers / denoise steps / prefix layers kept; refuse what cannot combine."""
    names = list(specs)
    first = specs[names[0]]
    for name in names[1:]:
        spec = specs[name]
        for what in ("layout", "num_heads", "num_denoise_steps"):
            if getattr(spec, what) != getattr(first, what):
                raise StoreError(
                    f"runs {names[0]} and {name} differ in {what} ({_short(getattr(first, what))} vs "
                    f"{_short(getattr(spec, what))}): they cannot be one study; open them separately"
                )
    keep: dict[str, tuple[int, ...]] = {}
    for dim, field in ((S.LAYER, "layers"), (S.DENOISE, "denoise_steps"), (S.PREFIX_LAYER, "prefix_layers")):
        values = {name: tuple(getattr(s, field)) for name, s in specs.items()}
        shared = tuple(sorted(set.intersection(*(set(v) for v in values.values()))))
        differ = [n for n, v in values.items() if v != values[names[0]]]
        if differ and not common:
            raise StoreError(
                f"runs differ in {field}: {names[0]} has {list(values[names[0]])}, {differ[0]} has "
                f"{list(values[differ[0]])}; pass common=True (--common) to keep the shared {list(shared)}"
            )
        if common and not shared and field != "prefix_layers":
            raise StoreError(f"the runs share no {field}: {', '.join(f'{n} {list(v)}' for n, v in values.items())}")
        keep[dim] = shared
    spec = StoreSpec.from_dict({
        **first.to_dict(),
        "layers": list(keep[S.LAYER]),
        "denoise_steps": list(keep[S.DENOISE]),
        "times": [first.times[first.denoise_steps.index(d)] for d in keep[S.DENOISE]],
        "prefix_layers": list(keep[S.PREFIX_LAYER]),
    })
    return spec, keep


def run_table(runs: Mapping[str, Mapping[str, Any]]) -> xr.Dataset:
    """The per-run table on ``run_index``: what produced each run."""
    names = list(runs)
    data = {var: (RUN_INDEX, [str(runs[n]["run"].get(key) or "") for n in names]) for var, key in RUN_FIELDS.items()}
    data["run_task_ids"] = (RUN_INDEX, [str(runs[n]["run"].get("task_ids") or "") for n in names])
    data["run_layers"] = (RUN_INDEX, [",".join(map(str, runs[n]["spec"]["layers"])) for n in names])
    data["run_status"] = (RUN_INDEX, [str(runs[n]["status"] or "") for n in names])
    data["run_source"] = (RUN_INDEX, [str(runs[n]["source"]) for n in names])
    return xr.Dataset(data, coords={RUN_INDEX: names})


def _split(ds: xr.Dataset, name: str) -> tuple[xr.Dataset, xr.Dataset]:
    """(inference part with run/task/outcome coords, episode table with episode_run) of one run."""
    ds = ds.drop_indexes([c for c in (S.INFERENCE, S.EPISODE, S.ROLLOUT) if c in ds.xindexes])
    if S.INFERENCE in ds.coords:
        ds = ds.drop_vars(S.INFERENCE)
    table_vars = [v for v in ds.variables if S.EPISODE_INDEX in ds[v].dims]
    table = ds[table_vars] if table_vars else xr.Dataset()
    inference = ds.drop_vars(table_vars).drop_dims(S.EPISODE_INDEX, errors="ignore")
    n = inference.sizes[S.INFERENCE]
    episodes = np.asarray(inference[S.EPISODE].values)
    info = _episode_info(table, episodes)
    inference = inference.assign_coords({
        RUN: (S.INFERENCE, np.full(n, name, dtype=object).astype(str)),
        TASK_KEY: (S.INFERENCE, info[TASK_KEY]),
        OUTCOME: (S.INFERENCE, info[OUTCOME]),
    })
    if table_vars:
        table = table.load().assign_coords({EPISODE_RUN: (S.EPISODE_INDEX, [name] * table.sizes[S.EPISODE_INDEX])})
    return inference, table


def _episode_info(table: xr.Dataset, episodes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-inference task key and outcome, joined from the run's episode table."""
    n = episodes.size
    out = {TASK_KEY: np.full(n, "", dtype=object), OUTCOME: np.full(n, "unfinished", dtype=object)}
    if S.EPISODE_INDEX in table.dims:
        index = np.asarray(table[S.EPISODE_INDEX].values)
        rows = {int(e): i for i, e in enumerate(index)}
        groups = np.asarray(table[S.TASK_GROUP].values)
        ids = np.asarray(table[S.TASK_ID].values)
        success = np.asarray(table[S.SUCCESS].values)
        for j, ep in enumerate(episodes.tolist()):
            i = rows.get(int(ep))
            if i is not None:
                out[TASK_KEY][j] = f"{groups[i]}_{ids[i]}"
                out[OUTCOME][j] = "success" if bool(success[i]) else "failure"
    return {k: v.astype(str) for k, v in out.items()}


def _rows_per_chunk(spec: StoreSpec) -> int:
    """Inference rows per dask chunk: about ``STUDY_CHUNK_BYTES`` of float32 attention.

    >>> from attnstore.schema import TokenLayout
    >>> _rows_per_chunk(StoreSpec(layout=TokenLayout(("image",), (True,)), layers=(17,), denoise_steps=(9,)))
    82
    """
    row = int(np.prod(spec.attention_shape_per_inference)) * 4
    return max(1, STUDY_CHUNK_BYTES // max(row, 1))


def _is_store(loc: Location) -> bool:
    try:
        root = loc.read_json("zarr.json")
    except StoreError:
        return False
    return bool(root) and root.get("node_type") == "group" and S.ROOT_ATTR in (root.get("attributes") or {})


def _glob(loc: Location, pattern: str) -> list[str]:
    if loc.is_local:
        return sorted(globlib.glob(os.fspath(pattern), recursive=True))
    import fsspec

    protocol = pattern.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol, **dict(loc.storage_options))
        found = fs.glob(pattern)
    except Exception as exc:
        raise StoreError(describe_failure(loc, exc)) from exc
    return sorted(f"{protocol}://{p}" if "://" not in p else p for p in found)


def _describe(sources: Any) -> str:
    return ", ".join(map(str, sources)) if isinstance(sources, (list, tuple)) else str(sources)


def _short(value: Any) -> str:
    text = str(value.to_dict() if hasattr(value, "to_dict") else value)
    return text if len(text) < 120 else text[:117] + "..."

