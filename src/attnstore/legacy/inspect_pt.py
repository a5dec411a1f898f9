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
    """Like the guide's ``inspect_saved_attention.py``: metadata, structure, an example entry, size.

    Either variant (the guide's or the fork's keys, see :mod:`attnstore.legacy.pt`); no tensor data is read.
    """
    from attnstore.legacy import pt as L
    from attnstore.legacy import pt_validate as V

    data = L.load_legacy(path)
    info = V.validate_legacy(data, path, check_values=False)
    meta = info.metadata
    first = data[L.ROLLOUT_STEPS][0]
    last_d = info.denoise_keys[-1]
    example = first[L.ATTENTION_MAPS][last_d]
    steps = info.rollout_steps
    gaps = sorted(set(np.diff(steps).tolist())) if len(steps) > 1 else []
    size = path.stat().st_size
    out = [f"File: {path.name}  ({path})"]
    out.append(f"  Metadata ({_VARIANTS[info.variant]}):")
    out.append(f"    Episode Index: {info.episode_index}")
    if info.file_episode_index is not None and info.file_episode_index != info.episode_index:
        out.append(f"    Episode Index in the task (top level): {info.file_episode_index}")
    if info.batch_index is not None:
        out.append(f"    Batch Index: {info.batch_index}")
    out.append(f"    Number of rollout steps: {meta.get(L.NUM_ROLLOUT_STEPS)}")
    out.append(f"    Number of denoising steps per action: {info.num_denoising_steps}")
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
    if len(info.layers) <= 4:
        for layer in info.layers:
            shape = tuple(example[L.ATTENTION_WEIGHTS][layer].shape)
            out.append(f"    Layer {layer} attention shape: {shape} {info.dtype}")
    else:  # all layers have the same shape (validated): one line
        out.append(f"    Layers {info.layers[0]}..{info.layers[-1]} attention shape: {info.tensor_shape} {info.dtype} (each)")
    q = "total_seq" if info.full_matrix else "query"
    out.append(f"      (batch=1, heads={info.num_heads}, {q}={info.tensor_shape[2]}, key={info.tensor_shape[3]})")
    out.append(f"      where key = prefix_len + suffix_len = {info.prefix_len} + {info.suffix_len}")
    share = _storage_share(first)
    if share > 1:  # the fork's [b:b+1] slices of the batch's tensors: torch.save wrote the whole storage
        out.append(f"    Tensors are views of {share}x larger storages (saved with batch {share}): the file "
                   f"carries the whole batch's maps, {share}x this episode's")
    out.append(
        f"  File Size: {human_bytes(size)} ({len(steps)} rollout steps x {len(info.denoise_keys)} denoising steps "
        f"x {len(info.layers)} layers)"
    )
    return "\n".join(out)


def _storage_share(entry) -> int:
    """How many times the bytes an entry's tensors view their storages hold (no tensor data is read).

    1 for files whose storages are all viewed (attnstore's export shares one storage per inference
    between its layers); B for the fork's batch-B files, each tensor a ``[b:b+1]`` view of the batch's.
    """
    from attnstore.legacy import pt as L

    storages: dict[int, tuple[int, set[tuple[int, int]]]] = {}
    for t in L.entry_tensors(entry):
        st = t.untyped_storage()
        _, spans = storages.setdefault(st.data_ptr(), (st.nbytes(), set()))
        spans.add((t.storage_offset() * t.element_size(), t.nbytes))
    viewed = sum(n for _, spans in storages.values() for _, n in spans)
    total = sum(size for size, _ in storages.values())
    return max(1, round(total / viewed)) if viewed else 1


_VARIANTS = {
    "guide": "guide layout, metadata.episode_index",
    "fork": "fork layout: top-level episode_index/batch_index, as lerobot_eval.py rollout() saves it",
    "guide+fork": "guide and fork keys, as attnstore export-pt writes",
}


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
