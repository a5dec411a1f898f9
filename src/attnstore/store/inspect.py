"""A human summary of an attention store (``attnstore inspect STORE``).

Nothing big is read: a store's attention chunks are never touched (only index columns, the
per-episode table and metadata).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S

MAX_EPISODE_LINES = 40
STATUS_TEXT = {
    "closed": "closed (finished cleanly)",
    "writing": "writing, or killed while writing (committed rows are readable)",
    "interrupted": "interrupted (stopped by an error or Ctrl-C; committed rows are readable)",
}


# ---- store -------------------------------------------------------------------------------------
def inspect_store(source: Any, storage_options: Mapping[str, Any] | None = None) -> str:
    """The summary of one store (a local path, an fsspec URL or a zarr Store)."""
    from attnstore.store.location import locate
    from attnstore.store.open import RUN_ATTR, STATUS_ATTR, STATUS_REASON_ATTR, episode_table, open_attention, read_spec, spec_of

    loc = locate(source, storage_options)
    path = loc.name
    read_spec(loc)  # a one-line error for a foreign zarr store before xarray gets to it
    ds = open_attention(loc)
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
    if ds.attrs.get(STATUS_REASON_ATTR):
        out.append(f"  reason:       {ds.attrs[STATUS_REASON_ATTR]}")
    size = loc.size_bytes()
    out.append(f"  size on disk: {'unknown' if size is None else human_bytes(size)}")
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
    always = (S.ATTENTION, S.KEY_VALID, S.LANGUAGE_TOKEN_TEXT)  # shown above, or a companion of the token ids
    stored = [v.name for v in S.batch_variables(spec) if v.name not in always and v.name in ds]
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
        out.extend(f"  {k}: {compact(v)}" for k, v in run.items())
    else:
        out.append("  (no run attrs)")
    return "\n".join(out)


# ---- helpers -----------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """Bytes in a readable unit.

    >>> human_bytes(512), human_bytes(2_500_000), human_bytes(2_800_000_000)
    ('512 B', '2.5 MB', '2.8 GB')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def compact(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (Mapping, list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
