"""Pure rendering of attention heat maps: arrays in, arrays out (testable alone).

The policy's SigLIP encoder cuts each 224x224 image into a 16x16 grid of 14x14-pixel patches,
row-major (``patch_row`` = block of image rows, ``patch_col`` = block of image columns), so
:func:`upsample_grid` maps a patch's value onto exactly its pixel block. :func:`colorize`,
:func:`blend`, :func:`render_heat`, :func:`panel_layout` and :func:`render_panel` build the
"image with heat map | pure heat map + colour bar" panels that ``attnstore overlay`` saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnstore.errors import SelectionError

CMAP = "inferno"
SCALE_LABEL = {
    "camera": "share of this camera's attention",
    "total": "share of all attention",
}


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
