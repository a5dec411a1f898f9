"""``attnstore inspect``: a human summary of an attention store, a legacy ``.pt`` file or a folder of them.

Nothing big is read: a store's attention chunks are never touched (only index columns, the
per-episode table and metadata), and legacy files are opened with ``mmap`` (tensor data stays on disk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, StoreError

MAX_EPISODE_LINES = 40
STATUS_TEXT = {
    "closed": "closed (finished cleanly)",
    "writing": "writing, or killed while writing (committed rows are readable)",
    "interrupted": "interrupted (stopped by an error or Ctrl-C; committed rows are readable)",
}


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


# ---- store -------------------------------------------------------------------------------------
def inspect_store(path: Path) -> str:
    from attnstore.readers.open import RUN_ATTR, STATUS_ATTR, open_attention, read_spec, spec_of
    from attnstore.store.export_pt import episode_table
    from attnstore.store.writer import directory_bytes

    read_spec(path)  # a one-line error for a foreign zarr store before xarray gets to it
    ds = open_attention(path)
    spec = spec_of(ds)
    lay = spec.layout
    status = ds.attrs.get(STATUS_ATTR) or "unknown"
    run = ds.attrs.get(RUN_ATTR) or {}
    episode = np.asarray(ds[S.EPISODE].values)
    env_step = np.asarray(ds[S.ENV_STEP].values)
    table = episode_table(ds)
    episodes = sorted(set(episode.tolist()) | set(table))
    incomplete = [e for e in episodes if e not in table]

    out = [f"Attention store: {path}"]
    out.append(f"  status:       {STATUS_TEXT.get(status, status)}")
    out.append(f"  size on disk: {_human(directory_bytes(path))}")
    out.append(f"  encoding:     {spec.encoding} (max abs error {S.MAX_ABS_ERROR[spec.encoding]:.2g})")
    out.append(
        f"  episodes:     {len(episodes)} ({len(episodes) - len(incomplete)} complete, {len(incomplete)} incomplete)"
    )
    out.append(f"  inferences:   {episode.size}")
    out.append("")
    out.append("Capture")
    depth = f" of {spec.num_layers}" if spec.num_layers else ""
    out.append(f"  layers:        {list(spec.layers)}{depth} (action expert)")
    out.append(f"  heads:         {spec.num_heads}")
    out.append(f"  denoise steps: {list(spec.denoise_steps)} of {spec.num_denoise_steps}")
    out.append(f"  times t:       {[round(t, 4) for t in spec.times]}")
    shape = (episode.size, *spec.attention_shape_per_inference)
    dims = (S.INFERENCE, S.DENOISE, S.LAYER, S.HEAD, S.QUERY, S.KEY)
    out.append(f"  attention:     {shape} ({', '.join(dims)})")
    out.append(f"  prefix_len:    {lay.prefix_len} (camera patches + language)")
    out.append(f"  suffix_len:    {lay.num_action} (action tokens)")
    if spec.prefix_layers:
        out.append(f"  prefix layers: {list(spec.prefix_layers)} (VLM prefix self-attention)")
    stored = [name for name in (S.IMAGES, S.ACTIONS, S.LANGUAGE_TOKEN_ID, S.PREFIX_ATTENTION) if name in ds]
    out.append(f"  also stored:   {', '.join(stored) if stored else 'nothing else'}")
    out.append("")
    out.append("Key regions")
    for region in lay.regions:
        s = lay.region_slice(region)
        note = ""
        if region in lay.cameras:
            present = lay.camera_present[lay.cameras.index(region)]
            note = f"{lay.grid_rows}x{lay.grid_cols} patches, " + ("present" if present else "missing (masked)")
        elif region == S.REGION_LANGUAGE:
            note = "prompt tokens, right-padded (padding masked)"
        else:
            note = "action tokens"
        out.append(f"  {region:<16} keys {s.start:>5}-{s.stop - 1:<5} {note}")
    out.append("")
    out.append("Episodes")
    out.append(f"  {'episode':>7} {'inferences':>10} {'env steps':>11} {'complete':>8} {'success':>7} {'steps':>6}  task")
    for n, ep in enumerate(episodes):
        if n == MAX_EPISODE_LINES:
            out.append(f"  ... {len(episodes) - n} more episodes")
            break
        mask = episode == ep
        steps = env_step[mask]
        span = f"{steps.min()}-{steps.max()}" if steps.size else "-"
        row = table.get(ep)
        if row is None:
            out.append(f"  {ep:>7} {int(mask.sum()):>10} {span:>11} {'no':>8} {'?':>7} {'?':>6}  (no episode record)")
        else:
            task = f"{row[S.TASK_GROUP]}_{row[S.TASK_ID]}: {row[S.TASK]}"
            out.append(
                f"  {ep:>7} {int(mask.sum()):>10} {span:>11} {'yes':>8} {str(bool(row[S.SUCCESS])).lower():>7} "
                f"{row[S.NUM_ENV_STEPS]:>6}  {task}"
            )
    out.append("")
    out.append("Run")
    if run:
        out.extend(f"  {k}: {_compact(v)}" for k, v in run.items())
    else:
        out.append("  (no run attrs)")
    return "\n".join(out)


# ---- legacy ------------------------------------------------------------------------------------
def inspect_legacy_file(path: Path) -> str:
    """Like the guide's ``inspect_saved_attention.py``: metadata, structure, an example entry, size."""
    from attnstore.store import legacy_pt as L

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
        f"  File Size: {_human(size)} ({len(steps)} rollout steps x {len(info.denoise_keys)} denoising steps "
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
    parts.append(f"Total: {len(files)} files, {_human(total)}" + (f", {bad} unreadable" if bad else ""))
    return "\n".join(parts), bad


# ---- helpers -----------------------------------------------------------------------------------
def _human(n: int) -> str:
    """Bytes in a readable unit.

    >>> _human(512), _human(2_500_000), _human(2_800_000_000)
    ('512 B', '2.5 MB', '2.8 GB')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _compact(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (Mapping, list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
