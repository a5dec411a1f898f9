"""The store's schema: the single source of truth for dims, variables, coords, attrs and encoding.

Writer, readers, export/import and the CLI all take names, shapes and codecs from here; nothing else
spells a dimension name or a codec.

An attention store is one Zarr v3 group (``<output_dir>/attention.zarr``) holding

* a flat, appendable ``inference`` axis: one row per (episode, policy inference). Index coordinates
  ``episode``, ``rollout`` (inference number within its episode) and ``env_step`` (the env step, i.e.
  the video frame, at which the policy ran) live on it. ``episode`` is written last for every row and
  is the commit marker: rows whose ``episode`` is still the fill value (-1) were never committed.
* ``attention`` (inference, denoise, layer, head, query, key): the action tokens' attention
  probabilities, one chunk per inference row so that nothing is ever rewritten.
* the token layout of the ``key`` axis as coordinates (``key_kind``, ``key_region``, ``patch_row``,
  ``patch_col``) and, per inference, ``key_valid`` (False for language padding and missing cameras).
* optional per-inference ``images`` (what the policy saw, after its processors), ``actions`` (the
  predicted chunk), ``language_token_id``/``language_token_text`` and ``prefix_attention``.
* a per-episode table on the ``episode_index`` axis (task, success, number of env steps), one row
  per finished episode; an episode with inference rows but no table row did not finish.

Root attrs hold ``{"attnstore": {"schema_version", "format", "spec", "status", "run"}}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from attnstore.errors import SchemaError

SCHEMA_VERSION = 1
FORMAT_NAME = "attnstore.attention"
ROOT_ATTR = "attnstore"

# ---- dimensions ------------------------------------------------------------------------------
INFERENCE = "inference"
DENOISE = "denoise"
LAYER = "layer"
HEAD = "head"
QUERY = "query"
KEY = "key"
CAMERA = "camera"
HEIGHT = "height"
WIDTH = "width"
CHANNEL = "channel"
ACTION_STEP = "action_step"
ACTION_DIM = "action_dim"
LANGUAGE_TOKEN = "language_token"
PREFIX_LAYER = "prefix_layer"
PREFIX_QUERY = "prefix_query"
PREFIX_KEY = "prefix_key"
EPISODE_INDEX = "episode_index"
# dims of analysis results (readers/analysis.py); camera grids reuse PATCH_ROW / PATCH_COL as dims
REGION = "region"  # region_shares: each camera slot, "language", "action"
RANK = "rank"  # top_k_patches: 1 = most attended

# ---- variables -------------------------------------------------------------------------------
ATTENTION = "attention"
PREFIX_ATTENTION = "prefix_attention"
KEY_VALID = "key_valid"
IMAGES = "images"
ACTIONS = "actions"
LANGUAGE_TOKEN_ID = "language_token_id"
LANGUAGE_TOKEN_TEXT = "language_token_text"

# coordinates on the inference axis
EPISODE = "episode"
ROLLOUT = "rollout"
ENV_STEP = "env_step"
INFERENCE_COORDS = (EPISODE, ROLLOUT, ENV_STEP)

# coordinates on the key axis (static for a store)
KEY_KIND = "key_kind"
KEY_REGION = "key_region"
PATCH_ROW = "patch_row"
PATCH_COL = "patch_col"
KEY_COORDS = (KEY_KIND, KEY_REGION, PATCH_ROW, PATCH_COL)

# coordinate on the denoise axis: flow-matching time of each denoise step (1.0 ... 0.1)
TIME = "time"

# per-episode table (dim EPISODE_INDEX; the coordinate of the same name is its commit marker)
TASK_GROUP = "task_group"
TASK_ID = "task_id"
TASK = "task"
SUCCESS = "success"
NUM_ENV_STEPS = "num_env_steps"
EPISODE_VARS = (TASK_GROUP, TASK_ID, TASK, SUCCESS, NUM_ENV_STEPS)

KIND_IMAGE = "image"
KIND_LANGUAGE = "language"
KIND_ACTION = "action"
REGION_LANGUAGE = "language"
REGION_ACTION = "action"

UNCOMMITTED = -1  # fill value of the commit markers (EPISODE and EPISODE_INDEX)
NOT_A_PATCH = -1  # patch_row / patch_col of keys that are not image patches
LANGUAGE_PAD_ID = -1  # language_token_id of padding positions

INDEX_CHUNK = 4096  # rows per chunk of the small per-inference / per-episode arrays

Encoding = Literal["uint16", "float32"]
ENCODINGS: tuple[str, ...] = ("uint16", "float32")
UINT16_SCALE = 65535
# Worst-case absolute error of a stored probability, per encoding (round to nearest of 1/65535).
MAX_ABS_ERROR: dict[str, float] = {"uint16": 0.5 / UINT16_SCALE + 1e-7, "float32": 0.0}


@dataclass(frozen=True)
class TokenLayout:
    """Which key is which token, for one policy configuration.

    Pi0.5's key axis is ``[256 patches per camera slot | language tokens | action tokens]``; camera
    slots are in the order the policy embedded them (cameras present in the batch first, missing ones
    after, lerobot's ``_preprocess_images``). Patches are row-major on a ``grid_rows x grid_cols`` grid.

    >>> layout = TokenLayout(cameras=("image", "image2", "empty_camera_0"),
    ...                      camera_present=(True, True, False))
    >>> layout.num_keys, layout.prefix_len
    (1018, 968)
    >>> layout.region_slice("image2"), layout.region_slice("language")
    (slice(256, 512, None), slice(768, 968, None))
    >>> coords = layout.key_coords()
    >>> coords["patch_row"][256 + 17], coords["patch_col"][256 + 17], coords["key_region"][800]
    (np.int16(1), np.int16(1), np.str_('language'))
    """

    cameras: tuple[str, ...]
    camera_present: tuple[bool, ...]
    grid_rows: int = 16
    grid_cols: int = 16
    num_language: int = 200
    num_action: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(str(c) for c in self.cameras))
        object.__setattr__(self, "camera_present", tuple(bool(p) for p in self.camera_present))
        if len(self.cameras) != len(self.camera_present):
            raise SchemaError(
                f"token layout: {len(self.cameras)} cameras but {len(self.camera_present)} presence flags"
            )
        if len(set(self.cameras)) != len(self.cameras):
            raise SchemaError(f"token layout: camera names repeat: {self.cameras}")
        reserved = {REGION_LANGUAGE, REGION_ACTION}
        if reserved & set(self.cameras):
            raise SchemaError(f"token layout: camera names may not be {sorted(reserved)}")
        for name in ("grid_rows", "grid_cols", "num_action"):
            if getattr(self, name) < 1:
                raise SchemaError(f"token layout: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_language < 0:
            raise SchemaError(f"token layout: num_language must be >= 0, got {self.num_language}")

    @property
    def patches_per_camera(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def prefix_len(self) -> int:
        """Keys before the action tokens (all camera patches + language), the legacy ``prefix_len``."""
        return len(self.cameras) * self.patches_per_camera + self.num_language

    @property
    def num_keys(self) -> int:
        return self.prefix_len + self.num_action

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names in key order: each camera, then ``language``, then ``action``."""
        return (*self.cameras, REGION_LANGUAGE, REGION_ACTION)

    def region_slice(self, region: str) -> slice:
        """The key positions of one region (a camera name, ``language`` or ``action``)."""
        ppc = self.patches_per_camera
        if region in self.cameras:
            i = self.cameras.index(region)
            return slice(i * ppc, (i + 1) * ppc)
        n_img = len(self.cameras) * ppc
        if region == REGION_LANGUAGE:
            return slice(n_img, n_img + self.num_language)
        if region == REGION_ACTION:
            return slice(self.prefix_len, self.num_keys)
        raise SchemaError(f"unknown region '{region}'; this store has {list(self.regions)}")

    def key_coords(self) -> dict[str, np.ndarray]:
        """Per-key coordinate arrays: kind, region, patch row/col (-1 off the image grid)."""
        kind = np.empty(self.num_keys, dtype=object)
        region = np.empty(self.num_keys, dtype=object)
        row = np.full(self.num_keys, NOT_A_PATCH, dtype=np.int16)
        col = np.full(self.num_keys, NOT_A_PATCH, dtype=np.int16)
        grid_r, grid_c = np.divmod(np.arange(self.patches_per_camera), self.grid_cols)
        for cam in self.cameras:
            s = self.region_slice(cam)
            kind[s], region[s], row[s], col[s] = KIND_IMAGE, cam, grid_r, grid_c
        for name, k in ((REGION_LANGUAGE, KIND_LANGUAGE), (REGION_ACTION, KIND_ACTION)):
            s = self.region_slice(name)
            kind[s], region[s] = k, name
        return {
            KEY_KIND: kind.astype(str),
            KEY_REGION: region.astype(str),
            PATCH_ROW: row,
            PATCH_COL: col,
        }

    def static_key_valid(self) -> np.ndarray:
        """Validity known from the layout alone: missing cameras False, everything else True.

        Language padding varies per inference; callers combine this with the policy's language mask.
        """
        valid = np.ones(self.num_keys, dtype=bool)
        for cam, present in zip(self.cameras, self.camera_present):
            if not present:
                valid[self.region_slice(cam)] = False
        return valid

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class StoreSpec:
    """Everything static about one store: what was captured and how it is encoded.

    >>> spec = StoreSpec(layout=TokenLayout(("image", "image2"), (True, True)),
    ...                  layers=(16, 17), denoise_steps=tuple(range(10)), num_denoise_steps=10)
    >>> spec.times[:3], spec.attention_shape_per_inference
    ((1.0, 0.9, 0.8), (10, 2, 8, 50, 762))
    """

    layout: TokenLayout
    layers: tuple[int, ...]
    denoise_steps: tuple[int, ...]
    num_denoise_steps: int = 10
    num_layers: int | None = None  # depth of the expert (for the record; None = unknown)
    num_heads: int = 8
    encoding: Encoding = "uint16"
    image_shape: tuple[int, int, int] | None = None  # (H, W, 3) of stored policy images; None = not stored
    action_shape: tuple[int, int] | None = None  # (chunk, action_dim) of stored actions; None = not stored
    store_language_tokens: bool = True
    prefix_layers: tuple[int, ...] = ()  # VLM layers whose prefix self-attention is stored
    times: tuple[float, ...] = field(default=())  # derived from denoise_steps when empty

    def __post_init__(self) -> None:
        if isinstance(self.layout, Mapping):
            object.__setattr__(self, "layout", TokenLayout.from_dict(self.layout))
        for name in ("layers", "denoise_steps", "prefix_layers"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.layers:
            raise SchemaError("store spec: at least one layer must be captured")
        if len(set(self.layers)) != len(self.layers) or any(v < 0 for v in self.layers):
            raise SchemaError(f"store spec: layers must be distinct non-negative indices, got {self.layers}")
        if self.num_layers is not None and max(self.layers) >= self.num_layers:
            raise SchemaError(
                f"store spec: layer {max(self.layers)} out of range for a {self.num_layers}-layer model"
            )
        if self.num_denoise_steps < 1:
            raise SchemaError(f"store spec: num_denoise_steps must be >= 1, got {self.num_denoise_steps}")
        if not self.denoise_steps or any(not 0 <= d < self.num_denoise_steps for d in self.denoise_steps):
            raise SchemaError(
                f"store spec: denoise_steps must be in 0..{self.num_denoise_steps - 1}, got {self.denoise_steps}"
            )
        if list(self.denoise_steps) != sorted(set(self.denoise_steps)):
            raise SchemaError(f"store spec: denoise_steps must be increasing, got {self.denoise_steps}")
        if self.encoding not in ENCODINGS:
            raise SchemaError(f"store spec: encoding must be one of {ENCODINGS}, got '{self.encoding}'")
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
            if len(self.image_shape) != 3 or self.image_shape[2] != 3:
                raise SchemaError(f"store spec: image_shape must be (H, W, 3), got {self.image_shape}")
        if self.action_shape is not None:
            object.__setattr__(self, "action_shape", tuple(int(v) for v in self.action_shape))
            if len(self.action_shape) != 2:
                raise SchemaError(f"store spec: action_shape must be (chunk, dim), got {self.action_shape}")
        if not self.times:
            object.__setattr__(
                self, "times", tuple(denoise_time(d, self.num_denoise_steps) for d in self.denoise_steps)
            )
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        if len(self.times) != len(self.denoise_steps):
            raise SchemaError("store spec: one time per denoise step expected")

    @property
    def attention_shape_per_inference(self) -> tuple[int, int, int, int, int]:
        """(denoise, layer, head, query, key) of one inference row."""
        lay = self.layout
        return (len(self.denoise_steps), len(self.layers), self.num_heads, lay.num_action, lay.num_keys)

    @property
    def prefix_attention_shape_per_inference(self) -> tuple[int, int, int, int]:
        """(prefix_layer, head, prefix_query, prefix_key) of one inference row."""
        p = self.layout.prefix_len
        return (len(self.prefix_layers), self.num_heads, p, p)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["layout"] = self.layout.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreSpec:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class EpisodeRecord:
    """One row of the per-episode table, written when an episode ends."""

    episode: int
    task_group: str = ""
    task_id: int = -1
    task: str = ""
    success: bool = False
    num_env_steps: int = 0


def denoise_time(step: int, num_steps: int) -> float:
    """Flow-matching time of denoise step ``step`` (Pi0.5 integrates from t=1 with dt=-1/num_steps).

    >>> [denoise_time(d, 10) for d in (0, 1, 9)]
    [1.0, 0.9, 0.1]
    """
    return round(1.0 - step / num_steps, 12)  # 0.1, not 1 - 9/10 = 0.09999999999999998


def attention_codecs(encoding: str) -> dict[str, Any]:
    """Zarr v3 ``filters``/``compressors`` for the attention arrays.

    ``uint16``: p -> round(p * 65535) stored as uint16 (v3-spec ``scale_offset`` + ``cast_value``),
    blosc-zstd level 1 with 2-byte shuffle. Decodes to float32 for every reader; max abs error
    7.6e-6; exact zeros (masked keys) stay exactly 0. ``float32``: exact, blosc-zstd 4-byte shuffle.
    """
    from zarr.codecs import BloscCodec, CastValue, ScaleOffset

    if encoding == "uint16":
        return {
            "filters": [
                ScaleOffset(offset=0, scale=UINT16_SCALE),
                CastValue(data_type="uint16", rounding="nearest-even", out_of_range="clamp"),
            ],
            "compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)],
        }
    if encoding == "float32":
        return {"compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4)]}
    raise SchemaError(f"unknown attention encoding '{encoding}'; choose one of {ENCODINGS}")


def default_compressors(typesize: int) -> list[Any]:
    """Compressor for the non-attention arrays (indices, images, actions)."""
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if typesize > 1 else "noshuffle", typesize=typesize)]


def root_attrs(spec: StoreSpec, run: Mapping[str, Any] | None, status: str) -> dict[str, Any]:
    return {
        ROOT_ATTR: {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT_NAME,
            "status": status,
            "spec": spec.to_dict(),
            "run": dict(run or {}),
        }
    }


def read_root_attrs(attrs: Mapping[str, Any], where: str) -> tuple[StoreSpec, dict[str, Any]]:
    """Validate a store's root attrs; return its spec and root info. Raises SchemaError with a fix."""
    info = attrs.get(ROOT_ATTR)
    if not isinstance(info, Mapping) or info.get("format") != FORMAT_NAME:
        raise SchemaError(
            f"{where} is a zarr store but not an attnstore attention store (no '{ROOT_ATTR}' root attrs)"
        )
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has attnstore schema version {version}, this attnstore reads version "
            f"{SCHEMA_VERSION}: use the attnstore release that wrote it, or re-create the store"
        )
    return StoreSpec.from_dict(info["spec"]), dict(info)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _pick(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SchemaError(f"{cls.__name__}: unknown fields {sorted(unknown)} (store written by a newer attnstore?)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}

