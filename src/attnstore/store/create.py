"""Creating, opening and finishing a store on disk (the writer's file-level side).

``preflight`` refuses a bad path or mode before anything runs; ``open_for_writing`` takes the
writer lock and creates every array of the schema (or reopens a store to append to it);
``finish_store`` records the final status and consolidates metadata at close.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.schema import StoreSpec
from attnstore.store.lock import acquire_lock, refuse_if_locked, release_lock

WriteMode = Literal["create", "overwrite", "append"]


def preflight(path: Path, mode: WriteMode) -> None:
    """Refuse a bad path/mode before anything runs (nothing is written here)."""
    if mode not in ("create", "overwrite", "append"):
        raise StoreError(f"unknown write mode '{mode}': use create, overwrite or append")
    exists = non_empty(path)
    if mode == "append" and not exists:
        raise StoreError(f"cannot append: {path} does not exist (use mode 'create')")
    if mode == "create" and exists:
        raise StoreError(f"{path} already exists: choose a fresh path, or overwrite it (--overwrite on the CLI)")
    if mode != "create" and exists:
        open_existing(path)  # never append to or delete anything that is not an attnstore store
        refuse_if_locked(path)  # nor one another writer is writing
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write {path}: {parent} is not writable")


def non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def open_for_writing(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    preflight(path, mode)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        acquire_lock(path)  # before anything is touched (or deleted): one writer per store
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        return _prepare_store(path, spec, run, mode)
    except BaseException:
        release_lock(path)
        raise


def _prepare_store(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    import zarr

    exists = non_empty(path)
    if mode == "create" and exists:  # appeared since the preflight
        raise StoreError(f"{path} already exists: choose a fresh path, or overwrite it (--overwrite on the CLI)")
    if mode == "append":
        group = open_existing(path)
        stored, _ = S.read_root_attrs(group.attrs, str(path))
        if stored != spec:
            raise StoreError(
                f"cannot append to {path}: it was written with another capture spec "
                f"(layers {stored.layers}, denoise {stored.denoise_steps}, encoding {stored.encoding}); "
                f"write to a new store instead"
            )
        _drop_consolidated_metadata(path)
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        info = dict(group.attrs[S.ROOT_ATTR])
        info["status"] = "writing"
        group.attrs[S.ROOT_ATTR] = info
        return group
    if exists:  # mode == "overwrite", and _preflight checked it is an attnstore store
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs.update(S.root_attrs(spec, run, status="writing"))
        _create_arrays(group, spec)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return group


def open_existing(path: Path):
    """Open an existing attnstore store or raise a one-line StoreError / SchemaError."""
    import zarr

    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} exists but is not a zarr v3 store (no zarr.json); refusing to touch it")
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except Exception as exc:
        raise StoreError(f"{path} is not a readable zarr group: {exc}") from exc
    S.read_root_attrs(group.attrs, str(path))
    return group


def _create_arrays(group, spec: StoreSpec) -> None:
    lay = spec.layout
    D, L, H, Q, K = spec.attention_shape_per_inference
    inference_coords = " ".join(S.INFERENCE_COORDS)

    def array(name, shape, dims, dtype, *, chunks=None, fill=0, coords="", codecs=None, attrs=None):
        kwargs = codecs if codecs is not None else {"compressors": S.default_compressors(np.dtype(dtype).itemsize if dtype is not str else 1)}
        arr = group.create_array(
            name,
            shape=shape,
            chunks=chunks or shape,
            dtype=dtype,
            fill_value=fill,
            dimension_names=list(dims),
            **kwargs,
        )
        merged = dict(attrs or {})
        if coords:
            merged["coordinates"] = coords
        if merged:
            arr.attrs.update(merged)
        return arr

    def static(name, dims, values, attrs=None):
        values = np.asarray(values)
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = array(name, values.shape, dims, dtype, fill="" if dtype is str else 0, attrs=attrs)
        arr[...] = values
        return arr

    # static coordinates
    static(S.DENOISE, [S.DENOISE], np.asarray(spec.denoise_steps, np.int16))
    static(S.TIME, [S.DENOISE], np.asarray(spec.times, np.float32), {"long_name": "flow-matching time t"})
    static(S.LAYER, [S.LAYER], np.asarray(spec.layers, np.int16), {"long_name": "action-expert layer index"})
    static(S.HEAD, [S.HEAD], np.arange(H, dtype=np.int16))
    static(S.QUERY, [S.QUERY], np.arange(Q, dtype=np.int16), {"long_name": "action token"})
    for name, values in lay.key_coords().items():
        static(name, [S.KEY], values)

    key_coords = " ".join(S.KEY_COORDS)
    per_row = dict(coords=inference_coords)
    # index coordinates (small, many rows per chunk; the episode column is the commit marker)
    array(S.EPISODE, (0,), [S.INFERENCE], np.int64, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(S.ROLLOUT, (0,), [S.INFERENCE], np.int32, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(S.ENV_STEP, (0,), [S.INFERENCE], np.int32, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(
        S.ATTENTION,
        (0, D, L, H, Q, K),
        [S.INFERENCE, S.DENOISE, S.LAYER, S.HEAD, S.QUERY, S.KEY],
        np.float32,
        chunks=(1, D, L, H, Q, K),
        coords=f"{inference_coords} {S.TIME} {key_coords}",
        codecs=S.attention_codecs(spec.encoding),
        attrs={"long_name": "action-token attention probabilities", "encoding": spec.encoding},
    )
    array(S.KEY_VALID, (0, K), [S.INFERENCE, S.KEY], bool, chunks=(1, K), fill=False,
          coords=f"{inference_coords} {key_coords}")
    if spec.store_language_tokens and lay.num_language:
        N = lay.num_language
        static(S.LANGUAGE_TOKEN, [S.LANGUAGE_TOKEN], np.arange(N, dtype=np.int16))
        array(S.LANGUAGE_TOKEN_ID, (0, N), [S.INFERENCE, S.LANGUAGE_TOKEN], np.int32, chunks=(1, N),
              fill=S.LANGUAGE_PAD_ID, **per_row)
        array(S.LANGUAGE_TOKEN_TEXT, (0, N), [S.INFERENCE, S.LANGUAGE_TOKEN], str, chunks=(1, N),
              fill="", **per_row)
    if spec.image_shape is not None:
        cams = [c for c, present in zip(lay.cameras, lay.camera_present) if present]
        static(S.CAMERA, [S.CAMERA], np.asarray(cams, dtype=str))
        h, w, c = spec.image_shape
        array(S.IMAGES, (0, len(cams), h, w, c), [S.INFERENCE, S.CAMERA, S.HEIGHT, S.WIDTH, S.CHANNEL],
              np.uint8, chunks=(1, len(cams), h, w, c), **per_row,
              attrs={"long_name": "policy input images after lerobot's processors (upright, as the policy saw them)"})
    if spec.action_shape is not None:
        chunk, dim = spec.action_shape
        array(S.ACTIONS, (0, chunk, dim), [S.INFERENCE, S.ACTION_STEP, S.ACTION_DIM], np.float32,
              chunks=(1, chunk, dim), **per_row, attrs={"long_name": "predicted action chunk (policy output space)"})
    if spec.prefix_layers:
        PL, _, P, _ = spec.prefix_attention_shape_per_inference
        static(S.PREFIX_LAYER, [S.PREFIX_LAYER], np.asarray(spec.prefix_layers, np.int16))
        array(S.PREFIX_ATTENTION, (0, PL, H, P, P),
              [S.INFERENCE, S.PREFIX_LAYER, S.HEAD, S.PREFIX_QUERY, S.PREFIX_KEY], np.float32,
              chunks=(1, PL, H, P, P), codecs=S.attention_codecs(spec.encoding), **per_row,
              attrs={"long_name": "VLM prefix self-attention probabilities"})

    # per-episode table
    ep_chunks = (1024,)
    array(S.EPISODE_INDEX, (0,), [S.EPISODE_INDEX], np.int64, chunks=ep_chunks, fill=S.UNCOMMITTED)
    array(S.TASK_GROUP, (0,), [S.EPISODE_INDEX], str, chunks=ep_chunks, fill="")
    array(S.TASK_ID, (0,), [S.EPISODE_INDEX], np.int32, chunks=ep_chunks, fill=-1)
    array(S.TASK, (0,), [S.EPISODE_INDEX], str, chunks=ep_chunks, fill="")
    array(S.SUCCESS, (0,), [S.EPISODE_INDEX], bool, chunks=ep_chunks, fill=False)
    array(S.NUM_ENV_STEPS, (0,), [S.EPISODE_INDEX], np.int32, chunks=ep_chunks, fill=0)


def finish_store(path: Path, group, status: str) -> None:
    import zarr

    info = dict(group.attrs[S.ROOT_ATTR])
    info["status"] = status
    group.attrs[S.ROOT_ATTR] = info
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": xarray reads it
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _drop_consolidated_metadata(path: Path) -> None:
    """Consolidated metadata goes stale once arrays grow; remove it while appending."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if meta.pop("consolidated_metadata", None) is not None:
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
