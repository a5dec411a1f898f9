"""TokenLayout: which key of the attention's key axis is which token (camera patch, language, action)."""

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
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(**pick(cls, data))
