"""Choosing what to draw or plot: episodes, rows, env steps, layers, denoise steps, cameras.

Layers and denoise steps are parsed with the one selection grammar of :mod:`attnstore.selection`
(the one ``attnstore eval --attention.layers`` and the recorder use). Each helper raises a one-line
:class:`~attnstore.errors.SelectionError` that lists what the store does hold, so a user's typo
answers itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, SelectionError
from attnstore.selection import Selection, resolve


def describe_values(values: Sequence[int]) -> str:
    """Short text for a set of integers: runs become ranges.

    >>> describe_values([0, 1, 2, 3, 5, 10, 20, 30])
    '0-3, 5, 10, 20, 30'
    >>> describe_values([])
    'none'
    """
    vals = sorted({int(v) for v in values})
    if not vals:
        return "none"
    parts, start, prev = [], vals[0], vals[0]
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def episode_rows(ds, episode: int) -> np.ndarray:
    """Positions on the inference axis of one episode's rows, in rollout order; error lists the episodes."""
    episodes = np.asarray(ds[S.EPISODE].values)
    rows = np.flatnonzero(episodes == episode)
    if rows.size == 0:
        raise SelectionError(
            f"episode {episode} is not in the store; it holds episodes {describe_values(np.unique(episodes))}"
        )
    return rows[np.argsort(np.asarray(ds[S.ROLLOUT].values)[rows], kind="stable")]


def pick_rows(
    ds, rows: np.ndarray, *, steps: Sequence[int] | None = None, rollouts: Sequence[int] | None = None
) -> np.ndarray:
    """The rows (of one episode's ``rows``) at the wanted env steps or rollout indices; None = all.

    Env steps must be ones where the policy ran (a captured inference): the error lists them.
    """
    if steps is not None:
        have = np.asarray(ds[S.ENV_STEP].values)[rows]
        kind, wanted = "env step", steps
    elif rollouts is not None:
        have = np.asarray(ds[S.ROLLOUT].values)[rows]
        kind, wanted = "rollout", rollouts
    else:
        return rows
    picked = []
    for value in wanted:
        hit = np.flatnonzero(have == int(value))
        if hit.size == 0:
            raise SelectionError(
                f"{kind} {value} was not captured in this episode; captured {kind}s: {describe_values(have)}"
                + (" (use --rollouts for inference numbers)" if kind == "env step" else "")
            )
        picked.append(rows[hit[0]])
    return np.asarray(picked, dtype=np.int64)


def pick_coord(ds, dim: str, wanted: Selection | None, what: str) -> int:
    """One captured value of ``layer``/``denoise`` (default None: the last captured).

    ``wanted`` uses the one selection grammar (:mod:`attnstore.selection`) over the model's indices:
    ``17``, ``"17"``, ``"[17]"``, ``-1`` (the model's last), ``final``, ``last:1``. It must pick
    exactly one value the store holds; every error is one line that lists the captured values.
    """
    have = [int(v) for v in np.asarray(ds[dim].values)]
    if wanted is None:
        return have[-1]
    held = f"this store holds {what}s {describe_values(have)}"
    try:
        picked = resolve(wanted, _model_count(ds, dim), what=what, example=f"{have[-1]}", error=SelectionError)
    except SelectionError as exc:
        raise SelectionError(f"{exc}; {held}") from None
    if len(picked) != 1:
        raise SelectionError(f"{what} selection {wanted!r} picks {len(picked)} {what}s; pick one ({held})")
    (value,) = picked
    if value not in have:
        raise SelectionError(f"{what} {value} was not captured; {held}")
    return value


def _model_count(ds, dim: str) -> int | None:
    """How many layers / denoise steps the model has, from the store's spec (None = not recorded)."""
    from attnstore.store.open import spec_of

    try:
        spec = spec_of(ds)
    except AttnStoreError:
        return None
    return {S.LAYER: spec.num_layers, S.DENOISE: spec.num_denoise_steps}.get(dim)


def pick_cameras(layout: S.TokenLayout, wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(present cameras to draw, notes about skipped missing ones). ``None`` = every camera slot."""
    present = [c for c, p in zip(layout.cameras, layout.camera_present) if p]
    names = list(layout.cameras) if wanted is None else list(dict.fromkeys(wanted))
    notes = []
    for name in names:
        if name not in layout.cameras:
            raise SelectionError(
                f"camera '{name}' is not in the store; its cameras are {', '.join(present)}"
                + (f" (missing: {', '.join(c for c in layout.cameras if c not in present)})"
                   if len(present) < len(layout.cameras) else "")
            )
        if name not in present:
            notes.append(f"camera '{name}' was missing (a dummy camera, its keys are masked): skipped")
    chosen = [n for n in names if n in present]
    if not chosen:
        skipped = ", ".join(n for n in names if n not in present)
        raise SelectionError(
            f"nothing to draw: {skipped} was not in the policy's input (a masked dummy camera); "
            f"the present cameras are {', '.join(present)}"
        )
    return chosen, notes


def episode_outcome(ds, episode: int) -> str:
    """``success``, ``failure`` or ``unfinished`` (no episode record: the run stopped mid-episode)."""
    if S.EPISODE_INDEX not in ds.dims:
        return "unfinished"
    index = np.asarray(ds[S.EPISODE_INDEX].values)
    hit = np.flatnonzero(index == episode)
    if hit.size == 0:
        return "unfinished"
    return "success" if bool(np.asarray(ds[S.SUCCESS].values)[hit[0]]) else "failure"
