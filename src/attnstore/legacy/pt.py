"""The legacy per-episode ``.pt`` attention format: its two variants, building it, reading it safely.

One file per episode, in one of two variants (:mod:`attnstore.legacy.pt_validate` reads both):

* the guide's (``pi05_attention_saving_guide.md``)::

    {'rollout_steps': [{'rollout_step': int,                      # env step = video frame index
                        'attention_maps': {d: {'time': float,     # d = denoise index 0..9
                                               'prefix_len': int, 'suffix_len': int,
                                               'attention_weights': {layer: tensor (1, heads, query, key)}}}},
                       ...],
     'metadata': {'episode_index': int, 'num_rollout_steps': int, 'num_denoising_steps': int}}

* the fork's, what its ``lerobot_eval.py`` ``rollout()`` really writes (IanHuangYH/lerobot)::

    {'episode_index': int,   # per task: n_episodes_so_far + batch_index, the file's (and video's) number
     'batch_index': int,     # position in the vector env batch
     'rollout_steps': [...same entries...],
     'metadata': {'num_rollout_steps': int, 'num_denoising_steps_per_action': int}}

  with every expert layer (0..17), bfloat16 tensors saved from ``cuda:0`` (loaded with
  ``map_location="cpu"``), ``time`` a float32 value (0.8999999761581421) and, with batch > 1, each
  tensor a ``[b:b+1]`` view whose storage (written whole) holds the entire batch.

``attention_weights`` tensors are float32, bfloat16 or float16, of shape ``(1, H, suffix_len, prefix_len +
suffix_len)`` (the action tokens' rows) or ``(1, H, S, S)`` with ``S = prefix_len + suffix_len`` (the whole
matrix, the guide's "total_seq" example; the action rows are its last ``suffix_len`` rows).

attnstore's export writes the superset both kinds of reader accept: the guide's keys, the fork's top-level
``episode_index`` (the file's number, as the fork's) and ``batch_index``, and
``metadata.num_denoising_steps_per_action``; ``metadata.episode_index`` is the store's episode. It adds one
optional key, ``metadata['attnstore']`` (token layout, task, success, env steps), which no legacy reader
looks at and which makes import exact.

Reading uses ``torch.load(map_location="cpu", mmap=True, weights_only=True)``: no code runs from the file,
tensors stay on disk until touched, and :func:`release_pages` hands the pages of an entry already
converted back to the OS (so a whole file never sits in RAM). Every problem becomes a one-line
:class:`LegacyFormatError` naming the file.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
EPISODE_INDEX = "episode_index"  # the guide's in metadata, the fork's at the top level
BATCH_INDEX = "batch_index"  # the fork's, top level
NUM_ROLLOUT_STEPS = "num_rollout_steps"
NUM_DENOISING_STEPS = "num_denoising_steps"  # the guide's
NUM_DENOISING_STEPS_PER_ACTION = "num_denoising_steps_per_action"  # the fork's
ATTNSTORE_HINT = "attnstore"  # optional metadata key written by attnstore's export

# what each variant's top level and metadata hold (error messages name both)
GUIDE_LAYOUT = "the guide's {'rollout_steps', 'metadata': {'episode_index', 'num_rollout_steps', 'num_denoising_steps'}}"
FORK_LAYOUT = ("the fork's {'episode_index', 'batch_index', 'rollout_steps', "
               "'metadata': {'num_rollout_steps', 'num_denoising_steps_per_action'}}")
EXPECTED_LAYOUTS = f"expected {GUIDE_LAYOUT} or {FORK_LAYOUT}"

FILE_PATTERN = "episode_{episode:05d}_attention.pt"
FILE_RE = re.compile(r"^episode_(\d+)_attention\.pt$")
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
    entries: list[dict[str, Any]],
    episode_index: int,
    hint: Mapping[str, Any] | None = None,
    *,
    file_index: int | None = None,
    batch_index: int = 0,
) -> dict[str, Any]:
    """The whole per-episode dict, the superset of the guide's and the fork's keys.

    ``episode_index`` goes to ``metadata`` (the guide's global episode number); ``file_index`` (default:
    the same) is the fork's top-level ``episode_index``, the file's per-task number.

    >>> d = legacy_episode([], 7, file_index=1, batch_index=1)
    >>> d["episode_index"], d["batch_index"], d["metadata"]
    (1, 1, {'episode_index': 7, 'num_rollout_steps': 0, 'num_denoising_steps': 0, 'num_denoising_steps_per_action': 0})
    """
    n_denoise = len(entries[0][ATTENTION_MAPS]) if entries else 0
    metadata: dict[str, Any] = {
        EPISODE_INDEX: int(episode_index),
        NUM_ROLLOUT_STEPS: len(entries),
        NUM_DENOISING_STEPS: n_denoise,
        NUM_DENOISING_STEPS_PER_ACTION: n_denoise,
    }
    if hint is not None:
        metadata[ATTNSTORE_HINT] = dict(hint)
    return {
        EPISODE_INDEX: int(episode_index if file_index is None else file_index),
        BATCH_INDEX: int(batch_index),
        ROLLOUT_STEPS: entries,
        METADATA: metadata,
    }


def file_index_of(path: str | os.PathLike[str]) -> int | None:
    """The number in a legacy file name (``episode_00003_attention.pt`` -> 3), None for other names.

    >>> file_index_of("out/libero_object_0/episode_00003_attention.pt"), file_index_of("x.pt")
    (3, None)
    """
    m = FILE_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


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
    """Load a legacy file onto the CPU without running code from it (mmap'd tensors where the file allows)."""
    return load_legacy_mapped(path)[0]


def load_legacy_mapped(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bool]:
    """(the file's dict, whether its tensors are mmap'd from the file: only then may :func:`release_pages` run).

    ``map_location="cpu"``: the fork saved its tensors from ``cuda:0``; they load here without a GPU.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise LegacyFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise LegacyFormatError(f"{path}: empty file (0 bytes): the save was interrupted; re-create it")
    mapped = True
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            try:
                data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # old non-zip torch files cannot be mmap'd
                    raise
                mapped = False
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _load_failure(exc)
        raise LegacyFormatError(
            f"{path}: not a readable torch file, truncated or garbled ({reason}); re-export or re-copy it"
        ) from None
    if not isinstance(data, Mapping):
        raise LegacyFormatError(f"{path}: holds a {type(data).__name__}, {EXPECTED_LAYOUTS}")
    return dict(data), mapped


def entry_tensors(entry: Mapping[str, Any]) -> Iterator[Any]:
    """Every attention tensor of one ``rollout_steps`` element (any layout; non-tensors skipped)."""
    import torch

    maps = entry.get(ATTENTION_MAPS) if isinstance(entry, Mapping) else None
    for dmap in (maps.values() if isinstance(maps, Mapping) else ()):
        weights = dmap.get(ATTENTION_WEIGHTS) if isinstance(dmap, Mapping) else None
        for t in (weights.values() if isinstance(weights, Mapping) else ()):
            if isinstance(t, torch.Tensor):
                yield t


def release_pages(tensors: Iterable[Any]) -> None:
    """Give the resident pages of mmap'd tensors back to the OS (``madvise(MADV_DONTNEED)``), Linux only.

    Only for tensors of a :func:`load_legacy_mapped` load that said ``mapped``, never modified in place:
    the mapping is a private file mapping, so dropped pages are read again from the file if touched
    later (the data stays the same; an in-place edit would be lost); only whole pages inside each
    storage are dropped. Without this, reading a file
    through mmap leaves all of it resident (counted in the RSS) until the file is closed.
    """
    libc = _libc()
    if libc is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    seen: set[int] = set()
    for t in tensors:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in seen or size < page:
            continue
        seen.add(ptr)
        start = -(-ptr // page) * page
        end = (ptr + size) // page * page
        if end > start:
            libc.madvise(start, end - start, _MADV_DONTNEED)  # argtypes set: plain ints are fine


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Converting entry after entry frees as much as it allocates, but glibc keeps freed blocks below its
    mmap threshold (32 MB) in per-thread arenas: without trimming, the import's RSS creeps up by a
    few entries' worth (measured: peak growth 1.2-1.55x instead of 1.0-1.1x of a 210 MB file).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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


def is_int(value: Any) -> bool:
    """True for Python and numpy integers (not bools).

    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---- helpers -------------------------------------------------------------------------------------
_MADV_DONTNEED = 4  # Linux
_LIBC: list[Any] = []


def _libc() -> Any:
    """The C library through ctypes (``madvise``, ``malloc_trim``), or None off Linux / when not found."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


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
