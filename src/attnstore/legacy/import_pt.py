"""Import legacy per-episode ``.pt`` files into an attention store (all or nothing).

Both variants of the format are read (the guide's and the fork's, see :mod:`attnstore.legacy.pt`),
float32, bfloat16 or float16, any set of layers, tensors saved from a GPU included (loaded onto the CPU).
Two passes, one file open at a time (``torch.load(map_location="cpu", mmap=True, weights_only=True)``):

1. structure: every file's dict layout and shapes are checked and must agree (layers, denoise steps,
   heads, prefix/suffix lengths); this fixes the store's spec, episode numbers and task names; no
   tensor data is read;
2. data: each file is mapped again and streamed entry by entry: an entry is converted to float32, its
   values checked (finite probabilities), appended through the real :class:`AttentionWriter` into a
   temporary store next to the target, and its file pages released. Peak memory is a few entries plus
   what the writer holds, not the file (measured: peak RSS growth < 1.5x the file size; see
   tests/test_legacy_pt.py). A progress bar per file counts its entries (stderr).

Only when every file went in is the temporary store renamed to the target; on any error it is
removed, so a bad file never leaves a half-written store (and an existing target stays untouched).

What a legacy file does not say, and how it is inferred (files written by ``attnstore export-pt``
carry ``metadata['attnstore']`` and need none of this):

* token layout: ``key = prefix_len + suffix_len``; ``prefix_len - num_language`` (default 200) keys are
  camera patches, ``grid x grid`` (default 16 x 16 = 256) per camera. Three cameras (768 keys, the
  LIBERO Pi0.5 layout) are named ``image``, ``image2``, ``empty_camera_0``; other counts ``cam0``,
  ``cam1``, ... unless ``cameras`` names them. A camera slot is *present* if any of its keys has mass
  in the first entry of the first file.
* ``key_valid`` per inference, from the data: a camera's keys are valid if any of them has mass in
  that inference; language keys are valid up to the last one with mass (Pi0.5 right-pads the
  prompt); action keys are always valid. Deciding per camera and per prompt rather than per key keeps
  real keys whose tiny probability rounded to 0 (bf16, uint16) valid.
* ``env_step`` = the legacy ``rollout_step``. Consecutive entries with identical maps (a file saved
  once per env step, repeating each inference's maps) collapse into one inference row unless
  ``keep_repeats``.
* episode index from ``metadata.episode_index`` (the guide's, and attnstore's export), else the fork's
  top-level ``episode_index`` (numbered per task; an index already taken by an earlier file gets the
  next free number, with a note); task group/id from the parent folder ``<group>_<id>``;
  ``num_env_steps``: one past the last frame of a per-env-step file, else the last ``rollout_step`` plus
  the median step between inferences; ``success`` is unknown and stored as False (run attrs say so).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import LegacyFormatError, SchemaError
from attnstore.schema import EpisodeRecord, StoreSpec, TokenLayout
from attnstore.legacy import pt as L
from attnstore.legacy import pt_validate as V

Notify = Callable[[str], None]
LIBERO_CAMERAS = ("image", "image2", "empty_camera_0")
FOLDER_RE = re.compile(r"^(?P<group>.+)_(?P<id>\d+)$")


@dataclass(frozen=True)
class LayoutGuess:
    """How to read the key axis of files without attnstore's hint (see the module docstring)."""

    num_language: int = 200
    grid: int = 16
    cameras: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_language < 0 or self.grid < 1:
            raise SchemaError(f"--num-language must be >= 0 and --grid >= 1, got {self.num_language}, {self.grid}")
        if self.cameras is not None:
            object.__setattr__(self, "cameras", tuple(self.cameras))


@dataclass
class _Plan:
    """Pass-1 result for one file."""

    path: Path
    info: V.LegacyInfo
    episode: int
    task_group: str
    task_id: int


def import_pt(
    paths: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    encoding: str = "portable",
    overwrite: bool = False,
    *,
    guess: LayoutGuess = LayoutGuess(),
    keep_repeats: bool = False,
    progress: bool = True,
    notify: Notify | None = None,
) -> Path:
    """Convert legacy ``.pt`` files (or folders of them) into a new store at ``store``; return its path."""
    from tqdm.auto import tqdm

    from attnstore.store.create import preflight
    from attnstore.store.writer import AttentionWriter

    if encoding not in S.ENCODINGS:
        raise SchemaError(f"--encoding must be one of {list(S.ENCODINGS)}, got '{encoding}'")
    notify = notify or (lambda msg: tqdm.write(f"attnstore: {msg}", file=sys.stderr))
    store = Path(store)
    preflight(store, "overwrite" if overwrite else "create")  # refuse before reading any file
    files = L.find_pt_files(paths)

    plans = _plan(files, notify)
    spec = _spec(plans[0], encoding, guess)
    for plan in plans[1:]:
        _check_same(plan.info, plans[0].info)
    run = {
        "source": "legacy .pt import (attnstore import-pt)",
        "success_known": all("success" in p.info.hint for p in plans),
        "imported_from": [
            {"file": str(p.path), "episode": p.episode, "episode_index_in_file": p.info.episode_index,
             "layout": p.info.variant, "batch_index": p.info.batch_index}
            for p in plans
        ],
    }

    tmp = store.with_name(f".{store.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # max_queue=1 and _import_file's wait: one entry converted while the writer writes another
        writer = AttentionWriter(tmp, spec, run=run, mode="create", max_queue=1)
        try:
            for k, plan in enumerate(plans, 1):
                desc = f"[{k}/{len(plans)}] {plan.path.name}"
                with tqdm(total=len(plan.info.rollout_steps), desc=desc, unit="entry", file=sys.stderr,
                          disable=not progress, dynamic_ncols=True) as bar:
                    kept = _import_file(writer, plan, spec, keep_repeats, bar)
                record = _record(plan, kept)
                if record is not None:
                    writer.end_episode(record)
            writer.close()
        except BaseException:
            try:
                writer.close(status="interrupted")
            except Exception:
                pass  # the original error is the one to report
            raise
        _replace(tmp, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store


def _import_file(writer: Any, plan: _Plan, spec: StoreSpec, keep_repeats: bool, bar: Any) -> list[int]:
    """Stream one file's entries into ``writer``, one at a time; return the indices of the entries stored.

    Memory: the file is mmap'd and each entry's pages are released once it is converted; the next entry
    is converted only while the writer holds at most one (the one it writes), and freed heap memory is
    handed back after each entry. So what is resident is about two entries' float32 arrays and the
    writer's encoding buffers, not the file. Values are checked entry by entry (a bad one fails the
    whole import).
    """
    from attnstore.store.writer import InferenceBatch

    data, mapped = L.load_legacy_mapped(plan.path)
    info = V.validate_legacy(data, plan.path, check_values=False)
    entries = data[L.ROLLOUT_STEPS]
    steps = info.rollout_steps
    kept: list[int] = []
    times = np.asarray(spec.times)
    for i, entry in enumerate(entries):
        repeat = (
            not keep_repeats and kept and steps[i] == steps[i - 1] + 1
            and V.same_maps(entries[kept[-1]], entry, info)
        )
        if not repeat:
            while writer.pending > 1:  # convert the next entry only once the writer holds just one
                time.sleep(0.002)
            att = V.entry_attention(entry, info)
            V.check_entry_values(att, info, i)
            writer.append(
                InferenceBatch(
                    episodes=[plan.episode],
                    env_steps=[steps[i]],
                    attention=att[None],
                    key_valid=infer_key_valid(att, spec.layout)[None],
                    times=times,
                )
            )
            kept.append(i)
            del att
        if mapped:
            L.release_pages(L.entry_tensors(entry))
        L.trim_heap()
        bar.update()
    return kept


def infer_key_valid(attention: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """(K,) validity of one inference's keys from its (D, L, H, Q, K) attention (module docstring).

    >>> lay = TokenLayout(("a", "b"), (True, False), grid_rows=1, grid_cols=2, num_language=3, num_action=1)
    >>> att = np.array([0.5, 0.0, 0.0, 0.0, 0.3, 0.2, 0.0, 0.0]).reshape(1, 1, 1, 1, 8)
    >>> infer_key_valid(att, lay).astype(int).tolist()  # cam a | cam b | lang x3 | action
    [1, 1, 0, 0, 1, 1, 0, 1]
    """
    mass = (attention.reshape(-1, attention.shape[-1]) != 0).any(axis=0)
    valid = np.zeros(layout.num_keys, dtype=bool)
    for cam in layout.cameras:
        s = layout.region_slice(cam)
        valid[s] = mass[s].any()
    lang = layout.region_slice(S.REGION_LANGUAGE)
    used = np.flatnonzero(mass[lang])
    if used.size:
        valid[lang.start : lang.start + used[-1] + 1] = True
    valid[layout.region_slice(S.REGION_ACTION)] = True
    return valid


def guess_layout(info: V.LegacyInfo, guess: LayoutGuess, present: Sequence[bool] | None = None) -> TokenLayout:
    """Token layout of a file without attnstore's hint (module docstring).

    >>> info = V.LegacyInfo(Path("x.pt"), 0, [0], (9,), (0.1,), (17,), 8, 968, 50, (1, 8, 50, 1018), "float32")
    >>> guess_layout(info, LayoutGuess()).cameras
    ('image', 'image2', 'empty_camera_0')
    """
    ppc = guess.grid * guess.grid
    image_keys = info.prefix_len - guess.num_language
    if image_keys < 0 or image_keys % ppc:
        raise LegacyFormatError(
            f"{info.path}: cannot infer the token layout: prefix_len {info.prefix_len} - {guess.num_language} "
            f"language tokens = {image_keys} keys is not a whole number of {guess.grid}x{guess.grid}-patch "
            f"cameras; pass --num-language and --grid"
        )
    n_cams = image_keys // ppc
    if guess.cameras is not None:
        if len(guess.cameras) != n_cams:
            raise LegacyFormatError(
                f"{info.path}: {n_cams} camera slots in the key axis but --cameras names {len(guess.cameras)}"
            )
        cameras = guess.cameras
    else:
        cameras = LIBERO_CAMERAS if n_cams == len(LIBERO_CAMERAS) else tuple(f"cam{i}" for i in range(n_cams))
    return TokenLayout(
        cameras=cameras,
        camera_present=tuple(present) if present is not None else (True,) * n_cams,
        grid_rows=guess.grid,
        grid_cols=guess.grid,
        num_language=guess.num_language,
        num_action=info.suffix_len,
    )


# ---- steps -------------------------------------------------------------------------------------
def _plan(files: list[Path], notify: Notify) -> list[_Plan]:
    plans: list[_Plan] = []
    taken: set[int] = set()
    for path in files:
        info = V.validate_legacy(L.load_legacy(path), path, check_values=False)
        episode = info.episode_index
        if episode in taken:
            new = max(taken) + 1
            notify(f"{path}: episode index {episode} already imported from another file; stored as episode {new}")
            episode = new
        taken.add(episode)
        hint = info.hint
        group, task_id = hint.get(S.TASK_GROUP), hint.get(S.TASK_ID)
        if not group:
            m = FOLDER_RE.match(path.parent.name)
            group, task_id = (m["group"], int(m["id"])) if m else ("", -1)
        plans.append(_Plan(path, info, episode, str(group), int(task_id if task_id is not None else -1)))
    return plans


def _spec(plan: _Plan, encoding: str, guess: LayoutGuess) -> StoreSpec:
    info, hint = plan.info, plan.info.hint
    layout = None
    if isinstance(hint.get("layout"), dict):
        layout = TokenLayout.from_dict(hint["layout"])
        if layout.num_keys != info.num_keys or layout.num_action != info.suffix_len:
            layout = None  # hint does not fit the tensors: fall back to inference
    if layout is None:
        layout = guess_layout(info, guess)
        first = L.load_legacy(plan.path)[L.ROLLOUT_STEPS][0]
        valid = infer_key_valid(V.entry_attention(first, info), layout)
        del first
        present = [bool(valid[layout.region_slice(c)].any()) for c in layout.cameras]
        layout = guess_layout(info, guess, present)
    num_denoise = max(
        int(hint.get("num_denoise_steps") or 0),
        int(info.num_denoising_steps or 0),
        max(info.denoise_keys) + 1,
    )
    num_layers = hint.get("num_layers")
    if num_layers is not None and max(info.layers) >= int(num_layers):
        num_layers = None
    return StoreSpec(
        layout=layout,
        layers=info.layers,
        denoise_steps=info.denoise_keys,
        num_denoise_steps=num_denoise,
        num_layers=num_layers,
        num_heads=info.num_heads,
        encoding=encoding,  # type: ignore[arg-type]
        store_language_tokens=False,
        times=info.times,
    )


def _check_same(info: V.LegacyInfo, first: V.LegacyInfo) -> None:
    for name in ("layers", "denoise_keys", "num_heads", "prefix_len", "suffix_len"):
        a, b = getattr(info, name), getattr(first, name)
        if a != b:
            raise LegacyFormatError(
                f"{info.path}: {name} {a} differs from {first.path.name}'s {b}: import them into separate stores"
            )
    if not np.allclose(info.times, first.times, atol=1e-5):
        raise LegacyFormatError(f"{info.path}: denoise times {info.times} differ from {first.path.name}'s {first.times}")


def _record(plan: _Plan, kept: list[int]) -> EpisodeRecord | None:
    info, hint = plan.info, plan.info.hint
    if hint.get("finished") is False:
        return None  # exported from an unfinished episode: keep it unfinished
    steps = info.rollout_steps
    num_env_steps = hint.get(S.NUM_ENV_STEPS)
    if num_env_steps is None:
        if len(kept) < len(steps):  # per-env-step file: one entry per frame
            num_env_steps = steps[-1] + 1
        else:
            gaps = np.diff(steps)
            num_env_steps = steps[-1] + (int(np.median(gaps)) if gaps.size else 1)
    return EpisodeRecord(
        episode=plan.episode,
        task_group=plan.task_group,
        task_id=plan.task_id,
        task=str(hint.get(S.TASK, "")),
        success=bool(hint.get(S.SUCCESS, False)),
        num_env_steps=int(num_env_steps),
    )


def _replace(tmp: Path, store: Path) -> None:
    """Move the finished temporary store into place (an old store is removed only after)."""
    old = None
    if store.exists():
        old = store.with_name(f".{store.name}.old-{os.getpid()}")
        os.replace(store, old)
    os.replace(tmp, store)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
