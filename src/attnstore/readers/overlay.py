"""``attnstore overlay``: action->camera attention drawn on the images the policy saw.

The store keeps the images exactly as the policy saw them (after lerobot's flips), so a patch's
attention lands on its own pixel block with no guessing about orientation. The command is
:func:`write_overlays` over an :class:`OverlayOptions`; drawing lives in :mod:`attnstore.readers.render`,
choosing rows/layers/cameras in :mod:`attnstore.readers.selection`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import SelectionError, StoreError
from attnstore.outputs import check_writable_dir
from attnstore.readers.render import SCALE_LABEL, render_heat, render_panel
from attnstore.readers.selection import (
    episode_outcome,
    episode_rows,
    pick_cameras,
    pick_coord,
    pick_rows,
)

Scale = Literal["camera", "total"]
SCALES: tuple[str, ...] = tuple(SCALE_LABEL)


# ---- the overlay command -------------------------------------------------------------------------
Heads = int | Literal["mean", "max"]
Action = int | Literal["mean"]
CONTROL_HZ = 20  # LIBERO's simulation/control rate: env steps per second of real time


@dataclass
class OverlayOptions:
    """What ``attnstore overlay`` draws. ``steps`` are env steps, ``rollouts`` inference numbers.

    No steps/rollouts: every captured inference (or, with ``video``, only the videos unless
    ``all_steps``). ``layer``/``denoise``: None = the last captured. ``fps``: None = real time
    (20 Hz control rate over the env steps between inferences).
    """

    episode: int
    out_dir: Path
    steps: tuple[int, ...] | None = None
    rollouts: tuple[int, ...] | None = None
    all_steps: bool = False
    layer: int | None = None
    denoise: int | None = None
    action: Action = "mean"
    heads: Heads = "mean"
    alpha: float = 0.5
    cameras: tuple[str, ...] | None = None
    scale: Scale = "camera"
    video: bool = False
    fps: float | None = None
    zoom: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if sum(x is not None and x is not False for x in (self.steps, self.rollouts, self.all_steps or None)) > 1:
            raise SelectionError("choose one of --steps, --rollouts or --all")
        for name in ("steps", "rollouts", "cameras"):
            value = getattr(self, name)
            if value is not None:
                if len(value) == 0:
                    raise SelectionError(f"--{name} needs at least one value")
                setattr(self, name, tuple(value))
        if not 0.0 <= self.alpha <= 1.0:
            raise SelectionError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.scale not in SCALES:
            raise SelectionError(f"--scale must be one of {', '.join(SCALES)}, got '{self.scale}'")
        self.heads = _parse_choice(self.heads, ("mean", "max"), "--heads")
        self.action = _parse_choice(self.action, ("mean",), "--action-idx")
        if self.fps is not None and not self.fps > 0:
            raise SelectionError(f"--fps must be > 0, got {self.fps}")
        if self.zoom < 1:
            raise SelectionError(f"--zoom must be >= 1, got {self.zoom}")

    @property
    def renormalize(self) -> bool:
        return self.scale == "camera"


def _parse_choice(value: object, words: tuple[str, ...], flag: str) -> int | str:
    """A word from ``words`` or a non-negative integer (given as int or text).

    >>> _parse_choice("3", ("mean", "max"), "--heads"), _parse_choice("max", ("mean", "max"), "--heads")
    (3, 'max')
    """
    if isinstance(value, str) and value in words:
        return value
    try:
        number = int(str(value))
    except ValueError:
        number = -1
    if number < 0:
        raise SelectionError(f"{flag} must be {' or '.join(words)} or an index >= 0, got '{value}'")
    return number


@dataclass
class OverlayResult:
    pngs: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    """What one panel shows, before any pixels: an inference row of one camera."""

    row: int
    camera: str
    env_step: int
    rollout: int


def write_overlays(store: str | os.PathLike[str] | Any, options: OverlayOptions, *,
                   storage_options: Mapping[str, Any] | None = None) -> OverlayResult:
    """Render the panels (and videos) ``options`` asks for; every choice is checked before drawing.

    ``store``: anything :func:`attnstore.open_attention` opens (a path, an fsspec URL with ``storage_options``,
    a zarr Store object); the outputs go to the local ``options.out_dir``.
    Returns the files written and notes (skipped cameras, missing images) for the user.
    """
    from attnstore.store.open import open_attention, spec_of

    ds = open_attention(store, storage_options=storage_options)
    spec = spec_of(ds)
    result = OverlayResult()
    rows = episode_rows(ds, options.episode)
    explicit = options.steps is not None or options.rollouts is not None or options.all_steps
    panel_rows = pick_rows(ds, rows, steps=options.steps, rollouts=options.rollouts)
    if options.video and not explicit:
        panel_rows = panel_rows[:0]
    layer = pick_coord(ds, S.LAYER, options.layer, "layer")
    denoise = pick_coord(ds, S.DENOISE, options.denoise, "denoise step")
    cameras, notes = pick_cameras(spec.layout, options.cameras)
    result.notes.extend(notes)
    _check_index(options.heads, spec.num_heads, "--heads", "head")
    _check_index(options.action, spec.layout.num_action, "--action-idx", "action token")
    has_images = S.IMAGES in ds
    if not has_images:
        result.notes.append("this store holds no images: drawing the heat maps alone")

    out = check_writable_dir(options.out_dir, "output folder", hint="pass --out DIR")  # before any drawing
    needed = np.union1d(panel_rows, rows if options.video else panel_rows[:0]).astype(np.int64)
    grids = camera_grids(ds, needed, cameras, layer=layer, denoise=denoise, heads=options.heads,
                         action=options.action, renormalize=options.renormalize)
    where = {int(r): i for i, r in enumerate(needed)}
    env_steps = np.asarray(ds[S.ENV_STEP].values)
    rollouts = np.asarray(ds[S.ROLLOUT].values)
    time = float(ds[S.TIME].sel({S.DENOISE: denoise}).values)
    outcome = episode_outcome(ds, options.episode)
    context = (
        f"episode {options.episode} ({outcome}) · layer {layer} · denoise step {denoise} (t={time:.2f}) · "
        f"heads {options.heads} · scale {options.scale}" + ("" if has_images else " · no image stored")
    )

    lay = spec.layout
    uniform = 1.0 / lay.patches_per_camera if options.renormalize else None

    def frames(selected: np.ndarray, camera: str) -> list[_Frame]:
        return [_Frame(int(r), camera, int(env_steps[r]), int(rollouts[r])) for r in selected]

    def draw(frame: _Frame, vmax: float | None) -> np.ndarray:
        image = _image(ds, frame.row, frame.camera) if has_images else None
        heat = render_heat(grids[frame.camera][where[frame.row]], image, alpha=options.alpha, vmax=vmax,
                           size=_picture_size(spec))
        title = f"{frame.camera} | env step {frame.env_step} | {_action_text(options.action)}"
        panel, _ = render_panel(heat, title, f"{context} · rollout {frame.rollout}",
                                colorbar_label=SCALE_LABEL[options.scale], zoom_factor=options.zoom,
                                uniform=uniform)
        return panel

    todo = [f for cam in cameras for f in frames(panel_rows, cam)]
    try:
        if todo:
            (out / f"episode_{options.episode:03d}").mkdir(parents=True, exist_ok=True)
        if options.video:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write output folder {out}: {exc.strerror or exc}; pass --out DIR") from exc
    for frame in _progress(todo, options.progress, "panels"):
        path = out / f"episode_{options.episode:03d}" / f"{frame.camera}_step{frame.env_step:04d}.png"
        _save_png(draw(frame, None), path)
        result.pngs.append(path)
    if options.video:
        from attnstore.readers.video import write_mp4

        fps = options.fps or real_time_fps(env_steps[rows])
        for cam in cameras:
            # one colour scale for the whole episode, so frames compare
            vmax = float(np.nan_to_num(grids[cam][[where[int(r)] for r in rows]]).max())
            path = out / f"episode_{options.episode:03d}_{cam}.mp4"
            stream = (draw(f, vmax) for f in _progress(frames(rows, cam), options.progress, f"video {cam}"))
            write_mp4(path, stream, fps)
            result.videos.append(path)
    return result


def camera_grids(
    ds,
    rows: np.ndarray,
    cameras: Sequence[str],
    *,
    layer: int,
    denoise: int,
    heads: Heads = "mean",
    action: Action = "mean",
    renormalize: bool = True,
) -> dict[str, np.ndarray]:
    """(len(rows), patch_row, patch_col) action->camera maps per camera, read in one pass over the chunks."""
    import dask

    from attnstore.readers.analysis import action_to_visual

    if len(rows) == 0:
        return {cam: np.zeros((0, 0, 0)) for cam in cameras}
    sub = ds.isel({S.INFERENCE: np.asarray(rows)}).sel({S.LAYER: layer, S.DENOISE: denoise})
    lazy = [
        action_to_visual(sub, cam, heads=heads, queries=action, renormalize=renormalize).transpose(
            S.INFERENCE, S.PATCH_ROW, S.PATCH_COL
        )
        for cam in cameras
    ]
    computed = dask.compute(*lazy)  # the cameras share each inference's chunk: read it once
    return {cam: np.asarray(grid.values, np.float64) for cam, grid in zip(cameras, computed)}


def real_time_fps(env_steps: np.ndarray) -> float:
    """Frames per second that play an episode's inferences in real time (20 Hz control).

    >>> real_time_fps(np.array([0, 10, 20, 30]))
    2.0
    >>> real_time_fps(np.array([0]))
    2.0
    """
    gaps = np.diff(np.sort(np.asarray(env_steps)))
    gap = float(np.median(gaps)) if gaps.size and np.median(gaps) > 0 else 10.0
    return CONTROL_HZ / gap


def _check_index(value: object, size: int, flag: str, what: str) -> None:
    if isinstance(value, int) and not 0 <= value < size:
        raise SelectionError(f"{flag} {value} is out of range: this store has {size} {what}s (0-{size - 1})")


def _action_text(action: Action) -> str:
    return "action mean" if action == "mean" else f"action {action}"


def _picture_size(spec: S.StoreSpec) -> tuple[int, int]:
    if spec.image_shape is not None:
        return spec.image_shape[0], spec.image_shape[1]
    lay = spec.layout
    return lay.grid_rows * 14, lay.grid_cols * 14  # SigLIP's 14-pixel patches


def _image(ds, row: int, camera: str) -> np.ndarray:
    return np.asarray(ds[S.IMAGES].isel({S.INFERENCE: row}).sel({S.CAMERA: camera}).values)


def _save_png(rgb: np.ndarray, path: Path) -> None:
    """Write a PNG via a temporary name, so an interrupted run leaves no truncated file."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    try:
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _progress(items: list, enabled: bool, desc: str) -> Iterator:
    if not enabled or len(items) < 2:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, unit="frame", leave=False))
