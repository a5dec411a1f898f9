"""TokenLayout: which key of the attention's key axis is which token (camera patch, language, state, action)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnstore.errors import SchemaError
from attnstore.schema._dicts import jsonable, pick
from attnstore.schema.names import (
    KEY_KIND,
    KEY_REGION,
    KIND_ACTION,
    KIND_IMAGE,
    KIND_LANGUAGE,
    NOT_A_PATCH,
    PATCH_COL,
    PATCH_ROW,
    REGION_ACTION,
    REGION_LANGUAGE,
)

# key kinds / regions of the policies beyond Pi0.5 (key_kind and key_region share these names)
KIND_STATE = REGION_STATE = "state"  # the robot-state token (Pi0: first suffix token; SmolVLA: after language)
KIND_SPECIAL = REGION_SPECIAL = "special"  # SmolVLA's image start/end tokens around each camera's patches
KIND_PADDING = REGION_PADDING = "padding"  # SmolVLA's prefix padding up to prefix_length (always masked)

# fields added after the first layout; to_dict leaves them out at their default (older stores unchanged)
_OPTIONAL_FIELDS = ("num_state", "camera_start_tokens", "camera_end_tokens", "num_padding")


@dataclass(frozen=True)
class TokenLayout:
    """Which key is which token, for one policy configuration.

    The key axis is, in this order::

        per camera slot: [camera_start_tokens | grid_rows x grid_cols patches | camera_end_tokens]
        [num_language language tokens | num_state state tokens | num_padding padding | num_action action tokens]

    Pi0.5 uses cameras, language and action only (``[256 patches per camera slot | language | action]``);
    Pi0 adds its state token (``num_state=1``), SmolVLA its state token, its image start/end tokens
    (kind and region ``special``) and prefix padding. Camera slots are in the order the policy embedded
    them (cameras present in the batch first, missing ones after, as lerobot's image preprocessing does).
    Patches are row-major on a ``grid_rows x grid_cols`` grid.

    >>> layout = TokenLayout(cameras=("image", "image2", "empty_camera_0"),
    ...                      camera_present=(True, True, False))
    >>> layout.num_keys, layout.prefix_len
    (1018, 968)
    >>> layout.region_slice("image2"), layout.region_slice("language")
    (slice(256, 512, None), slice(768, 968, None))
    >>> coords = layout.key_coords()
    >>> coords["patch_row"][256 + 17], coords["patch_col"][256 + 17], coords["key_region"][800]
    (np.int16(1), np.int16(1), np.str_('language'))

    A SmolVLA-like layout (one 2x2 camera with 2 start and 1 end token, 3 language, 1 state, 1 padding,
    2 action tokens):

    >>> smol = TokenLayout(("top",), (True,), grid_rows=2, grid_cols=2, num_language=3, num_action=2,
    ...                    num_state=1, camera_start_tokens=2, camera_end_tokens=1, num_padding=1)
    >>> smol.key_coords()["key_region"].tolist()  # doctest: +NORMALIZE_WHITESPACE
    ['special', 'special', 'top', 'top', 'top', 'top', 'special', 'language', 'language', 'language',
     'state', 'padding', 'action', 'action']
    >>> smol.regions, smol.region_slice("top"), smol.region_slice("state")
    (('top', 'language', 'state', 'padding', 'action'), slice(2, 6, None), slice(10, 11, None))
    >>> smol.static_key_valid().astype(int).tolist()
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1]
    >>> "num_state" in layout.to_dict(), smol.to_dict()["num_padding"]
    (False, 1)
    """

    cameras: tuple[str, ...]
    camera_present: tuple[bool, ...]
    grid_rows: int = 16
    grid_cols: int = 16
    num_language: int = 200
    num_action: int = 50
    num_state: int = 0  # robot-state tokens between language and action (Pi0, SmolVLA: 1)
    camera_start_tokens: int = 0  # special tokens before each camera's patches (SmolVLA's image start)
    camera_end_tokens: int = 0  # special tokens after each camera's patches (SmolVLA's image end)
    num_padding: int = 0  # masked prefix padding between state and action (SmolVLA's prefix_length)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras", tuple(str(c) for c in self.cameras))
        object.__setattr__(self, "camera_present", tuple(bool(p) for p in self.camera_present))
        if len(self.cameras) != len(self.camera_present):
            raise SchemaError(
                f"token layout: {len(self.cameras)} cameras but {len(self.camera_present)} presence flags"
            )
        if len(set(self.cameras)) != len(self.cameras):
            raise SchemaError(f"token layout: camera names repeat: {self.cameras}")
        reserved = {REGION_LANGUAGE, REGION_ACTION, REGION_STATE, REGION_SPECIAL, REGION_PADDING}
        if reserved & set(self.cameras):
            raise SchemaError(f"token layout: camera names may not be {sorted(reserved)}")
        for name in ("grid_rows", "grid_cols", "num_action"):
            if getattr(self, name) < 1:
                raise SchemaError(f"token layout: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_language", *_OPTIONAL_FIELDS):
            if getattr(self, name) < 0:
                raise SchemaError(f"token layout: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def patches_per_camera(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def keys_per_camera(self) -> int:
        """Keys of one camera slot: its special tokens and its patches."""
        return self.camera_start_tokens + self.patches_per_camera + self.camera_end_tokens

    @property
    def prefix_len(self) -> int:
        """Keys before the action tokens (cameras, language, state, padding), the legacy ``prefix_len``."""
        return len(self.cameras) * self.keys_per_camera + self.num_language + self.num_state + self.num_padding

    @property
    def num_keys(self) -> int:
        return self.prefix_len + self.num_action

    @property
    def regions(self) -> tuple[str, ...]:
        """The contiguous regions in key order: each camera's patches, ``language``, ``state`` and
        ``padding`` (when the layout has them), ``action``. The ``special`` keys (scattered around the
        cameras) are no region of :meth:`region_slice`; ``key_coords`` names them."""
        optional = ((REGION_STATE, self.num_state), (REGION_PADDING, self.num_padding))
        return (*self.cameras, REGION_LANGUAGE, *(name for name, n in optional if n), REGION_ACTION)

    def region_slice(self, region: str) -> slice:
        """The key positions of one region (a camera's patches, ``language``, ``state``, ``padding``, ``action``)."""
        if region in self.cameras:
            start = self.cameras.index(region) * self.keys_per_camera + self.camera_start_tokens
            return slice(start, start + self.patches_per_camera)
        start = len(self.cameras) * self.keys_per_camera
        for name, n in (
            (REGION_LANGUAGE, self.num_language),
            (REGION_STATE, self.num_state),
            (REGION_PADDING, self.num_padding),
            (REGION_ACTION, self.num_action),
        ):
            if region == name and (n or name == REGION_LANGUAGE):
                return slice(start, start + n)
            start += n
        if region == REGION_SPECIAL and self.camera_start_tokens + self.camera_end_tokens:
            raise SchemaError(
                "region 'special' is not contiguous (it is around each camera's patches): "
                "select it with key_region == 'special'"
            )
        raise SchemaError(f"unknown region '{region}'; this store has {list(self.regions)}")

    def key_coords(self) -> dict[str, np.ndarray]:
        """Per-key coordinate arrays: kind, region, patch row/col (-1 off the image grid)."""
        kind = np.empty(self.num_keys, dtype=object)
        region = np.empty(self.num_keys, dtype=object)
        row = np.full(self.num_keys, NOT_A_PATCH, dtype=np.int16)
        col = np.full(self.num_keys, NOT_A_PATCH, dtype=np.int16)
        grid_r, grid_c = np.divmod(np.arange(self.patches_per_camera), self.grid_cols)
        kind[:], region[:] = KIND_SPECIAL, REGION_SPECIAL  # what no region below claims
        for cam in self.cameras:
            s = self.region_slice(cam)
            kind[s], region[s], row[s], col[s] = KIND_IMAGE, cam, grid_r, grid_c
        for name, k in (
            (REGION_LANGUAGE, KIND_LANGUAGE),
            (REGION_STATE, KIND_STATE),
            (REGION_PADDING, KIND_PADDING),
            (REGION_ACTION, KIND_ACTION),
        ):
            if name in self.regions:
                s = self.region_slice(name)
                kind[s], region[s] = k, name
        return {
            KEY_KIND: kind.astype(str),
            KEY_REGION: region.astype(str),
            PATCH_ROW: row,
            PATCH_COL: col,
        }

    def static_key_valid(self) -> np.ndarray:
        """Validity known from the layout alone: missing cameras' patches and padding False, the rest True.

        Language padding varies per inference; callers combine this with the policy's language mask.
        A missing camera's special tokens stay valid: the policy embeds them unmasked.
        """
        valid = np.ones(self.num_keys, dtype=bool)
        for cam, present in zip(self.cameras, self.camera_present):
            if not present:
                valid[self.region_slice(cam)] = False
        if self.num_padding:
            valid[self.region_slice(REGION_PADDING)] = False
        return valid

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for name in _OPTIONAL_FIELDS:  # a Pi0.5 layout reads exactly as before they existed
            if not out[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(**pick(cls, data))
