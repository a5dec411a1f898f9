"""Inspection of legacy ``.pt`` files and folders of them (``attnstore inspect FILE_OR_DIR``).

Files are opened with ``mmap`` (tensor data stays on disk). ``inspect_report`` is the command's entry:
it hands stores to :mod:`attnstore.store.inspect` and everything else to the legacy readers here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, StoreError
from attnstore.store.inspect import human_bytes, inspect_store


def inspect_path(path: str | os.PathLike[str]) -> str:
    """The inspection text for a store, a legacy ``.pt`` file or a folder of ``.pt`` files."""
    return inspect_report(path)[0]


def inspect_report(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(text, number of unreadable files). A single bad file or store raises a one-line error."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist: pass an attention.zarr store, a .pt file or a folder of them")
    if path.is_dir() and (path / "zarr.json").is_file():
        return inspect_store(path), 0
    if path.is_file():
        return inspect_legacy_file(path), 0
    return _inspect_legacy_folder(path)


def inspect_legacy_file(path: Path) -> str:
    """Like the guide's ``inspect_saved_attention.py``: metadata, structure, an example entry, size."""
    from attnstore.legacy import pt as L

    data = L.load_legacy(path)
    info = L.validate_legacy(data, path, check_values=False)
    meta = info.metadata
    first = data[L.ROLLOUT_STEPS][0]
    last_d = info.denoise_keys[-1]
    example = first[L.ATTENTION_MAPS][last_d]
    steps = info.rollout_steps
    gaps = sorted(set(np.diff(steps).tolist())) if len(steps) > 1 else []
    size = path.stat().st_size
    out = [f"File: {path.name}  ({path})"]
    out.append("  Metadata:")
    out.append(f"    Episode Index: {meta.get(L.EPISODE_INDEX)}")
    out.append(f"    Number of rollout steps: {meta.get(L.NUM_ROLLOUT_STEPS)}")
    out.append(f"    Number of denoising steps per action: {meta.get(L.NUM_DENOISING_STEPS)}")
    hint = info.hint
    if hint:
        task = f"{hint.get(S.TASK_GROUP, '?')}_{hint.get(S.TASK_ID, '?')}"
        out.append(
            f"    attnstore export: task {task}, success {hint.get(S.SUCCESS, '?')}, "
            f"env steps {hint.get(S.NUM_ENV_STEPS, '?')}, one entry per "
            f"{'env step' if hint.get('every_env_step') else 'inference'}"
        )
    out.append("  Structure:")
    out.append(f"    Entries (rollout steps) in file: {len(steps)}")
    out.append(f"    rollout_step values: {steps[0]} .. {steps[-1]} (spacing {gaps if gaps else '-'})")
    out.append(f"    Denoising steps per entry: {len(info.denoise_keys)} (keys {list(info.denoise_keys)})")
    out.append(f"  Example (rollout step {first[L.ROLLOUT_STEP]}, denoising step {last_d}):")
    out.append(f"    Time: t={float(example[L.TIME]):.3f}")
    out.append(f"    Prefix length (visual+language tokens): {info.prefix_len}")
    out.append(f"    Suffix length (action tokens): {info.suffix_len}")
    out.append(f"    Layers saved: {', '.join(map(str, info.layers))}")
    for layer in info.layers:
        shape = tuple(example[L.ATTENTION_WEIGHTS][layer].shape)
        out.append(f"    Layer {layer} attention shape: {shape} {info.dtype}")
    q = "total_seq" if info.full_matrix else "query"
    out.append(f"      (batch=1, heads={info.num_heads}, {q}={info.tensor_shape[2]}, key={info.tensor_shape[3]})")
    out.append(f"      where key = prefix_len + suffix_len = {info.prefix_len} + {info.suffix_len}")
    out.append(
        f"  File Size: {human_bytes(size)} ({len(steps)} rollout steps x {len(info.denoise_keys)} denoising steps "
        f"x {len(info.layers)} layers)"
    )
    return "\n".join(out)


def _inspect_legacy_folder(path: Path) -> tuple[str, int]:
    files = sorted(p for p in path.rglob("*.pt") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise StoreError(f"{path} is neither an attention store (no zarr.json) nor a folder with .pt files")
    parts = [f"Found {len(files)} attention map files in {path}"]
    bad = 0
    for f in files:
        parts.append("")
        parts.append("=" * 80)
        try:
            parts.append(inspect_legacy_file(f))
        except AttnStoreError as exc:
            bad += 1
            parts.append(f"File: {f.name}  ({f})\n  UNREADABLE: {exc}")
    total = sum(f.stat().st_size for f in files)
    parts.append("")
    parts.append(f"Total: {len(files)} files, {human_bytes(total)}" + (f", {bad} unreadable" if bad else ""))
    return "\n".join(parts), bad
