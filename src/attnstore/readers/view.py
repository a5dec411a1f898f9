"""``attnstore view``: scrub one episode's attention in the Rerun viewer (like lerobot-dataset-viz).

:func:`load_episode` reads everything one episode shows into numpy (one pass over its attention
chunks), :func:`log_episode` logs it to a Rerun ``RecordingStream``, :func:`episode_blueprint` lays
it out; :func:`write_rrd` saves an ``.rrd`` and :func:`stream_to` feeds a recording whose sink is set
(the ``attnstore view`` command spawns a viewer or serves gRPC / the web viewer). Grids come from the
readers' own :func:`~attnstore.readers.action_to_visual`; rerun-sdk is imported only here, lazily.

Entity paths (``L`` = layer label, ``D`` = denoise step index), one row per inference, logged at
its env step on the timelines ``frame_index`` (env step = video frame) and ``time`` (env step / 20 Hz):

* ``cameras/<cam>/image``: the 224x224 image the policy saw, drawn half-transparent on top of
* ``cameras/<cam>/attention/layer_L/denoise_D``: the heat map (a colour-mapped float image, each
  16x16-grid patch spread over its 14x14 pixels; one entity per chosen layer and denoise step);
* ``shares/<region>/layer_L/denoise_D`` and ``entropy/layer_L/denoise_D``: scalars over the episode;
* ``actions`` (first action of each predicted chunk, one series per dim), ``state`` (if stored);
* ``language/layer_L/denoise_D``: the prompt tokens with each one's share of the attention;
* ``episode/info`` (static text) and ``episode/success`` (1/0 at the episode's last frame).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, SelectionError
from attnstore.readers.aggregate import reduce_dim
from attnstore.readers.overlay import CONTROL_HZ
from attnstore.readers.render import upsample_grid
from attnstore.readers.selection import describe_values, episode_outcome, episode_rows, pick_cameras

FRAME = "frame_index"  # timeline: env step = video frame (as lerobot-dataset-viz)
TIME = "time"  # timeline: seconds at the 20 Hz control rate
VIZ_HINT = "pip install 'attnstore[viz]'"
COLORMAP = "inferno"  # as attnstore overlay
IMAGE_OPACITY = 0.5  # the camera image over its heat map: a 50/50 blend, as overlay's default alpha


class ViewerError(AttnStoreError):
    """The viewer cannot run as asked: rerun-sdk missing, no display, a port in use (one line, exit 2)."""


def require_rerun():
    """The ``rerun`` module, or a one-line error naming the extra that installs it."""
    try:
        import rerun
        import rerun.blueprint  # noqa: F401
    except ImportError as exc:
        raise ViewerError(f"attnstore view needs rerun-sdk ({exc}): {VIZ_HINT}") from None
    return rerun


@dataclass
class ViewOptions:
    """What to show. ``layers``: ``"last"``, ``"all"`` or labels; ``denoise``: ``"final"``, ``"all"`` or
    step indices; ``heads``: ``mean``/``max``/a head; ``action``: ``mean``/one action token (query);
    ``scale``: ``camera`` (grid renormalised within the camera) or ``total`` (share of all attention).
    ``episode`` None = the store's first episode."""

    episode: int | None = None
    layers: Any = "last"
    denoise: Any = "final"
    heads: Any = "mean"
    action: Any = "mean"
    scale: Literal["camera", "total"] = "camera"

    def __post_init__(self) -> None:
        self.heads = _choice(self.heads, ("mean", "max"), "--heads")
        self.action = _choice(self.action, ("mean",), "--action-idx")
        if self.scale not in ("camera", "total"):
            raise SelectionError(f"--scale must be camera or total, got '{self.scale}'")


def _choice(value: object, words: tuple[str, ...], flag: str) -> int | str:
    """A word or a non-negative index.

    >>> _choice("2", ("mean",), "--action-idx"), _choice("max", ("mean", "max"), "--heads")
    (2, 'max')
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


def pick_labels(have: list[int], wanted: Any, words: dict[str, slice], what: str, flag: str) -> list[int]:
    """Captured labels from a word (``last``/``all``...) or a list of labels; the error lists them.

    >>> pick_labels([16, 17], "last", {"last": slice(-1, None), "all": slice(None)}, "layer", "--layers")
    [17]
    >>> pick_labels([16, 17], ["16", 17, 16], {}, "layer", "--layers")
    [16, 17]
    """
    values = [wanted] if isinstance(wanted, (str, int)) else list(wanted)
    picked: list[int] = []
    for value in values:
        if isinstance(value, str) and value in words:
            picked.extend(have[words[value]])
            continue
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise SelectionError(f"{flag} {value!r}: use {', '.join(words)} or {what} numbers") from None
        if label not in have:
            raise SelectionError(f"{what} {label} was not captured; this store holds {what}s {describe_values(have)}")
        picked.append(label)
    return sorted(set(picked))


def heat_path(camera: str, layer: int, denoise: int) -> str:
    """Entity path of one heat-map layer: ``cameras/<cam>/attention/layer_L/denoise_D``."""
    return f"cameras/{camera}/attention/{_tag(layer, denoise)}"


def _tag(layer: int, denoise: int) -> str:
    return f"layer_{layer}/denoise_{denoise}"


@dataclass
class EpisodeData:
    """Everything one episode shows, as numpy; row i = the episode's i-th inference (rollout order)."""

    name: str  # recording / file name stem
    episode: int
    env_step: np.ndarray  # (n,)
    cameras: list[str]
    layers: list[int]
    denoise: list[int]
    times: list[float]  # flow-matching t of each chosen denoise step
    grids: dict[str, np.ndarray]  # cam -> (n, denoise, layer, patch_row, patch_col)
    regions: list[str]  # present cameras, language, action
    shares: np.ndarray  # (n, denoise, layer, region)
    entropy: np.ndarray  # (n, denoise, layer), nats, mean over heads/tokens (or the chosen ones)
    token_share: np.ndarray  # (n, denoise, layer, language_token): share of all attention
    tokens: list[list[str]]  # per row, the prompt's token texts ("" = padding)
    picture: tuple[int, int]  # (height, width) of the images / heat maps
    images: dict[str, np.ndarray] | None  # cam -> (n, H, W, 3) uint8
    actions: np.ndarray | None  # (n, action_dim): first action of each chunk
    state: np.ndarray | None  # (n, state_dim)
    outcome: str  # success / failure / unfinished
    info: dict[str, Any] = field(default_factory=dict)  # episode table row + choices
    end_step: int | None = None  # last video frame of a finished episode
    notes: list[str] = field(default_factory=list)


def load_episode(ds, options: ViewOptions, name: str = "attention") -> EpisodeData:
    """Compute one episode's grids, shares, entropy and token shares (one dask pass) and read its rows."""
    import dask

    from attnstore.readers import action_to_visual, entropy, region_shares
    from attnstore.readers.aggregate import aggregate
    from attnstore.store.open import spec_of

    spec = spec_of(ds)
    episodes = sorted({int(e) for e in np.asarray(ds[S.EPISODE].values)})
    if not episodes:
        raise SelectionError("the store holds no committed inference yet: nothing to view")
    episode = episodes[0] if options.episode is None else int(options.episode)
    rows = episode_rows(ds, episode)
    layers = pick_labels([int(v) for v in ds[S.LAYER].values], options.layers,
                         {"last": slice(-1, None), "all": slice(None)}, "layer", "--layers")
    steps = pick_labels([int(v) for v in ds[S.DENOISE].values], options.denoise,
                        {"final": slice(-1, None), "all": slice(None)}, "denoise step", "--denoise")
    for value, size, flag, what in ((options.heads, spec.num_heads, "--heads", "head"),
                                    (options.action, spec.layout.num_action, "--action-idx", "action token")):
        if isinstance(value, int) and not 0 <= value < size:
            raise SelectionError(f"{flag} {value} is out of range: this store has {size} {what}s (0-{size - 1})")
    cameras, notes = pick_cameras(spec.layout, None)

    sub = ds.isel({S.INFERENCE: rows}).sel({S.LAYER: layers, S.DENOISE: steps})
    order = (S.INFERENCE, S.DENOISE, S.LAYER)
    how = {"heads": options.heads, "queries": options.action}
    lazy_grids = [action_to_visual(sub, cam, renormalize=options.scale == "camera", **how)
                  .transpose(*order, S.PATCH_ROW, S.PATCH_COL) for cam in cameras]
    shares = region_shares(sub, **how).transpose(*order, S.REGION)
    ent = entropy(sub)  # per head and action token: pick or average those, never average the maps
    for dim, value in ((S.HEAD, options.heads), (S.QUERY, options.action)):
        ent = reduce_dim(ent, dim, value if isinstance(value, int) else "mean")
    agg = aggregate(sub, **how).transpose(*order, S.KEY)
    region = np.array([str(v) for v in np.asarray(ds[S.KEY_REGION].values)])
    lang = np.flatnonzero(region == S.REGION_LANGUAGE)
    token_share = agg.isel({S.KEY: lang}) / agg.sum(S.KEY)
    lazy = [*lazy_grids, shares, ent.transpose(*order), token_share]
    extra = {v: sub[v] for v in (S.IMAGES, S.ACTIONS, getattr(S, "STATE", "state"), S.LANGUAGE_TOKEN_TEXT) if v in sub}
    computed = dask.compute(*lazy, *extra.values())
    grids = {cam: np.nan_to_num(np.asarray(g.values, np.float32)) for cam, g in zip(cameras, computed)}
    shares_c, ent_c, tok_c = computed[len(cameras) : len(cameras) + 3]
    got = dict(zip(extra, computed[len(cameras) + 3 :]))

    n = len(rows)
    texts = got.get(S.LANGUAGE_TOKEN_TEXT)
    if texts is not None:
        tokens = [[str(t) for t in row] for row in np.asarray(texts.values)]
    else:  # no stored text: label the valid language keys by position
        valid = np.asarray(sub[S.KEY_VALID].values)[:, lang]
        tokens = [[f"<{k}>" if v else "" for k, v in enumerate(row)] for row in valid]
        notes.append("this store holds no prompt text: tokens are shown by position")
    images = None
    if S.IMAGES in got:
        pics = np.asarray(got[S.IMAGES].values)
        stored = [str(c) for c in np.asarray(ds[S.CAMERA].values)]
        images = {cam: pics[:, stored.index(cam)] for cam in cameras if cam in stored}
        picture = pics.shape[2:4]
    else:
        notes.append("this store holds no images: showing the heat maps alone")
        picture = (spec.layout.grid_rows * 14, spec.layout.grid_cols * 14)  # SigLIP's 14-pixel patches
    actions = np.asarray(got[S.ACTIONS].values)[:, 0, :] if S.ACTIONS in got else None
    state_var = getattr(S, "STATE", "state")
    state = np.asarray(got[state_var].values).reshape(n, -1) if state_var in got else None

    present = [c for c, p in zip(spec.layout.cameras, spec.layout.camera_present) if p]
    regions = [*present, S.REGION_LANGUAGE, S.REGION_ACTION]
    region_index = [list(np.asarray(shares_c[S.REGION].values)).index(r) for r in regions]
    info = _episode_info(ds, episode)
    outcome = episode_outcome(ds, episode)
    env_step = np.asarray(ds[S.ENV_STEP].values)[rows].astype(np.int64)
    end = info.get(S.NUM_ENV_STEPS)
    times = [float(ds[S.TIME].sel({S.DENOISE: d}).values) for d in steps]
    return EpisodeData(
        name=name, episode=episode, env_step=env_step, cameras=cameras, layers=layers, denoise=steps,
        times=times, grids=grids, regions=regions,
        shares=np.asarray(shares_c.values, np.float64)[..., region_index],
        entropy=np.asarray(ent_c.values, np.float64), token_share=np.asarray(tok_c.values, np.float64),
        tokens=tokens, picture=(int(picture[0]), int(picture[1])), images=images, actions=actions, state=state,
        outcome=outcome, info=info, notes=notes,
        end_step=max(int(end) - 1, int(env_step.max())) if end is not None and outcome != "unfinished" else None,
    )


def _episode_info(ds, episode: int) -> dict[str, Any]:
    if S.EPISODE_INDEX not in ds.dims:
        return {}
    hit = np.flatnonzero(np.asarray(ds[S.EPISODE_INDEX].values) == episode)
    if hit.size == 0:
        return {}
    values = {v: np.asarray(ds[v].values)[hit[0]] for v in S.EPISODE_VARS if v in ds}
    return {k: v.item() if isinstance(v, np.generic) else str(v) for k, v in values.items()}


def episode_blueprint(data: EpisodeData):
    """Cameras side by side (image over the default heat map; the other layers listed, hidden), the
    prompt and episode text beside them, time series (shares + success, entropy, actions, state) below."""
    import rerun.blueprint as rrb

    shown = _tag(data.layers[-1], data.denoise[-1])
    behavior = getattr(rrb, "EntityBehavior", None)  # per-entity visibility (newer rerun-sdk)
    views = []
    for cam in data.cameras:
        hidden = [heat_path(cam, layer, d) for layer in data.layers for d in data.denoise
                  if _tag(layer, d) != shown]
        overrides = {p: behavior(visible=False) for p in hidden} if behavior is not None and hidden else None
        views.append(rrb.Spatial2DView(origin=f"cameras/{cam}", name=f"{cam} · attention {shown}",
                                       overrides=overrides))
    text = rrb.Vertical(rrb.TextDocumentView(origin=f"language/{shown}", name=f"prompt · {shown}"),
                        rrb.TextDocumentView(origin="episode/info", name="episode"), row_shares=[3, 1])
    series = [rrb.TimeSeriesView(origin="/", contents=["+ /shares/**", "+ /episode/success"],
                                 name="share per region · success"),
              rrb.TimeSeriesView(origin="entropy", name="entropy (nats)")]
    if data.actions is not None:
        series.append(rrb.TimeSeriesView(origin="actions", name="actions (first of each chunk)"))
    if data.state is not None:
        series.append(rrb.TimeSeriesView(origin="state", name="state"))
    top = rrb.Horizontal(*views, text, column_shares=[*([2] * len(views)), 1])
    panels = [rrb.BlueprintPanel(state="expanded"), rrb.SelectionPanel(state="collapsed"),
              rrb.TimePanel(state="collapsed", timeline=FRAME)]
    return rrb.Blueprint(rrb.Vertical(top, rrb.Horizontal(*series), row_shares=[3, 2]), *panels)


def log_episode(rec, data: EpisodeData) -> None:
    """Log ``data`` to the recording ``rec``: static styling and text first, then one row per inference."""
    import rerun as rr

    for layer, d in product(data.layers, data.denoise):
        for region in data.regions:
            rec.log(f"shares/{region}/{_tag(layer, d)}", rr.SeriesLines(names=f"{region} L{layer} d{d}"), static=True)
        rec.log(f"entropy/{_tag(layer, d)}", rr.SeriesLines(names=f"L{layer} d{d}"), static=True)
    for entity, values in (("actions", data.actions), ("state", data.state)):
        if values is not None:
            rec.log(entity, rr.SeriesLines(names=[f"{entity} {k}" for k in range(values.shape[1])]), static=True)
    if data.end_step is not None:
        rec.log("episode/success", rr.SeriesPoints(names="success", markers="diamond", marker_sizes=6.0), static=True)
    rec.log("episode/info", rr.TextDocument(_info_text(data), media_type=rr.MediaType.MARKDOWN), static=True)

    vmax = {cam: np.maximum(g.max(axis=(0, 3, 4)), 1e-12) for cam, g in data.grids.items()}  # (D, L)
    h, w = data.picture
    for row, step in enumerate(data.env_step):
        _set_time(rec, int(step))
        for cam in data.cameras:
            if data.images is not None and cam in data.images:
                rec.log(f"cameras/{cam}/image", rr.Image(data.images[cam][row], opacity=IMAGE_OPACITY, draw_order=10.0))
            for j, d in enumerate(data.denoise):
                for i, layer in enumerate(data.layers):
                    heat = upsample_grid(data.grids[cam][row, j, i], h, w).astype(np.float32)
                    rec.log(heat_path(cam, layer, d), rr.DepthImage(
                        heat, meter=1.0, colormap=COLORMAP, depth_range=[0.0, float(vmax[cam][j, i])],
                        draw_order=float(i + j * len(data.layers))))
        for j, d in enumerate(data.denoise):
            for i, layer in enumerate(data.layers):
                for r, region in enumerate(data.regions):
                    rec.log(f"shares/{region}/{_tag(layer, d)}", rr.Scalars(data.shares[row, j, i, r]))
                rec.log(f"entropy/{_tag(layer, d)}", rr.Scalars(data.entropy[row, j, i]))
                text = _prompt_text(data.tokens[row], data.token_share[row, j, i], layer, d, data.times[j])
                rec.log(f"language/{_tag(layer, d)}", rr.TextDocument(text, media_type=rr.MediaType.MARKDOWN))
        if data.actions is not None:
            rec.log("actions", rr.Scalars(data.actions[row]))
        if data.state is not None:
            rec.log("state", rr.Scalars(data.state[row]))
    if data.end_step is not None:
        _set_time(rec, data.end_step)
        rec.log("episode/success", rr.Scalars(1.0 if data.outcome == "success" else 0.0))


def _set_time(rec, env_step: int) -> None:
    rec.set_time(FRAME, sequence=env_step)
    rec.set_time(TIME, duration=env_step / CONTROL_HZ)


def _prompt_text(tokens: list[str], shares: np.ndarray, layer: int, d: int, t: float) -> str:
    """Markdown table of the prompt's tokens (padding skipped) with each one's share of all attention."""
    keep = [k for k, tok in enumerate(tokens) if tok != ""]
    total = float(np.nansum(shares[keep])) if keep else 0.0
    top = max((float(shares[k]) for k in keep), default=0.0) or 1.0
    lines = [f"**layer {layer} · denoise step {d} (t={t:.2f})**: share of the action tokens' attention per "
             f"prompt token; language total {100 * total:.1f}%", "", "| # | token | share | |", "|---:|---|---:|---|"]
    for k in keep:
        tok = tokens[k].replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", "\\n")
        bar = "#" * int(round(12 * float(shares[k]) / top))  # ASCII: the web viewer's font has no block glyphs
        lines.append(f"| {k} | {tok} | {100 * float(shares[k]):.2f}% | {bar} |")
    return "\n".join(lines)


def _info_text(data: EpisodeData) -> str:
    info = data.info
    rows = [("store", data.name), ("episode", data.episode), ("outcome", data.outcome),
            ("task", f"{info.get(S.TASK_GROUP, '?')} #{info.get(S.TASK_ID, '?')}: {info.get(S.TASK, '?')}"),
            ("env steps", info.get(S.NUM_ENV_STEPS, "unfinished")), ("inferences", len(data.env_step)),
            ("layers", ", ".join(map(str, data.layers))),
            ("denoise steps", ", ".join(f"{d} (t={t:.2f})" for d, t in zip(data.denoise, data.times))),
            *((k, v) for k, v in data.info.get("choices", {}).items())]
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def open_episode(store, options: ViewOptions, *, run: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> EpisodeData:
    """Open ``store`` (anything :func:`attnstore.open_attention` takes: a path, an fsspec URL with
    ``storage_options``, a zarr Store object) or run ``run`` of a study (a folder/URL holding runs, as
    :func:`attnstore.open_study` reads) and load one episode."""
    from attnstore import open_attention
    from attnstore.readers.runs import pick_run

    location, name = pick_run(store, run, storage_options)
    data = load_episode(open_attention(location), options, name=name)
    data.info["choices"] = {"heads": options.heads, "action tokens": options.action,
                            "heat-map scale": "share of the camera's attention" if options.scale == "camera"
                            else "share of all attention"}
    return data


def new_recording(data: EpisodeData):
    """A Rerun ``RecordingStream`` for ``data``, its application id naming the store and episode."""
    rr = require_rerun()
    return rr.RecordingStream(f"attnstore/{data.name}/episode_{data.episode}")


def write_rrd(data: EpisodeData, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/<store-name>_episode_<E>.rrd`` (blueprint included) via a temporary name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{data.name}_episode_{data.episode}.rrd"
    partial = final.with_name(f".{final.name}.partial")
    rec = new_recording(data)
    rec.save(partial, default_blueprint=episode_blueprint(data))
    try:
        log_episode(rec, data)
        rec.flush()
        rec.disconnect()  # closes the file, footer included
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def stream_to(rec, data: EpisodeData) -> None:
    """Log ``data`` to a recording whose sink (spawned viewer, gRPC server) is already set."""
    # a default blueprint passed to serve_grpc hangs rerun-sdk 0.33 on a non-global recording: send it instead
    rec.send_blueprint(episode_blueprint(data), make_active=True, make_default=True)
    log_episode(rec, data)
    rec.flush()
