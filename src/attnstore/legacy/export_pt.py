"""Export a store to legacy per-episode ``.pt`` files (see :mod:`attnstore.legacy.pt`).

``export_pt`` streams episode by episode: it reads one inference at a time from the lazy dataset and
holds at most one episode's maps in memory (``torch.save`` needs the whole dict), then writes
``OUT_DIR/<task_group>_<task_id>/episode_<05d>_attention.pt`` atomically (temp file + rename), numbered
like lerobot's videos of that task (:func:`video_index`).

Each file holds the superset of the guide's and the fork's keys (:mod:`attnstore.legacy.pt`), so both kinds
of legacy reader run unchanged on it: ``metadata.episode_index`` (the store's episode),
``metadata.num_denoising_steps`` and ``num_denoising_steps_per_action``, and the fork's top-level
``episode_index`` (the file's per-task number, like the fork's) and ``batch_index``. Tensors are CPU
tensors (any reader's ``map_location`` works).

Legacy ``rollout_step`` is the store's ``env_step`` (the video frame index). By default there is one
entry per inference (``data['rollout_steps'][i]`` is inference ``i``, at frame ``rollout_step``).
With ``every_env_step`` there is one entry per env step (= per video frame): inference ``i``'s maps
are repeated for frames ``env_step[i] .. env_step[i+1] - 1``; the last inference covers frames up to
``num_env_steps - 1`` from the per-episode table or, for an episode without a table row (killed run),
``n_action_steps`` frames from the run attrs (1 if the run attrs do not say). Repeated entries share
their tensors, so the file is barely bigger than the one-entry-per-inference one (in-place edits of a
repeated entry's tensor show in all its frames).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.legacy import pt as L

Notify = Callable[[str], None]


def export_pt(
    store: str | os.PathLike[str] | Any,
    out_dir: str | os.PathLike[str],
    episodes: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    dtype: str = "float32",
    every_env_step: bool = False,
    progress: bool = True,
    notify: Notify | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write one legacy ``.pt`` per episode of ``store``; return the paths written, in episode order.

    ``store``: anything :func:`attnstore.open_attention` opens (a path, an fsspec URL with
    ``storage_options``, a zarr Store object); ``out_dir`` is a local folder.
    ``episodes``/``layers`` default to all committed ones. ``notify`` receives one-line notes
    (default: printed to stderr), e.g. for episodes without a table row.
    """
    import torch
    from tqdm.auto import tqdm

    from attnstore.store.location import locate
    from attnstore.store.open import RUN_ATTR, episode_table, open_attention, spec_of

    if dtype not in L.DTYPES:
        raise StoreError(f"--dtype must be one of {list(L.DTYPES)}, got '{dtype}'")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    notify = notify or (lambda msg: tqdm.write(f"attnstore: {msg}", file=sys.stderr))

    location = locate(store, storage_options)
    ds = open_attention(location)
    spec = spec_of(ds)
    run = ds.attrs.get(RUN_ATTR) or {}
    layer_idx = _layer_positions(spec.layers, layers)
    chosen_layers = [spec.layers[i] for i in layer_idx]
    row_episode = np.asarray(ds[S.EPISODE].values)
    row_rollout = np.asarray(ds[S.ROLLOUT].values)
    row_env_step = np.asarray(ds[S.ENV_STEP].values)
    stored = sorted(set(row_episode.tolist()))
    wanted = stored if episodes is None else [int(e) for e in episodes]
    missing = [e for e in wanted if e not in stored]
    if missing:
        raise StoreError(f"{location.name} has no episode {missing[0]}: stored episodes are {_short(stored)}")
    table = episode_table(ds)
    out_dir = Path(out_dir)

    written: list[Path] = []
    for ep in tqdm(wanted, desc="episodes", unit="ep", disable=not progress):
        rows = np.flatnonzero(row_episode == ep)
        rows = rows[np.argsort(row_rollout[rows], kind="stable")]
        steps = row_env_step[rows].tolist()
        record = table.get(ep)
        folder = _folder(record, run, ep, notify)
        frames = _frames_served(steps, record, run, ep, notify) if every_env_step else [[s] for s in steps]
        entries = []
        for i, row in enumerate(tqdm(rows, desc=f"episode {ep}", unit="inf", leave=False, disable=not progress)):
            att = ds[S.ATTENTION].isel({S.INFERENCE: int(row), S.LAYER: layer_idx}).values
            maps = torch.from_numpy(np.ascontiguousarray(att)).to(torch_dtype)
            for frame in frames[i]:
                entries.append(
                    L.legacy_entry(
                        frame, spec.times, spec.denoise_steps, chosen_layers, maps,
                        spec.layout.prefix_len, spec.layout.num_action,
                    )
                )
        hint = _hint(spec, chosen_layers, record, every_env_step, folder)
        path = out_dir / folder / L.FILE_PATTERN.format(episode=video_index(run, ep))
        number = L.file_index_of(path)  # the fork's top-level episode_index: the file's (video's) number
        legacy = L.legacy_episode(entries, ep, hint, file_index=number, batch_index=_batch_index(run, number))
        L.save_atomic(legacy, path)
        written.append(path)
        del entries
    return written


def video_index(run: dict[str, Any], episode: int) -> int:
    """lerobot's per-task episode number (``eval_episode_N.mp4``) of a run-wide store episode.

    ``attnstore eval`` numbers episodes across the whole run (task k starts at ``first_episode``) and
    keeps the mapping in the run attrs (:meth:`attnstore.schema.RunInfo.video_index`); the file is
    named like the video, while the file's ``metadata.episode_index`` stays the store's episode.

    >>> tasks = [{"first_episode": 0, "n_episodes": 2}, {"first_episode": 2, "n_episodes": 2}]
    >>> [video_index({"tasks": tasks}, e) for e in range(4)], video_index({}, 3)
    ([0, 1, 0, 1], 3)
    """
    return S.RunInfo.from_dict(run).video_index(episode)


def _layer_positions(stored: Sequence[int], wanted: Sequence[int] | None) -> list[int]:
    """Positions of the wanted layers on the store's layer axis.

    >>> _layer_positions((16, 17), [17])
    [1]
    """
    if wanted is None:
        return list(range(len(stored)))
    out = []
    for layer in wanted:
        if int(layer) not in stored:
            raise StoreError(f"layer {layer} is not in the store: stored layers are {list(stored)}")
        out.append(list(stored).index(int(layer)))
    return out


def _folder(record: dict[str, Any] | None, run: dict[str, Any], episode: int, notify: Notify) -> str:
    """``<task_group>_<task_id>`` from the table row, else from the run attrs, else ``unknown``."""
    if record is not None and record.get(S.TASK_GROUP):
        return f"{record[S.TASK_GROUP]}_{record[S.TASK_ID]}"
    group, task_id = S.RunInfo.from_dict(run).task_guess(episode)
    folder = f"{group or 'unknown'}_{'unknown' if task_id is None else task_id}"
    notify(f"episode {episode} has no per-episode record (unfinished run): task taken from the run attrs -> {folder}/")
    return folder


def _frames_served(
    steps: list[int], record: dict[str, Any] | None, run: dict[str, Any], episode: int, notify: Notify
) -> list[list[int]]:
    """The env steps (video frames) each inference served.

    >>> _frames_served([0, 10, 20], {"num_env_steps": 23}, {}, 0, print)
    [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21, 22]]
    >>> _frames_served([0, 2], None, {"n_action_steps": 2}, 5, lambda m: None)
    [[0, 1], [2, 3]]
    """
    ends = steps[1:]
    num_env_steps = int(record.get(S.NUM_ENV_STEPS, 0)) if record else 0
    if num_env_steps > steps[-1]:
        ends.append(num_env_steps)
    else:
        n_action = S.RunInfo.from_dict(run).n_action_steps or 1
        ends.append(steps[-1] + n_action)
        notify(
            f"episode {episode}: number of env steps unknown; the last inference covers "
            f"{n_action} frame(s) (run attr n_action_steps)"
        )
    return [list(range(a, b)) for a, b in zip(steps, ends)]


def _hint(spec, layers: list[int], record: dict[str, Any] | None, every_env_step: bool, folder: str) -> dict[str, Any]:
    """The optional ``metadata['attnstore']`` block: what import needs to rebuild the store exactly."""
    hint: dict[str, Any] = {
        "layout": spec.layout.to_dict(),
        "num_denoise_steps": spec.num_denoise_steps,
        "num_layers": spec.num_layers,
        "layers": list(layers),
        "every_env_step": bool(every_env_step),
        "finished": record is not None,
        "folder": folder,
    }
    if record is not None:
        hint.update({k: v for k, v in record.items()})
    return hint


def _batch_index(run: dict[str, Any], number: int | None) -> int:
    """The fork's ``batch_index``: the episode's slot in lerobot's vector-env batch (0 when unknown).

    lerobot numbers a task's episodes ``batch * batch_size + slot``.

    >>> _batch_index({"batch_size": 4}, 6), _batch_index({}, 6)
    (2, 0)
    """
    size = S.RunInfo.from_dict(run).batch_size
    return int(number) % int(size) if number is not None and size and int(size) > 0 else 0


def _short(values: list[int], n: int = 20) -> str:
    return str(values) if len(values) <= n else f"{values[:n]} ... ({len(values)} in all)"
