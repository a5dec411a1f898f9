"""Validation of legacy ``.pt`` dicts (both variants, see :mod:`attnstore.legacy.pt`) and entry conversion.

:func:`validate_legacy` checks the layout, shapes and dtypes without reading tensor data (mmap'd files stay
on disk) and returns a :class:`LegacyInfo`; :func:`entry_attention` turns one entry into the store's
float32 ``(D, L, H, suffix_len, K)`` array and :func:`check_entry_values` checks it holds probabilities.
Every problem is one :class:`LegacyFormatError` line naming the file and where in it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnstore.errors import LegacyFormatError
from attnstore.legacy import pt as L
from attnstore.legacy.pt import is_int

GUIDE, FORK, BOTH = "guide", "fork", "guide+fork"  # LegacyInfo.variant


@dataclass
class LegacyInfo:
    """What a validated legacy file holds (everything import and inspect need, no tensor data)."""

    path: Path
    episode_index: int  # metadata.episode_index (guide, attnstore export) else the top-level one (fork)
    rollout_steps: list[int]
    denoise_keys: tuple[int, ...]
    times: tuple[float, ...]
    layers: tuple[int, ...]
    num_heads: int
    prefix_len: int
    suffix_len: int
    tensor_shape: tuple[int, ...]  # as stored, e.g. (1, 8, 50, 1018) or (1, 8, 1018, 1018)
    dtype: str
    metadata: dict[str, Any] = field(default_factory=dict)
    variant: str = GUIDE  # which keys the file has: guide, fork or guide+fork (attnstore's export)
    file_episode_index: int | None = None  # the fork's top-level episode_index (per-task number)
    batch_index: int | None = None  # the fork's top-level batch_index

    @property
    def full_matrix(self) -> bool:
        """True when the file holds the whole (seq, seq) matrix (the guide's "total_seq" layout)."""
        return self.tensor_shape[-2] == self.tensor_shape[-1] != self.suffix_len

    @property
    def num_keys(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def num_denoising_steps(self) -> int | None:
        """``metadata.num_denoising_steps`` (guide) or ``num_denoising_steps_per_action`` (fork)."""
        for key in (L.NUM_DENOISING_STEPS, L.NUM_DENOISING_STEPS_PER_ACTION):
            if is_int(self.metadata.get(key)):
                return int(self.metadata[key])
        return None

    @property
    def hint(self) -> dict[str, Any]:
        value = self.metadata.get(L.ATTNSTORE_HINT)
        return dict(value) if isinstance(value, Mapping) else {}


def validate_legacy(data: Mapping[str, Any], path: str | os.PathLike[str], *, check_values: bool = True) -> LegacyInfo:
    """Check the dict layout (guide's or fork's), shapes, dtypes and (optionally) values; raise one line.

    ``check_values`` reads every tensor once (:func:`check_entry_values` on each entry); inspect and
    import's first pass skip it (import checks each entry as it converts it).
    """
    path = Path(path)

    def fail(problem: str) -> LegacyFormatError:
        return LegacyFormatError(f"{path}: {problem}")

    if L.ROLLOUT_STEPS not in data:
        raise fail(f"missing key '{L.ROLLOUT_STEPS}' (has {sorted(map(str, data))}): not a legacy attention file; "
                   f"{L.EXPECTED_LAYOUTS}")
    meta, steps = data.get(L.METADATA, {}), data[L.ROLLOUT_STEPS]
    if not isinstance(meta, Mapping):
        raise fail(f"'{L.METADATA}' is a {type(meta).__name__}, expected a dict; {L.EXPECTED_LAYOUTS}")
    if not isinstance(steps, (list, tuple)):
        raise fail(f"'{L.ROLLOUT_STEPS}' is a {type(steps).__name__}, expected a list")
    if not steps:
        raise fail(f"'{L.ROLLOUT_STEPS}' is empty: the episode has no attention")
    in_meta, on_top = meta.get(L.EPISODE_INDEX), data.get(L.EPISODE_INDEX)
    if not (is_int(in_meta) or is_int(on_top)):
        raise fail(
            f"no episode index: metadata '{L.EPISODE_INDEX}' is {in_meta!r} and top-level '{L.EPISODE_INDEX}' is "
            f"{on_top!r} (top level has {sorted(map(str, data))}, metadata {sorted(map(str, meta))}); "
            f"{L.EXPECTED_LAYOUTS}"
        )
    variant = BOTH if is_int(in_meta) and is_int(on_top) else GUIDE if is_int(in_meta) else FORK
    batch = data.get(L.BATCH_INDEX)

    reference: dict[str, Any] | None = None
    rollout_steps: list[int] = []
    for n, entry in enumerate(steps):
        where = f"{L.ROLLOUT_STEPS}[{n}]"
        if not isinstance(entry, Mapping) or L.ROLLOUT_STEP not in entry or L.ATTENTION_MAPS not in entry:
            raise fail(f"{where} is not a dict with '{L.ROLLOUT_STEP}' and '{L.ATTENTION_MAPS}'")
        if not is_int(entry[L.ROLLOUT_STEP]):
            raise fail(f"{where}['{L.ROLLOUT_STEP}'] is {entry[L.ROLLOUT_STEP]!r}, expected an int")
        rollout_steps.append(int(entry[L.ROLLOUT_STEP]))
        shape = _entry_shape(entry[L.ATTENTION_MAPS], f"{where}['{L.ATTENTION_MAPS}']", fail)
        if reference is None:
            reference = shape
        elif shape != reference:
            diff = next(k for k in shape if shape[k] != reference[k])
            raise fail(f"{where} differs from {L.ROLLOUT_STEPS}[0] in {diff}: {shape[diff]} vs {reference[diff]}")
    if any(b <= a for a, b in zip(rollout_steps, rollout_steps[1:])):
        raise fail(f"'{L.ROLLOUT_STEP}' values are not increasing: {rollout_steps[:10]}...")
    assert reference is not None
    info = LegacyInfo(
        path=path,
        episode_index=int(in_meta if is_int(in_meta) else on_top),
        rollout_steps=rollout_steps,
        metadata=dict(meta),
        variant=variant,
        file_episode_index=int(on_top) if is_int(on_top) else None,
        batch_index=int(batch) if is_int(batch) else None,
        **reference,
    )
    if check_values:
        for n, entry in enumerate(steps):
            check_entry_values(entry_attention(entry, info), info, n)
    return info


def entry_attention(entry: Mapping[str, Any], info: LegacyInfo) -> np.ndarray:
    """The action rows of one entry as float32 (D, L, H, suffix_len, K), in ``info``'s key order.

    Each tensor is copied straight into one float32 array (no bf16 intermediate); for a fork file saved
    with batch > 1 only this episode's ``[b:b+1]`` slice of the batch storage is read.
    """
    import torch

    maps = entry[L.ATTENTION_MAPS]
    q = info.suffix_len
    out = torch.empty((len(info.denoise_keys), len(info.layers), info.num_heads, q, info.num_keys), dtype=torch.float32)
    for i, d in enumerate(info.denoise_keys):
        weights = maps[d][L.ATTENTION_WEIGHTS]
        for j, layer in enumerate(info.layers):
            out[i, j].copy_(weights[layer][0, :, -q:, :])  # full matrix: its last suffix_len rows
    return out.numpy()


def check_entry_values(attention: np.ndarray, info: LegacyInfo, n: int) -> None:
    """Raise unless entry ``n``'s (D, L, H, Q, K) ``attention`` holds probabilities (finite, in [0, 1 + tol])."""
    import torch

    flat = torch.from_numpy(attention).flatten(2)
    lo, hi = torch.aminmax(flat, dim=-1)  # (D, L); NaN propagates
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi)) | (lo < 0) | (hi > 1 + L.PROB_TOLERANCE)
    if bool(bad.any()):
        i, j = (int(x) for x in torch.nonzero(bad)[0])
        raise LegacyFormatError(
            f"{info.path}: {L.ROLLOUT_STEPS}[{n}] denoise {info.denoise_keys[i]} layer {info.layers[j]}: values in "
            f"[{lo[i, j].item():.3g}, {hi[i, j].item():.3g}] are not probabilities (NaN/inf or outside [0, 1]): "
            f"the file is garbled"
        )


def same_maps(a: Mapping[str, Any], b: Mapping[str, Any], info: LegacyInfo) -> bool:
    """True when two entries hold identical attention (a per-env-step file repeats an inference's maps).

    Tensors that are the same view of the same storage (how such a file shares them) compare without reading.
    """
    import torch

    ma, mb = a[L.ATTENTION_MAPS], b[L.ATTENTION_MAPS]
    for d in info.denoise_keys:
        for layer in info.layers:
            ta, tb = ma[d][L.ATTENTION_WEIGHTS][layer], mb[d][L.ATTENTION_WEIGHTS][layer]
            if ta is tb or _same_view(ta, tb):
                continue
            if not torch.equal(ta, tb):
                return False
    return True


def _same_view(a: Any, b: Any) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _entry_shape(maps: Any, where: str, fail) -> dict[str, Any]:
    """Layout facts of one entry's ``attention_maps`` (compared across entries by the caller)."""
    import torch

    if not isinstance(maps, Mapping) or not maps:
        raise fail(f"{where} must be a non-empty dict {{denoise index: ...}}")
    if not all(is_int(d) for d in maps):
        raise fail(f"{where} keys must be denoise indices (ints), got {list(maps)[:5]}")
    keys = tuple(sorted(int(d) for d in maps))
    times, lens, facts = [], set(), set()
    for d in keys:
        dmap = maps[d]
        if not isinstance(dmap, Mapping) or L.ATTENTION_WEIGHTS not in dmap or L.TIME not in dmap:
            raise fail(f"{where}[{d}] must be a dict with '{L.TIME}' and '{L.ATTENTION_WEIGHTS}'")
        weights = dmap[L.ATTENTION_WEIGHTS]
        if not isinstance(weights, Mapping) or not weights or not all(is_int(k) for k in weights):
            raise fail(f"{where}[{d}]['{L.ATTENTION_WEIGHTS}'] must be a non-empty dict {{layer index: tensor}}")
        try:
            times.append(float(dmap[L.TIME]))
        except (TypeError, ValueError):
            raise fail(f"{where}[{d}]['{L.TIME}'] is {dmap[L.TIME]!r}, expected a float") from None
        for layer, t in weights.items():
            if not isinstance(t, torch.Tensor):
                raise fail(f"{where}[{d}] layer {layer} is a {type(t).__name__}, expected a tensor")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise fail(f"{where}[{d}] layer {layer} has dtype {t.dtype}, expected float32/bfloat16/float16")
            if t.dim() != 4 or t.shape[0] != 1:
                raise fail(f"{where}[{d}] layer {layer} has shape {tuple(t.shape)}, expected (1, heads, query, key)")
            facts.add((tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        lens.add(_lengths(dmap, tuple(next(iter(weights.values())).shape), f"{where}[{d}]", fail))
        layers = tuple(sorted(int(k) for k in weights))
        facts.add(("layers", layers))
    if len(lens) != 1:
        raise fail(f"{where}: prefix_len/suffix_len differ between denoise steps: {sorted(lens)}")
    shapes = [f for f in facts if f[0] != "layers"]
    layer_sets = {f[1] for f in facts if f[0] == "layers"}
    if len(shapes) != 1:
        raise fail(f"{where}: tensors differ in shape or dtype: {sorted(shapes)}")
    if len(layer_sets) != 1:
        raise fail(f"{where}: denoise steps hold different layers: {sorted(layer_sets)}")
    (prefix_len, suffix_len), ((shape, dtype),) = lens.pop(), shapes
    return {
        "denoise_keys": keys,
        "times": tuple(times),
        "layers": layer_sets.pop(),
        "num_heads": int(shape[1]),
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
        "tensor_shape": shape,
        "dtype": dtype,
    }


def _lengths(dmap: Mapping[str, Any], shape: tuple[int, ...], where: str, fail) -> tuple[int, int]:
    """(prefix_len, suffix_len) of one denoise map, checked against the tensor shape.

    Files without the two fields are accepted when the shape tells them: (1, H, Q, K) with Q < K
    gives suffix_len = Q, prefix_len = K - Q.
    """
    q, k = shape[-2], shape[-1]
    prefix, suffix = dmap.get(L.PREFIX_LEN), dmap.get(L.SUFFIX_LEN)
    if prefix is None and suffix is None:
        if q >= k:
            raise fail(f"{where} has no '{L.PREFIX_LEN}'/'{L.SUFFIX_LEN}' and a square ({q}, {k}) matrix: "
                       f"cannot tell the action rows")
        return k - q, q
    if not (is_int(prefix) and is_int(suffix)) or prefix < 0 or suffix < 1:
        raise fail(f"{where} '{L.PREFIX_LEN}'={prefix!r} '{L.SUFFIX_LEN}'={suffix!r}: expected non-negative ints")
    if k != prefix + suffix or q not in (suffix, k):
        raise fail(
            f"{where}: tensor shape {shape} does not match {L.PREFIX_LEN}={prefix} + {L.SUFFIX_LEN}={suffix} "
            f"(expected (1, heads, {suffix} or {prefix + suffix}, {prefix + suffix}))"
        )
    return int(prefix), int(suffix)
