"""Heat maps of action->camera attention on the images the policy saw: pure rendering + the overlay command.

The policy's SigLIP encoder cuts each 224x224 image into a 16x16 grid of 14x14-pixel patches,
row-major (``patch_row`` = block of image rows, ``patch_col`` = block of image columns). The store
keeps the images exactly as the policy saw them (after lerobot's flips), so a patch's attention
lands on its own pixel block with no guessing about orientation.

Pure functions (arrays in, arrays out; testable alone): :func:`upsample_grid`, :func:`colorize`,
:func:`blend`, :func:`render_heat`, :func:`panel_layout`, :func:`render_panel`.
The ``attnstore overlay`` command is :func:`write_overlays` over an :class:`OverlayOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import SelectionError

CMAP = "inferno"
Scale = Literal["camera", "total"]
SCALES: tuple[str, ...] = ("camera", "total")
SCALE_LABEL = {
    "camera": "share of this camera's attention",
    "total": "share of all attention",
}


# ---- pure rendering ------------------------------------------------------------------------------
def upsample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Spread a (rows, cols) patch grid over (height, width) pixels: each patch fills its pixel block.

    Pixel (y, x) takes patch (y * rows // height, x * cols // width), so with 224 px and 16 patches
    every patch covers exactly one 14x14 block.

    >>> g = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> upsample_grid(g, 4, 4)
    array([[0., 0., 1., 1.],
           [0., 0., 1., 1.],
           [2., 2., 3., 3.],
           [2., 2., 3., 3.]])
    """
    grid = np.asarray(grid)
    rows, cols = grid.shape
    return grid[np.arange(height) * rows // height][:, np.arange(width) * cols // width]


def colorize(values: np.ndarray, vmax: float, cmap: str = CMAP) -> np.ndarray:
    """Map values in [0, vmax] to RGB uint8 through a matplotlib colour map (values clipped).

    ``vmax <= 0`` (an all-zero map) draws everything at the map's lowest colour.

    >>> colorize(np.array([[0.0, 0.5, 1.0]]), vmax=0.5, cmap="gray")
    array([[[  0,   0,   0],
            [255, 255, 255],
            [255, 255, 255]]], dtype=uint8)
    """
    import matplotlib

    scaled = np.clip(np.asarray(values, np.float64) / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(np.shape(values))
    rgba = matplotlib.colormaps[cmap](scaled, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def blend(image: np.ndarray, heat_rgb: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * heat``, rounded to uint8.

    >>> blend(np.array([[[100, 0, 200]]], np.uint8), np.array([[[0, 100, 100]]], np.uint8), 0.5)
    array([[[ 50,  50, 150]]], dtype=uint8)
    """
    mixed = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * np.asarray(heat_rgb, np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def zoom(image: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge an (H, W, ...) image by an integer factor, nearest neighbour (pixel blocks stay exact).

    >>> zoom(np.array([[1, 2]]), 2)
    array([[1, 1, 2, 2],
           [1, 1, 2, 2]])
    """
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


@dataclass(frozen=True)
class HeatImages:
    """One camera's heat map at image size, and the image with the heat map blended on (None without image)."""

    heat: np.ndarray  # (H, W, 3) uint8
    overlay: np.ndarray | None  # (H, W, 3) uint8
    vmax: float


def render_heat(
    grid: np.ndarray,
    image: np.ndarray | None,
    *,
    alpha: float = 0.5,
    vmax: float | None = None,
    size: tuple[int, int] = (224, 224),
    cmap: str = CMAP,
) -> HeatImages:
    """Colour a patch grid at the image's size and blend it on the image.

    ``vmax`` (top of the colour scale) defaults to the grid's own maximum; ``size`` is used when
    there is no image.

    >>> grid = np.zeros((16, 16)); grid[2, 5] = 1.0
    >>> out = render_heat(grid, np.zeros((224, 224, 3), np.uint8), cmap="gray")
    >>> lit = np.argwhere(out.heat[..., 0] == 255)
    >>> lit.min(axis=0).tolist(), lit.max(axis=0).tolist()     # rows 28..41, cols 70..83
    ([28, 70], [41, 83])
    >>> int(out.overlay[30, 75, 0])                               # half of white on black
    128
    """
    # NaN = a camera with no attention at all under this selection (0/0 when renormalising): draw 0
    grid = np.nan_to_num(np.asarray(grid, np.float64), nan=0.0)
    if grid.ndim != 2:
        raise SelectionError(f"a heat map needs a 2-D patch grid, got shape {grid.shape}")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise SelectionError(f"image must be (H, W, 3), got shape {image.shape}")
        size = image.shape[:2]
    top = float(grid.max()) if vmax is None else float(vmax)
    heat = colorize(upsample_grid(grid, *size), top, cmap)
    overlay = None if image is None else blend(image, heat, alpha)
    return HeatImages(heat=heat, overlay=overlay, vmax=top)


@dataclass(frozen=True)
class PanelLayout:
    """Pixel geometry of a panel: where each picture sits in the rendered RGB array.

    Boxes are ``(top, left, height, width)`` in array coordinates (row 0 at the top).
    """

    height: int
    width: int
    overlay_box: tuple[int, int, int, int] | None
    heat_box: tuple[int, int, int, int]
    colorbar_box: tuple[int, int, int, int]

    def crop(self, panel: np.ndarray, which: str) -> np.ndarray:
        """Cut ``overlay`` or ``heat`` (the picture exactly as drawn) out of a rendered panel."""
        box = getattr(self, f"{which}_box")
        if box is None:
            raise SelectionError(f"this panel has no {which} picture")
        top, left, h, w = box
        return panel[top : top + h, left : left + w]


TITLE_PX = 46  # two text lines above the pictures
MARGIN_PX = 10
GAP_PX = 12
COLORBAR_PX = 14
COLORBAR_LABELS_PX = 74  # tick labels and the rotated scale label right of the colour bar


def panel_layout(picture_hw: tuple[int, int], with_overlay: bool) -> PanelLayout:
    """Geometry of a panel for pictures of ``picture_hw`` pixels (after zoom); sizes are even for video.

    >>> lay = panel_layout((448, 448), with_overlay=True)
    >>> lay.overlay_box, lay.heat_box
    ((46, 10, 448, 448), (46, 470, 448, 448))
    >>> lay.height % 2, lay.width % 2
    (0, 0)
    """
    h, w = picture_hw
    left = MARGIN_PX
    overlay_box = None
    if with_overlay:
        overlay_box = (TITLE_PX, left, h, w)
        left += w + GAP_PX
    heat_box = (TITLE_PX, left, h, w)
    left += w + GAP_PX
    colorbar_box = (TITLE_PX, left, h, COLORBAR_PX)
    width = left + COLORBAR_PX + COLORBAR_LABELS_PX
    height = TITLE_PX + h + MARGIN_PX
    return PanelLayout(height + height % 2, width + width % 2, overlay_box, heat_box, colorbar_box)


def render_panel(
    heat: HeatImages,
    title: str,
    subtitle: str = "",
    *,
    colorbar_label: str = SCALE_LABEL["camera"],
    zoom_factor: int = 2,
    cmap: str = CMAP,
    uniform: float | None = None,
) -> tuple[np.ndarray, PanelLayout]:
    """Draw [overlay | heat map | colour bar] under a title; returns the RGB uint8 panel and its layout.

    The pictures are placed pixel for pixel (``figimage``, no resampling), so the heat map in the
    panel is exactly ``zoom(heat.heat, zoom_factor)`` at ``layout.heat_box``. ``uniform`` marks the
    value of a flat map on the colour bar (1/256 for a camera's own share), so a map that only looks
    bright because it is flat reads as flat.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    pictures = {"heat": zoom(heat.heat, zoom_factor)}
    if heat.overlay is not None:
        pictures["overlay"] = zoom(heat.overlay, zoom_factor)
    layout = panel_layout(pictures["heat"].shape[:2], with_overlay=heat.overlay is not None)
    dpi = 100
    fig = Figure(figsize=(layout.width / dpi, layout.height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    for name, picture in pictures.items():
        top, left, h, _ = getattr(layout, f"{name}_box")
        # figimage's origin is the figure's bottom-left corner; origin="upper" keeps row 0 on top.
        fig.figimage(picture, xo=left, yo=layout.height - top - h, origin="upper", zorder=1)
    fig.text(MARGIN_PX / layout.width, 1 - 6 / layout.height, title, ha="left", va="top",
             fontsize=11, fontweight="bold")
    if subtitle:
        fig.text(MARGIN_PX / layout.width, 1 - 26 / layout.height, subtitle, ha="left", va="top", fontsize=8.5,
                 color="#333333")
    top, left, h, w = layout.colorbar_box
    cax = fig.add_axes((left / layout.width, 1 - (top + h) / layout.height, w / layout.width, h / layout.height))
    mappable = ScalarMappable(norm=Normalize(vmin=0.0, vmax=heat.vmax if heat.vmax > 0 else 1.0), cmap=cmap)
    bar = fig.colorbar(mappable, cax=cax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(colorbar_label, fontsize=8)
    if uniform is not None and 0 < uniform <= mappable.norm.vmax:
        bar.ax.axhline(uniform, color="#00d0ff", linewidth=1.5)
        fig.text(left / layout.width, 1 - (top - 4) / layout.height, "— uniform",
                 color="#0090b0", fontsize=7, ha="left", va="bottom")
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return rgb, layout


# ---- choosing what to draw (shared with plots) ---------------------------------------------------
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


def pick_coord(ds, dim: str, wanted: int | None, what: str) -> int:
    """A captured value of ``layer``/``denoise`` (default: the last captured); error lists the captured ones."""
    have = [int(v) for v in np.asarray(ds[dim].values)]
    if wanted is None:
        return have[-1]
    if int(wanted) not in have:
        raise SelectionError(f"{what} {wanted} was not captured; this store holds {what}s {describe_values(have)}")
    return int(wanted)


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


def write_overlays(store: str | os.PathLike[str], options: OverlayOptions) -> OverlayResult:
    """Render the panels (and videos) ``options`` asks for; every choice is checked before drawing.

    Returns the files written and notes (skipped cameras, missing images) for the user.
    """
    from attnstore.readers.open import open_attention, spec_of

    ds = open_attention(store)
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

    out = options.out_dir
    todo = [f for cam in cameras for f in frames(panel_rows, cam)]
    if todo:
        (out / f"episode_{options.episode:03d}").mkdir(parents=True, exist_ok=True)
    for frame in _progress(todo, options.progress, "panels"):
        path = out / f"episode_{options.episode:03d}" / f"{frame.camera}_step{frame.env_step:04d}.png"
        _save_png(draw(frame, None), path)
        result.pngs.append(path)
    if options.video:
        from attnstore.readers.video import write_mp4

        out.mkdir(parents=True, exist_ok=True)
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
