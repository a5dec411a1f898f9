"""The variable table: every array of a store, declared once.

Creating a store, validating and writing an inference, opening and inspecting all loop over
:data:`VARIABLES`; none of them names a variable of its own. Each :class:`Variable` says its dims, dtype,
fill value, encoding, whether a spec has it and the shape it takes from the spec.

Three roles:

* ``coord``: static coordinates written once at creation (``values(spec)``);
* ``row``: one row per inference on the growing ``inference`` axis. ``source="batch"`` rows come from
  the :class:`~attnstore.store.writer.InferenceBatch` under the variable's name; ``source="writer"`` rows
  (``episode``, ``rollout``, ``env_step``) the writer derives. ``episode`` is the commit marker: written last;
* ``episode``: one row per finished episode on the ``episode_index`` axis, from an ``EpisodeRecord`` field of
  the same name; ``episode_index`` is that table's commit marker.

Adding a per-inference variable is one entry here with ``shape_from_spec=True`` (its row shape then
lives in ``StoreSpec.extra_shapes``) plus the recorder line that fills it:

>>> [v.name for v in row_variables(_example_spec())]
['episode', 'rollout', 'env_step', 'attention', 'key_valid', 'language_token_id', 'language_token_text', 'state']
>>> VARIABLE["state"].row_shape(_example_spec()), VARIABLE["attention"].row_shape(_example_spec())
((8,), (1, 1, 8, 50, 1018))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from attnstore.schema import names as N
from attnstore.schema.spec import StoreSpec

Role = Literal["coord", "row", "episode"]

# ---- per-layer summaries (capture/summary.py computes them on the device; readers/regions.py reads them) ----
SUMMARY_LAYER = "summary_layer"  # dim + coord: the expert layers with a summary (usually all)
SUMMARY_PREFIX_LAYER = "summary_prefix_layer"  # dim + coord: the VLM layers with a prefix summary
REGION = N.REGION  # dim + coord: the key regions (each camera slot, language, action), layout order
GRID_ROW, GRID_COL = "grid_row", "grid_col"  # dims of summary_grid (patch_row/patch_col are key coords)
SUMMARY_REGION_MASS = "summary_region_mass"
SUMMARY_ENTROPY = "summary_entropy"
SUMMARY_GRID = "summary_grid"
SUMMARY_PREFIX_REGION_MASS = "summary_prefix_region_mass"
SUMMARY_PREFIX_ENTROPY = "summary_prefix_entropy"
SUMMARY_VARIABLES = (SUMMARY_REGION_MASS, SUMMARY_ENTROPY, SUMMARY_GRID, SUMMARY_PREFIX_REGION_MASS,
                     SUMMARY_PREFIX_ENTROPY)
# coord on the layer axis (only when the spec has ``layer_kinds``, e.g. SmolVLA): "self" or "cross" per layer
LAYER_KIND = "layer_kind"
Shape = tuple[int, ...]

INFERENCE_COORDINATES = " ".join(N.INFERENCE_COORDS)
KEY_COORDINATES = " ".join(N.KEY_COORDS)


@dataclass(frozen=True)
class Variable:
    """One array of a store: name, dims, dtype and where its shape and values come from."""

    name: str
    role: Role
    dims: tuple[str, ...]
    dtype: Any  # a numpy dtype, or ``str`` for zarr's variable-length strings
    # shape of one row (row/episode role; coords: only None = absent matters, values() gives the array)
    shape: Callable[[StoreSpec], Shape | None] | None = None
    fill: Any = 0
    values: Callable[[StoreSpec], np.ndarray] | None = None  # coord role: the values
    attention_codec: bool = False  # encoded with the spec's attention encoding (else the default compressor)
    source: Literal["batch", "writer", "record"] = "batch"
    chunk_rows: int = 1  # rows per chunk on the growing axis (one inference per chunk for the big arrays)
    shape_from_spec: bool = False  # row shape from ``spec.extra_shapes[name]``; absent when not named there
    coordinates: str = ""  # the CF ``coordinates`` attr (which coords belong to it)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def row_shape(self, spec: StoreSpec) -> Shape | None:
        """Shape of one row (``row``/``episode`` role) or of the whole array (``coord``); None = not stored."""
        if self.shape_from_spec:
            return spec.extra_shapes.get(self.name)
        return () if self.shape is None else self.shape(spec)

    def stored(self, spec: StoreSpec) -> bool:
        return self.row_shape(spec) is not None

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The dtype rows are converted to before writing (None for strings)."""
        return None if self.dtype is str else np.dtype(self.dtype)


def _language(spec: StoreSpec) -> Shape | None:
    n = spec.layout.num_language
    return (n,) if spec.store_language_tokens and n else None


def _images(spec: StoreSpec) -> Shape | None:
    if spec.image_shape is None:
        return None
    return (sum(spec.layout.camera_present), *spec.image_shape)


def _prefix(spec: StoreSpec) -> Shape | None:
    return spec.prefix_attention_shape_per_inference if spec.prefix_layers else None


def _summary(spec: StoreSpec, *per_layer: int) -> Shape | None:
    """(denoise, summary_layer, *per_layer) when the spec has expert-layer summaries."""
    return (len(spec.denoise_steps), len(spec.summary_layers), *per_layer) if spec.summary_layers else None


def _summary_grid(spec: StoreSpec) -> Shape | None:
    lay = spec.layout
    n = sum(lay.camera_present)
    return _summary(spec, n, lay.grid_rows, lay.grid_cols) if n else None


def _prefix_summary(spec: StoreSpec, *per_query: int) -> Shape | None:
    n = len(spec.summary_prefix_layers)
    return (n, spec.num_heads, spec.layout.prefix_len, *per_query) if n else None


def _present_cameras(spec: StoreSpec) -> np.ndarray:
    lay = spec.layout
    return np.asarray([c for c, p in zip(lay.cameras, lay.camera_present) if p], dtype=str)


def _key_coord(name: str) -> Variable:
    dtype = str if name in (N.KEY_KIND, N.KEY_REGION) else np.int16
    return Variable(name, "coord", (N.KEY,), dtype, values=lambda s: s.layout.key_coords()[name],
                    fill="" if dtype is str else 0)


def _episode_var(name: str, dtype: Any, fill: Any) -> Variable:
    return Variable(name, "episode", (N.EPISODE_INDEX,), dtype, fill=fill, source="record",
                    chunk_rows=N.EPISODE_CHUNK)


def _index_var(name: str, dtype: Any) -> Variable:
    return Variable(name, "row", (N.INFERENCE,), dtype, fill=N.UNCOMMITTED, source="writer", chunk_rows=N.INDEX_CHUNK)


_ROW = dict(role="row", coordinates=INFERENCE_COORDINATES)
_SUMMARY_COORDINATES = f"{INFERENCE_COORDINATES} {N.TIME}"

VARIABLES: tuple[Variable, ...] = (
    # ---- static coordinates ----
    Variable(N.DENOISE, "coord", (N.DENOISE,), np.int16, values=lambda s: np.asarray(s.denoise_steps, np.int16)),
    Variable(N.TIME, "coord", (N.DENOISE,), np.float32, values=lambda s: np.asarray(s.times, np.float32),
             attrs={"long_name": "flow-matching time t"}),
    Variable(N.LAYER, "coord", (N.LAYER,), np.int16, values=lambda s: np.asarray(s.layers, np.int16),
             attrs={"long_name": "action-expert layer index"}),
    Variable(LAYER_KIND, "coord", (N.LAYER,), str, shape=lambda s: () if s.layer_kinds else None,
             values=lambda s: np.asarray(s.layer_kinds, dtype=str), fill="",
             attrs={"long_name": "attention kind of the layer: self (prefix and action keys) or cross "
                                 "(the VLM's prefix keys only; its action keys are 0)"}),
    Variable(N.HEAD, "coord", (N.HEAD,), np.int16, values=lambda s: np.arange(s.num_heads, dtype=np.int16)),
    Variable(N.QUERY, "coord", (N.QUERY,), np.int16, values=lambda s: np.arange(s.layout.num_action, dtype=np.int16),
             attrs={"long_name": "action token"}),
    *(_key_coord(name) for name in N.KEY_COORDS),
    Variable(N.LANGUAGE_TOKEN, "coord", (N.LANGUAGE_TOKEN,), np.int16, shape=_language,
             values=lambda s: np.arange(s.layout.num_language, dtype=np.int16)),
    Variable(N.CAMERA, "coord", (N.CAMERA,), str,
             shape=lambda s: None if s.image_shape is None and _summary_grid(s) is None else (),
             values=_present_cameras, fill=""),
    Variable(N.PREFIX_LAYER, "coord", (N.PREFIX_LAYER,), np.int16, shape=lambda s: () if s.prefix_layers else None,
             values=lambda s: np.asarray(s.prefix_layers, np.int16)),
    Variable(SUMMARY_LAYER, "coord", (SUMMARY_LAYER,), np.int16, shape=lambda s: () if s.summary_layers else None,
             values=lambda s: np.asarray(s.summary_layers, np.int16),
             attrs={"long_name": "action-expert layer index (per-layer summaries)"}),
    Variable(SUMMARY_PREFIX_LAYER, "coord", (SUMMARY_PREFIX_LAYER,), np.int16,
             shape=lambda s: () if s.summary_prefix_layers else None,
             values=lambda s: np.asarray(s.summary_prefix_layers, np.int16),
             attrs={"long_name": "VLM layer index (per-layer prefix summaries)"}),
    Variable(REGION, "coord", (REGION,), str,
             shape=lambda s: () if s.summary_layers or s.summary_prefix_layers else None,
             values=lambda s: np.asarray(s.layout.regions, dtype=str), fill="",
             attrs={"long_name": "key region: each camera slot, language, action (key order)"}),
    # ---- per inference (the commit marker first in the table, written last) ----
    _index_var(N.EPISODE, np.int64),
    _index_var(N.ROLLOUT, np.int32),
    _index_var(N.ENV_STEP, np.int32),
    Variable(N.ATTENTION, "row", (N.INFERENCE, N.DENOISE, N.LAYER, N.HEAD, N.QUERY, N.KEY), np.float32,
             shape=lambda s: s.attention_shape_per_inference, attention_codec=True,
             coordinates=f"{INFERENCE_COORDINATES} {N.TIME} {LAYER_KIND} {KEY_COORDINATES}",
             attrs={"long_name": "action-token attention probabilities"}),
    Variable(N.KEY_VALID, "row", (N.INFERENCE, N.KEY), bool, shape=lambda s: (s.layout.num_keys,), fill=False,
             coordinates=f"{INFERENCE_COORDINATES} {KEY_COORDINATES}"),
    Variable(N.IMAGES, dims=(N.INFERENCE, N.CAMERA, N.HEIGHT, N.WIDTH, N.CHANNEL), dtype=np.uint8, shape=_images,
             attrs={"long_name": "policy input images after lerobot's processors (upright, as the policy saw them)"},
             **_ROW),
    Variable(N.ACTIONS, dims=(N.INFERENCE, N.ACTION_STEP, N.ACTION_DIM), dtype=np.float32,
             shape=lambda s: s.action_shape, attrs={"long_name": "predicted action chunk (policy output space)"},
             **_ROW),
    Variable(N.LANGUAGE_TOKEN_ID, dims=(N.INFERENCE, N.LANGUAGE_TOKEN), dtype=np.int32, shape=_language,
             fill=N.LANGUAGE_PAD_ID, **_ROW),
    Variable(N.LANGUAGE_TOKEN_TEXT, dims=(N.INFERENCE, N.LANGUAGE_TOKEN), dtype=str, shape=_language, fill="", **_ROW),
    Variable(N.PREFIX_ATTENTION, dims=(N.INFERENCE, N.PREFIX_LAYER, N.HEAD, N.PREFIX_QUERY, N.PREFIX_KEY),
             dtype=np.float32, shape=_prefix, attention_codec=True,
             attrs={"long_name": "VLM prefix self-attention probabilities"}, **_ROW),
    Variable(N.STATE, dims=(N.INFERENCE, N.STATE_DIM), dtype=np.float32, shape_from_spec=True,
             attrs={"long_name": "robot state the policy saw (observation.state, after lerobot's processors)"},
             **_ROW),
    # ---- per-layer summaries: every expert (VLM) layer, whatever is stored in full; float16 ----
    Variable(SUMMARY_REGION_MASS, "row", (N.INFERENCE, N.DENOISE, SUMMARY_LAYER, N.HEAD, N.QUERY, REGION),
             np.float16, shape=lambda s: _summary(s, s.num_heads, s.layout.num_action, len(s.layout.regions)),
             coordinates=_SUMMARY_COORDINATES,
             attrs={"long_name": "action-token attention mass per key region (sum of p over its keys)"}),
    Variable(SUMMARY_ENTROPY, "row", (N.INFERENCE, N.DENOISE, SUMMARY_LAYER, N.HEAD, N.QUERY), np.float16,
             shape=lambda s: _summary(s, s.num_heads, s.layout.num_action), coordinates=_SUMMARY_COORDINATES,
             attrs={"long_name": "entropy of each action-token attention row over its valid keys", "units": "nats"}),
    Variable(SUMMARY_GRID, "row", (N.INFERENCE, N.DENOISE, SUMMARY_LAYER, N.CAMERA, GRID_ROW, GRID_COL), np.float16,
             shape=_summary_grid, coordinates=_SUMMARY_COORDINATES,
             attrs={"long_name": "head-and-action-token mean attention on each present camera's patches"}),
    Variable(SUMMARY_PREFIX_REGION_MASS, dims=(N.INFERENCE, SUMMARY_PREFIX_LAYER, N.HEAD, N.PREFIX_QUERY, REGION),
             dtype=np.float16, shape=lambda s: _prefix_summary(s, len(s.layout.regions)),
             attrs={"long_name": "prefix-query attention mass per key region (VLM layers)"}, **_ROW),
    Variable(SUMMARY_PREFIX_ENTROPY, dims=(N.INFERENCE, SUMMARY_PREFIX_LAYER, N.HEAD, N.PREFIX_QUERY),
             dtype=np.float16, shape=_prefix_summary,
             attrs={"long_name": "entropy of each prefix-query attention row over its valid keys", "units": "nats"},
             **_ROW),
    # ---- per finished episode (episode_index is the commit marker, written last) ----
    _episode_var(N.EPISODE_INDEX, np.int64, N.UNCOMMITTED),
    _episode_var(N.TASK_GROUP, str, ""),
    _episode_var(N.TASK_ID, np.int32, -1),
    _episode_var(N.TASK, str, ""),
    _episode_var(N.SUCCESS, bool, False),
    _episode_var(N.NUM_ENV_STEPS, np.int32, 0),
)
VARIABLE: dict[str, Variable] = {v.name: v for v in VARIABLES}
COMMIT_MARKER: dict[str, str] = {N.INFERENCE: N.EPISODE, N.EPISODE_INDEX: N.EPISODE_INDEX}


def stored_variables(spec: StoreSpec, role: Role | None = None) -> list[Variable]:
    """The table's variables this spec stores, in table order (optionally of one role)."""
    return [v for v in VARIABLES if (role is None or v.role == role) and v.stored(spec)]


def row_variables(spec: StoreSpec) -> list[Variable]:
    """Per-inference variables of this spec (commit marker first)."""
    return stored_variables(spec, "row")


def batch_variables(spec: StoreSpec) -> list[Variable]:
    """Per-inference variables an InferenceBatch must carry for this spec."""
    return [v for v in row_variables(spec) if v.source == "batch"]


def _example_spec() -> StoreSpec:
    from attnstore.schema.layout import TokenLayout

    layout = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False))
    return StoreSpec(layout=layout, layers=(17,), denoise_steps=(9,), extra_shapes={"state": (8,)})
