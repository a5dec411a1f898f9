"""StoreSpec (everything static about a store), EpisodeRecord, and the root attrs that carry them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnstore.errors import SchemaError
from attnstore.schema._dicts import jsonable, pick
from attnstore.schema.encoding import ENCODINGS, Encoding
from attnstore.schema.layout import TokenLayout
from attnstore.schema.names import FORMAT_NAME, READABLE_SCHEMA_VERSIONS, ROOT_ATTR, SCHEMA_VERSION


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
    encoding: Encoding = "portable"
    image_shape: tuple[int, int, int] | None = None  # (H, W, 3) of stored policy images; None = not stored
    action_shape: tuple[int, int] | None = None  # (chunk, action_dim) of stored actions; None = not stored
    store_language_tokens: bool = True
    prefix_layers: tuple[int, ...] = ()  # VLM layers whose prefix self-attention is stored
    times: tuple[float, ...] = field(default=())  # derived from denoise_steps when empty
    # per-row shapes of the table's optional variables that take their shape from the spec
    # (``Variable.shape_from_spec``), e.g. {"state": (8,)}; a variable not named here is not stored
    extra_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # expert / VLM layers with a per-layer summary (region mass, entropy, camera grids; schema/variables.py),
    # usually every layer, whatever ``layers`` stores in full; () = no summaries (stores before them)
    summary_layers: tuple[int, ...] = ()
    summary_prefix_layers: tuple[int, ...] = ()
    # attention kind of each captured layer ("self": prefix + action keys, "cross": the VLM's prefix keys
    # only, SmolVLA's cross-attention layers), one per ``layers`` entry; () = all self-attention (Pi0.5, Pi0)
    layer_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.layout, Mapping):
            object.__setattr__(self, "layout", TokenLayout.from_dict(self.layout))
        for name in ("layers", "denoise_steps", "prefix_layers", "summary_layers", "summary_prefix_layers"):
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
        object.__setattr__(self, "extra_shapes", parse_extra_shapes(self.extra_shapes))
        for name, depth in (("summary_layers", self.num_layers), ("summary_prefix_layers", None)):
            values = getattr(self, name)
            if len(set(values)) != len(values) or any(v < 0 for v in values) or list(values) != sorted(values):
                raise SchemaError(f"store spec: {name} must be increasing non-negative indices, got {values}")
            if depth is not None and values and max(values) >= depth:
                raise SchemaError(f"store spec: {name} {max(values)} out of range for a {depth}-layer model")
        object.__setattr__(self, "layer_kinds", tuple(str(v) for v in self.layer_kinds))
        if self.layer_kinds and (
            len(self.layer_kinds) != len(self.layers) or not set(self.layer_kinds) <= {"self", "cross"}
        ):
            raise SchemaError(
                f"store spec: layer_kinds must be 'self'/'cross', one per layer {self.layers}, got {self.layer_kinds}"
            )

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
        out = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["layout"] = self.layout.to_dict()
        if self.extra_shapes:
            out["extra_shapes"] = {k: list(v) for k, v in self.extra_shapes.items()}
        else:  # stores without extra variables stay readable by attnstore releases before it
            del out["extra_shapes"]
        for name in ("summary_layers", "summary_prefix_layers", "layer_kinds"):  # likewise stores without them
            if not getattr(self, name):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreSpec:
        return cls(**pick(cls, data))


def parse_extra_shapes(value: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Validate ``extra_shapes``: variable name -> per-row shape of positive ints.

    >>> parse_extra_shapes({"state": [8]})
    {'state': (8,)}
    >>> parse_extra_shapes({"state": (0,)})
    Traceback (most recent call last):
    ...
    attnstore.errors.SchemaError: store spec: extra_shapes['state'] must be positive sizes, got (0,)
    """
    if not isinstance(value, Mapping):
        raise SchemaError(f"store spec: extra_shapes must map variable names to shapes, got {value!r}")
    out = {}
    for name, shape in value.items():
        shape = tuple(int(v) for v in shape)
        if any(v < 1 for v in shape):
            raise SchemaError(f"store spec: extra_shapes[{name!r}] must be positive sizes, got {shape}")
        out[str(name)] = shape
    return out


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
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
        raise SchemaError(
            f"{where} has attnstore schema version {version}, this attnstore reads versions "
            f"{readable}: use the attnstore release that wrote it, or re-create the store"
        )
    return StoreSpec.from_dict(info["spec"]), dict(info)
