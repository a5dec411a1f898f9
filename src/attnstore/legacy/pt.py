"""The legacy per-episode ``.pt`` attention format: build it, read it safely, validate it.

The format (``pi05_attention_saving_guide.md``), one file per episode::

    {'rollout_steps': [{'rollout_step': int,                      # env step = video frame index
                        'attention_maps': {d: {'time': float,     # d = denoise index 0..9
                                               'prefix_len': int, 'suffix_len': int,
                                               'attention_weights': {layer: tensor (1, heads, query, key)}}}},
                       ...],
     'metadata': {'episode_index': int, 'num_rollout_steps': int, 'num_denoising_steps': int}}

``attention_weights`` tensors are float32, bfloat16 or float16, of shape ``(1, H, suffix_len, prefix_len +
suffix_len)`` (the action tokens' rows) or ``(1, H, S, S)`` with ``S = prefix_len + suffix_len`` (the whole
matrix, the guide's "total_seq" example; the action rows are its last ``suffix_len`` rows).

attnstore's export adds one optional key, ``metadata['attnstore']`` (token layout, task, success,
env steps), which the legacy access pattern never looks at and which makes import exact.

Reading uses ``torch.load(mmap=True, weights_only=True)``: no code runs from the file, and tensors stay
on disk until touched. Every problem becomes a one-line :class:`LegacyFormatError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnstore.errors import LegacyFormatError, StoreError

ROLLOUT_STEPS = "rollout_steps"
ROLLOUT_STEP = "rollout_step"
ATTENTION_MAPS = "attention_maps"
TIME = "time"
PREFIX_LEN = "prefix_len"
SUFFIX_LEN = "suffix_len"
ATTENTION_WEIGHTS = "attention_weights"
METADATA = "metadata"
EPISODE_INDEX = "episode_index"
NUM_ROLLOUT_STEPS = "num_rollout_steps"
NUM_DENOISING_STEPS = "num_denoising_steps"
ATTNSTORE_HINT = "attnstore"  # optional metadata key written by attnstore's export

FILE_PATTERN = "episode_{episode:05d}_attention.pt"
DTYPES = ("float32", "bfloat16")  # what export writes; import also reads float16
PROB_TOLERANCE = 0.02  # probabilities must lie in [0, 1 + tol] (bf16 rounds 1.0 up to 1.0078)


# ---- building ----------------------------------------------------------------------------------
def legacy_entry(
    rollout_step: int,
    times: Sequence[float],
    denoise_keys: Sequence[int],
    layers: Sequence[int],
    maps: Any,
    prefix_len: int,
    suffix_len: int,
) -> dict[str, Any]:
    """One ``rollout_steps`` element from ``maps`` (D, L, H, Q, K) (a torch tensor).

    Each layer's tensor is ``maps[d, l][None]``: a view, so entries that share ``maps`` share storage
    (``torch.save`` then writes it once).

    >>> import torch
    >>> e = legacy_entry(20, [1.0, 0.1], [0, 9], [17], torch.zeros(2, 1, 8, 50, 1018), 968, 50)
    >>> e["rollout_step"], sorted(e["attention_maps"]), e["attention_maps"][9]["time"]
    (20, [0, 9], 0.1)
    >>> tuple(e["attention_maps"][9]["attention_weights"][17].shape)
    (1, 8, 50, 1018)
    """
    out: dict[int, dict[str, Any]] = {}
    for i, (d, t) in enumerate(zip(denoise_keys, times)):
        out[int(d)] = {
            TIME: float(t),
            PREFIX_LEN: int(prefix_len),
            SUFFIX_LEN: int(suffix_len),
            ATTENTION_WEIGHTS: {int(layer): maps[i, j][None] for j, layer in enumerate(layers)},
        }
    return {ROLLOUT_STEP: int(rollout_step), ATTENTION_MAPS: out}


def legacy_episode(
    entries: list[dict[str, Any]], episode_index: int, hint: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The whole per-episode dict; ``num_denoising_steps`` is the number of denoise entries."""
    n_denoise = len(entries[0][ATTENTION_MAPS]) if entries else 0
    metadata: dict[str, Any] = {
        EPISODE_INDEX: int(episode_index),
        NUM_ROLLOUT_STEPS: len(entries),
        NUM_DENOISING_STEPS: n_denoise,
    }
    if hint is not None:
        metadata[ATTNSTORE_HINT] = dict(hint)
    return {ROLLOUT_STEPS: entries, METADATA: metadata}


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file next to ``path``, then rename: a killed save leaves no half file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed earlier export
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}; free space or pick another folder") from exc
    finally:
        tmp.unlink(missing_ok=True)


# ---- reading -------------------------------------------------------------------------------------
def load_legacy(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a legacy file without running code from it (mmap'd tensors where the file allows)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LegacyFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise LegacyFormatError(f"{path}: empty file (0 bytes): the save was interrupted; re-create it")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            try:
                data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # old non-zip torch files cannot be mmap'd
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _load_failure(exc)
        raise LegacyFormatError(
            f"{path}: not a readable torch file, truncated or garbled ({reason}); re-export or re-copy it"
        ) from None
    if not isinstance(data, Mapping):
        raise LegacyFormatError(
            f"{path}: holds a {type(data).__name__}, expected the legacy dict with "
            f"'{ROLLOUT_STEPS}' and '{METADATA}'"
        )
    return dict(data)


@dataclass
class LegacyInfo:
    """What a validated legacy file holds (everything import and inspect need, no tensor data)."""

    path: Path
    episode_index: int
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

    @property
    def full_matrix(self) -> bool:
        """True when the file holds the whole (seq, seq) matrix (the guide's "total_seq" layout)."""
        return self.tensor_shape[-2] == self.tensor_shape[-1] != self.suffix_len

    @property
    def num_keys(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def hint(self) -> dict[str, Any]:
        value = self.metadata.get(ATTNSTORE_HINT)
        return dict(value) if isinstance(value, Mapping) else {}


def validate_legacy(data: Mapping[str, Any], path: str | os.PathLike[str], *, check_values: bool = True) -> LegacyInfo:
    """Check the dict layout, shapes, dtypes and (optionally) values; raise one line naming the problem.

    ``check_values`` reads every tensor once (finite, within [0, 1]); inspect skips it.
    """
    import torch

    path = Path(path)

    def fail(problem: str) -> LegacyFormatError:
        return LegacyFormatError(f"{path}: {problem}")

    for key in (ROLLOUT_STEPS, METADATA):
        if key not in data:
            raise fail(f"missing key '{key}' (has {sorted(map(str, data))}): not a legacy attention file")
    meta, steps = data[METADATA], data[ROLLOUT_STEPS]
    if not isinstance(meta, Mapping):
        raise fail(f"'{METADATA}' is a {type(meta).__name__}, expected a dict")
    if not isinstance(steps, (list, tuple)):
        raise fail(f"'{ROLLOUT_STEPS}' is a {type(steps).__name__}, expected a list")
    if not steps:
        raise fail(f"'{ROLLOUT_STEPS}' is empty: the episode has no attention")
    episode = meta.get(EPISODE_INDEX)
    if not _is_int(episode):
        raise fail(f"metadata '{EPISODE_INDEX}' is {episode!r}, expected an int")

    reference: dict[str, Any] | None = None
    rollout_steps: list[int] = []
    for n, entry in enumerate(steps):
        where = f"{ROLLOUT_STEPS}[{n}]"
        if not isinstance(entry, Mapping) or ROLLOUT_STEP not in entry or ATTENTION_MAPS not in entry:
            raise fail(f"{where} is not a dict with '{ROLLOUT_STEP}' and '{ATTENTION_MAPS}'")
        if not _is_int(entry[ROLLOUT_STEP]):
            raise fail(f"{where}['{ROLLOUT_STEP}'] is {entry[ROLLOUT_STEP]!r}, expected an int")
        rollout_steps.append(int(entry[ROLLOUT_STEP]))
        shape = _entry_shape(entry[ATTENTION_MAPS], f"{where}['{ATTENTION_MAPS}']", fail)
        if reference is None:
            reference = shape
        elif shape != reference:
            diff = next(k for k in shape if shape[k] != reference[k])
            raise fail(f"{where} differs from {ROLLOUT_STEPS}[0] in {diff}: {shape[diff]} vs {reference[diff]}")
        if check_values:
            for d, dmap in entry[ATTENTION_MAPS].items():
                for layer, t in dmap[ATTENTION_WEIGHTS].items():
                    lo, hi = torch.aminmax(t.float())
                    if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < 0 or hi > 1 + PROB_TOLERANCE:
                        raise fail(
                            f"{where} denoise {d} layer {layer}: values in [{lo.item():.3g}, {hi.item():.3g}] "
                            f"are not probabilities (NaN/inf or outside [0, 1]): the file is garbled"
                        )
    if any(b <= a for a, b in zip(rollout_steps, rollout_steps[1:])):
        raise fail(f"'{ROLLOUT_STEP}' values are not increasing: {rollout_steps[:10]}...")
    assert reference is not None
    return LegacyInfo(
        path=path,
        episode_index=int(episode),
        rollout_steps=rollout_steps,
        metadata=dict(meta),
        **reference,
    )


def _entry_shape(maps: Any, where: str, fail) -> dict[str, Any]:
    """Layout facts of one entry's ``attention_maps`` (compared across entries by the caller)."""
    import torch

    if not isinstance(maps, Mapping) or not maps:
        raise fail(f"{where} must be a non-empty dict {{denoise index: ...}}")
    if not all(_is_int(d) for d in maps):
        raise fail(f"{where} keys must be denoise indices (ints), got {list(maps)[:5]}")
    keys = tuple(sorted(int(d) for d in maps))
    times, lens, facts = [], set(), set()
    for d in keys:
        dmap = maps[d]
        if not isinstance(dmap, Mapping) or ATTENTION_WEIGHTS not in dmap or TIME not in dmap:
            raise fail(f"{where}[{d}] must be a dict with '{TIME}' and '{ATTENTION_WEIGHTS}'")
        weights = dmap[ATTENTION_WEIGHTS]
        if not isinstance(weights, Mapping) or not weights or not all(_is_int(k) for k in weights):
            raise fail(f"{where}[{d}]['{ATTENTION_WEIGHTS}'] must be a non-empty dict {{layer index: tensor}}")
        try:
            times.append(float(dmap[TIME]))
        except (TypeError, ValueError):
            raise fail(f"{where}[{d}]['{TIME}'] is {dmap[TIME]!r}, expected a float") from None
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
    prefix, suffix = dmap.get(PREFIX_LEN), dmap.get(SUFFIX_LEN)
    if prefix is None and suffix is None:
        if q >= k:
            raise fail(f"{where} has no '{PREFIX_LEN}'/'{SUFFIX_LEN}' and a square ({q}, {k}) matrix: cannot tell the action rows")
        return k - q, q
    if not (_is_int(prefix) and _is_int(suffix)) or prefix < 0 or suffix < 1:
        raise fail(f"{where} '{PREFIX_LEN}'={prefix!r} '{SUFFIX_LEN}'={suffix!r}: expected non-negative ints")
    if k != prefix + suffix or q not in (suffix, k):
        raise fail(
            f"{where}: tensor shape {shape} does not match {PREFIX_LEN}={prefix} + {SUFFIX_LEN}={suffix} "
            f"(expected (1, heads, {suffix} or {prefix + suffix}, {prefix + suffix}))"
        )
    return int(prefix), int(suffix)


def entry_attention(entry: Mapping[str, Any], info: LegacyInfo) -> np.ndarray:
    """The action rows of one entry as float32 (D, L, H, suffix_len, K), in ``info``'s key order."""
    import torch

    maps = entry[ATTENTION_MAPS]
    stacked = torch.stack(
        [
            torch.stack([maps[d][ATTENTION_WEIGHTS][layer][0] for layer in info.layers])
            for d in info.denoise_keys
        ]
    )  # (D, L, H, Q or S, K)
    if info.full_matrix:
        stacked = stacked[..., -info.suffix_len :, :]
    return stacked.float().numpy()


def same_maps(a: Mapping[str, Any], b: Mapping[str, Any], info: LegacyInfo) -> bool:
    """True when two entries hold identical attention (a per-env-step file repeats an inference's maps)."""
    import torch

    ma, mb = a[ATTENTION_MAPS], b[ATTENTION_MAPS]
    for d in info.denoise_keys:
        for layer in info.layers:
            ta, tb = ma[d][ATTENTION_WEIGHTS][layer], mb[d][ATTENTION_WEIGHTS][layer]
            if ta is tb:
                continue
            if not torch.equal(ta, tb):
                return False
    return True


def find_pt_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders (searched recursively for ``*.pt``) into a sorted, de-duplicated list."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted(q for q in p.rglob("*.pt") if q.is_file() and not q.name.startswith("."))
            if not hits:
                raise LegacyFormatError(f"{p}: folder holds no .pt files")
            found.extend(hits)
        elif p.exists():
            found.append(p)
        else:
            raise LegacyFormatError(f"{p}: no such file or folder")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)  # the same file named twice is imported once
    return list(unique.values())


def _numpy_scalar_globals() -> list[Any]:
    """Data-only numpy pieces a legacy file may hold (``np.int64`` episode index, ``np.float64`` time).

    Allowing them keeps ``weights_only`` loading: a numpy scalar is rebuilt from its dtype and bytes,
    no code from the file runs.
    """
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    kinds = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64")
    return [scalar, np.dtype, *(type(np.dtype(k)) for k in kinds)]


def _load_failure(exc: BaseException) -> str:
    """torch.load's long messages cut to the part that names the problem.

    >>> _load_failure(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central "
    ...                            "directory. This is an internal miniz error. If you are seeing ..."))
    'PytorchStreamReader failed reading zip archive: failed finding central directory'
    >>> _load_failure(RuntimeError("Weights only load failed. ... WeightsUnpickler error: \\n\\nUnsupported "
    ...                            "operand 168\\n\\nCheck the documentation"))
    'safe unpickling failed: Unsupported operand 168'
    """
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return "safe unpickling failed: " + " ".join(detail.split())[:160]
    first = " ".join(text.split()).split(". ", 1)[0].rstrip(".")
    return first[:200] or type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
