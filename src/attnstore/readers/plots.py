"""Summary figures of an attention store (matplotlib, Agg): the ``attnstore plot`` command.

All figures come from two small tables computed in one pass over the attention chunks
(:func:`summarize`): the share of attention per region and the attention entropy, per inference,
denoise step and layer (mean over heads and action tokens). A store with per-layer summaries (the
recorder's default) gives them for every expert layer, also those not stored in full, from the summaries
alone (no attention chunk is read). The figures:

* ``region_shares.png``: share per region (each present camera, language, action) over env steps;
* ``entropy_per_denoise.png``: entropy over the denoise steps, one line per layer;
* ``per_layer.png``: region shares and entropy per captured layer;
* ``success_vs_failure.png``: region shares over env steps, successful vs failed episodes side by side
  (when the store holds several finished episodes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError, StoreError
from attnstore.outputs import check_writable_dir
from attnstore.readers.selection import episode_outcome, episode_rows

SHARE_LABEL = "share of action-token attention"
ENTROPY_LABEL = "entropy over keys (bits)"


@dataclass
class Summary:
    """Per-inference tables behind every figure (small: no key axis left)."""

    shares: xr.DataArray  # (inference, denoise, layer, region)
    entropy: xr.DataArray  # (inference, denoise, layer), bits
    episode: np.ndarray  # (inference,) episode of each row
    env_step: np.ndarray  # (inference,)
    regions: list[str]  # present cameras, language, action (missing cameras dropped)
    outcomes: dict[int, str] = field(default_factory=dict)  # episode -> success/failure/unfinished


def summarize(ds: xr.Dataset, rows: np.ndarray | None = None, source: str = "auto") -> Summary:
    """Region shares and entropy of ``rows`` (default: every row), computed in one pass.

    ``source``: ``"summary"`` (every expert layer, from the per-layer summaries), ``"attention"`` (the
    layers stored in full) or ``"auto"`` (the summaries when the store has them).
    """
    import dask

    from attnstore.readers.analysis import entropy, region_shares
    from attnstore.schema.variables import SUMMARY_REGION_MASS
    from attnstore.store.open import spec_of

    spec = spec_of(ds)
    if rows is not None:
        ds = ds.isel({S.INFERENCE: np.asarray(rows)})
    if source == "auto":
        source = "summary" if SUMMARY_REGION_MASS in ds else "attention"
    shares = region_shares(ds, heads="mean", queries="mean", source=source)
    ent = entropy(ds, source=source)  # nats per (inference, denoise, layer, head, query), over the valid keys
    ent = ent.mean([d for d in (S.HEAD, S.QUERY) if d in ent.dims])  # mean of entropies, not of maps
    shares, ent = dask.compute(shares, ent)
    present = [c for c, p in zip(spec.layout.cameras, spec.layout.camera_present) if p]
    regions = [*present, S.REGION_LANGUAGE, S.REGION_ACTION]
    order = (S.INFERENCE, S.DENOISE, S.LAYER)
    episodes = np.asarray(ds[S.EPISODE].values)
    return Summary(
        shares=shares.sel({S.REGION: regions}).transpose(*order, S.REGION),
        entropy=ent.transpose(*order) / np.log(2.0),
        episode=episodes,
        env_step=np.asarray(ds[S.ENV_STEP].values),
        regions=regions,
        outcomes={int(e): episode_outcome(ds, int(e)) for e in np.unique(episodes)},
    )


def by_env_step(values: np.ndarray, env_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` (rows first) over the rows sharing an env step; returns (steps, means).

    >>> by_env_step(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 10]))
    (array([ 0, 10]), array([2., 5.]))
    """
    steps, inverse = np.unique(env_step, return_inverse=True)
    sums = np.zeros((steps.size, *values.shape[1:]))
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=steps.size).reshape(-1, *([1] * (values.ndim - 1)))
    return steps, sums / counts


@dataclass
class PlotResult:
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_plots(
    store: str | os.PathLike[str] | Any, out_dir: str | os.PathLike[str], episode: int | None = None, *,
    storage_options: Mapping[str, Any] | None = None,
) -> PlotResult:
    """Write the summary figures of one episode (or of all episodes) into the local folder ``out_dir``.

    ``store``: anything :func:`attnstore.open_attention` opens (a path, an fsspec URL with
    ``storage_options``, a zarr Store object).
    """
    from attnstore.store.location import locate
    from attnstore.store.open import open_attention

    location = locate(store, storage_options)
    ds = open_attention(location)
    rows = None if episode is None else episode_rows(ds, episode)
    if ds.sizes[S.INFERENCE] == 0:
        raise SelectionError(f"{location.name} holds no committed inference: nothing to plot")
    out = check_writable_dir(out_dir, "output folder", hint="pass --out DIR")  # before any figure is computed
    summary = summarize(ds, rows)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write output folder {out}: {exc.strerror or exc}; pass --out DIR") from exc
    result = PlotResult()
    layer = int(summary.shares[S.LAYER].values[-1])
    denoise = int(summary.shares[S.DENOISE].values[-1])
    time = float(ds[S.TIME].sel({S.DENOISE: denoise}).values)
    who = (
        f"episode {episode} ({summary.outcomes[episode]})"
        if episode is not None
        else f"mean over {len(summary.outcomes)} episode(s)"
    )
    at = f"layer {layer}, denoise step {denoise} (t={time:.2f}), mean over heads and action tokens"
    figures = {
        "region_shares.png": region_shares_figure(summary, layer, denoise, f"{who} — {at}"),
        "entropy_per_denoise.png": entropy_figure(summary, ds, f"{who} — mean over inferences, heads, action tokens"),
        "per_layer.png": per_layer_figure(summary, denoise, f"{who} — denoise step {denoise} (t={time:.2f})"),
    }
    finished = {e: o for e, o in summary.outcomes.items() if o != "unfinished"}
    if episode is None and len(finished) >= 2:
        figures["success_vs_failure.png"] = success_failure_figure(summary, layer, denoise, at)
    elif episode is None:
        result.notes.append("fewer than two finished episodes: no success vs failure figure")
    for name, fig in figures.items():
        path = out / name
        _save(fig, path)
        result.figures.append(path)
    return result


# ---- figures -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw_shares(ax, summary: Summary, mask: np.ndarray, layer: int, denoise: int) -> None:
    from matplotlib.ticker import MaxNLocator

    shares = summary.shares.sel({S.LAYER: layer, S.DENOISE: denoise}).values[mask]
    steps, means = by_env_step(shares, summary.env_step[mask])
    for i, region in enumerate(summary.regions):
        ax.plot(steps, means[:, i], marker="o", markersize=3, label=region)
    ax.set_xlabel("env step (20 Hz)")
    ax.set_ylabel(f"{SHARE_LABEL} (fraction)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def region_shares_figure(summary: Summary, layer: int, denoise: int, subtitle: str):
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    _draw_shares(ax, summary, np.ones(summary.episode.size, bool), layer, denoise)
    ax.legend(title="region", loc="upper right", fontsize=8)
    fig.suptitle("Where the action tokens look, over the episode", fontweight="bold")
    ax.set_title(subtitle, fontsize=8)
    return fig


def entropy_figure(summary: Summary, ds: xr.Dataset, subtitle: str):
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    ent = summary.entropy
    denoise = ent[S.DENOISE].values
    layers = ent[S.LAYER].values
    many = len(layers) > 4  # every layer (summaries): one colour per layer, no bands
    colours = _layer_colours(len(layers)) if many else [None] * len(layers)
    for layer, colour in zip(layers, colours):
        per_row = ent.sel({S.LAYER: layer}).values  # (inference, denoise)
        mean = per_row.mean(0)
        ax.plot(denoise, mean, marker="o", markersize=3 if many else 6, color=colour, label=f"layer {int(layer)}")
        if not many:
            lo, hi = np.percentile(per_row, [25, 75], axis=0)
            ax.fill_between(denoise, lo, hi, alpha=0.2)
    times = ds[S.TIME].sel({S.DENOISE: denoise}).values
    ax.set_xticks(denoise, [f"{int(d)}\nt={t:.1f}" for d, t in zip(denoise, times)], fontsize=7)
    ax.set_xlabel("denoise step (flow-matching time t)")
    ax.set_ylabel(ENTROPY_LABEL)
    ax.grid(alpha=0.3)
    title = "expert layer" if many else "expert layer (band: 25-75% of inferences)"
    ax.legend(title=title, fontsize=6 if many else 8, ncol=3 if many else 1)
    fig.suptitle("Attention entropy per denoise step", fontweight="bold")
    ax.set_title(subtitle, fontsize=8)
    return fig


def _layer_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def per_layer_figure(summary: Summary, denoise: int, subtitle: str):
    fig = _figure(max(9, 3 + 0.45 * summary.shares.sizes[S.LAYER]), 4.5)
    ax_share, ax_ent = fig.subplots(1, 2, width_ratios=(3, 2))
    layers = [int(v) for v in summary.shares[S.LAYER].values]
    shares = summary.shares.sel({S.DENOISE: denoise}).mean(S.INFERENCE).values  # (layer, region)
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    for i, region in enumerate(summary.regions):
        ax_share.bar(x, shares[:, i], bottom=bottom, label=region, width=0.6)
        bottom += shares[:, i]
    ax_share.set_xticks(x, [str(v) for v in layers])
    ax_share.set_xlabel("action-expert layer")
    ax_share.set_ylabel(f"{SHARE_LABEL} (fraction)")
    ax_share.set_ylim(0, 1.0)
    ax_share.legend(title="region", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_share.set_title("share per region", fontsize=9)
    ent = summary.entropy.sel({S.DENOISE: denoise}).values  # (inference, layer)
    ax_ent.boxplot([ent[:, j] for j in range(len(layers))], tick_labels=[str(v) for v in layers])
    ax_ent.set_xlabel("action-expert layer")
    ax_ent.set_ylabel(ENTROPY_LABEL)
    ax_ent.set_title("entropy over inferences", fontsize=9)
    ax_ent.grid(alpha=0.3)
    fig.suptitle(f"Attention per layer — {subtitle}", fontweight="bold", fontsize=10)
    return fig


def success_failure_figure(summary: Summary, layer: int, denoise: int, subtitle: str):
    fig = _figure(12, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, outcome in zip(axes, ("success", "failure")):
        episodes = [e for e, o in summary.outcomes.items() if o == outcome]
        mask = np.isin(summary.episode, episodes)
        if mask.any():
            _draw_shares(ax, summary, mask, layer, denoise)
        else:
            ax.text(0.5, 0.5, f"no {outcome} episodes in this store", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xlabel("env step (20 Hz)")
        ax.set_title(f"{outcome}: {len(episodes)} episode(s), mean per env step", fontsize=9)
    axes[0].set_ylabel(f"{SHARE_LABEL} (fraction)")
    axes[1].set_ylabel("")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, title="region", loc="outside right upper", fontsize=8)
    fig.suptitle(f"Successful vs failed episodes — {subtitle}", fontweight="bold", fontsize=10)
    return fig


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

