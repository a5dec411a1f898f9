"""Synthetic attention with real structure, written through the real AttentionWriter.

Shared by the test suites (and benches). Everything goes through attnstore's public pieces
(``schema``, ``AttentionWriter``, ``InferenceBatch``, ``EpisodeRecord``), so a store built here is a
store an evaluation could have written.

What "real structure" means here (the LIBERO Pi0.5 key layout, see ``schema.TokenLayout``):

* every attention row is a probability distribution over the valid keys: rows sum to 1 (float32,
  within 1e-6) and masked keys (missing cameras, language padding) are exactly 0;
* an attention sink: the first language token (BOS) takes a large share (~0.3-0.6, per head);
* each present camera carries a smooth field over its ``grid_rows x grid_cols`` patches: a Gaussian
  bump whose centre moves with the env step (and differs per episode and camera, see ``bump_centre``);
* the rest is spread over valid language tokens and the action tokens, with mild noise per
  (denoise, layer, head, query), and sharper bumps at later denoise steps.

Images carry a recognisable pattern: a colour gradient (red grows to the right, green downwards),
blue = 80 * camera slot, and a white square over the attention bump's centre patch, so an overlay
that maps patches to pixels correctly puts the heat on the white square.

Sizes: the defaults are the real LIBERO Pi0.5 ones (3 camera slots of 16x16, 200 language tokens,
50 action tokens, 8 heads); tests shrink them via ``make_spec(num_language=..., num_action=..., grid=...,
num_heads=..., image_size=...)`` to stay fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.schema import EpisodeRecord, StoreSpec, TokenLayout
from attnstore.store.writer import AttentionWriter, InferenceBatch

TASK_GROUP = "libero_object"
TASKS = (
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the salad dressing and place it in the basket",
)
ENV_STEPS_PER_INFERENCE = 10  # n_action_steps of the LIBERO Pi0.5 checkpoints
ACTION_DIM = 7
SINK_RANGE = (0.3, 0.6)  # share of attention the sink key (first language token) takes, per head


def make_spec(
    cameras: Sequence[str] = ("image", "image2", "empty_camera_0"),
    present: Sequence[bool] = (True, True, False),
    layers: Sequence[int] = (16, 17),
    num_layers: int | None = 18,
    denoise_steps: Sequence[int] = tuple(range(10)),
    encoding: str = "uint16",
    images: bool = True,
    actions: bool = True,
    prefix_layers: Sequence[int] = (),
    num_language: int = 200,
    num_action: int = 50,
    *,
    grid: int = 16,
    num_heads: int = 8,
    image_size: int = 224,
    num_denoise_steps: int = 10,
    language_tokens: bool = True,
) -> StoreSpec:
    """A StoreSpec shaped like LIBERO Pi0.5 (override sizes to make tests fast).

    >>> spec = make_spec()
    >>> spec.attention_shape_per_inference
    (10, 2, 8, 50, 1018)
    >>> make_spec(num_language=12, num_action=4, grid=4, num_heads=2).attention_shape_per_inference
    (10, 2, 2, 4, 64)
    """
    layout = TokenLayout(
        cameras=tuple(cameras),
        camera_present=tuple(present),
        grid_rows=grid,
        grid_cols=grid,
        num_language=num_language,
        num_action=num_action,
    )
    return StoreSpec(
        layout=layout,
        layers=tuple(layers),
        denoise_steps=tuple(denoise_steps),
        num_denoise_steps=num_denoise_steps,
        num_layers=num_layers,
        num_heads=num_heads,
        encoding=encoding,  # type: ignore[arg-type]
        image_shape=(image_size, image_size, 3) if images else None,
        action_shape=(num_action, ACTION_DIM) if actions else None,
        store_language_tokens=language_tokens,
        prefix_layers=tuple(prefix_layers),
    )


def bump_centre(layout: TokenLayout, episode: int, env_step: int, camera_slot: int) -> tuple[float, float]:
    """Centre (row, col), in patch units, of the attention bump on one camera at one env step.

    It moves on a circle as env steps pass; episodes and cameras start at different angles.

    >>> lay = TokenLayout(("image", "image2"), (True, True))
    >>> r, c = bump_centre(lay, 0, 0, 0)
    >>> (round(r, 3), round(c, 3))
    (7.5, 12.0)
    """
    angle = 0.05 * env_step + 1.3 * episode + 2.1 * camera_slot
    radius = 0.3
    row = (layout.grid_rows - 1) * (0.5 + radius * math.sin(angle))
    col = (layout.grid_cols - 1) * (0.5 + radius * math.cos(angle))
    return row, col


def bump_patch(layout: TokenLayout, episode: int, env_step: int, camera_slot: int) -> tuple[int, int]:
    """The patch (row, col) nearest the bump centre: where the attention field peaks."""
    row, col = bump_centre(layout, episode, env_step, camera_slot)
    return int(round(row)), int(round(col))


def key_valid_mask(spec: StoreSpec, batch: int = 1, n_valid_language: int | Sequence[int] = 30) -> np.ndarray:
    """(B, K) validity: missing cameras and language padding beyond ``n_valid_language`` are False."""
    lay = spec.layout
    n_valid = np.broadcast_to(np.asarray(n_valid_language), (batch,))
    valid = np.repeat(lay.static_key_valid()[None], batch, axis=0)
    lang = lay.region_slice(S.REGION_LANGUAGE)
    for b in range(batch):
        keep = min(int(n_valid[b]), lay.num_language)
        valid[b, lang.start + keep : lang.stop] = False
    return valid


def synthetic_attention(
    spec: StoreSpec,
    rng: np.random.Generator,
    batch: int = 1,
    n_valid_language: int | Sequence[int] = 30,
    *,
    episodes: Sequence[int] | None = None,
    env_steps: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention probabilities (B, D, L, H, Q, K) float32 and key_valid (B, K) with real structure.

    ``episodes``/``env_steps`` (default: 0..B-1 and 0) place the moving bump (see ``bump_centre``).

    >>> spec = make_spec(num_language=6, num_action=3, grid=4, num_heads=2, images=False, actions=False)
    >>> att, valid = synthetic_attention(spec, np.random.default_rng(0), batch=2, n_valid_language=4)
    >>> att.shape, att.dtype, valid.shape
    ((2, 10, 2, 2, 3, 57), dtype('float32'), (2, 57))
    >>> bool(np.all(att[:, ..., ~valid[0]] == 0)), float(abs(att.sum(-1, dtype=np.float64) - 1).max()) < 1e-6
    (True, True)
    """
    lay = spec.layout
    D, L, H, Q, K = spec.attention_shape_per_inference
    episodes = np.arange(batch) if episodes is None else np.asarray(episodes)
    env_steps = np.zeros(batch, int) if env_steps is None else np.asarray(env_steps)
    valid = key_valid_mask(spec, batch, n_valid_language)

    # base field per (batch, key): camera bumps, flat language, flat actions
    rows, cols = np.divmod(np.arange(lay.patches_per_camera), lay.grid_cols)
    sharp = np.linspace(1.0, 2.0, D)  # later denoise steps: sharper bumps
    width = max(lay.grid_rows, lay.grid_cols) / 6.0
    log_field = np.zeros((batch, D, K))
    for b in range(batch):
        for slot, (cam, present) in enumerate(zip(lay.cameras, lay.camera_present)):
            if not present:
                continue
            r0, c0 = bump_centre(lay, int(episodes[b]), int(env_steps[b]), slot)
            d2 = ((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * width**2)
            log_field[b, :, lay.region_slice(cam)] = 3.0 - sharp[:, None] * d2[None, :]
    log_field[:, :, lay.region_slice(S.REGION_ACTION)] = 1.0

    noise = rng.normal(0.0, 0.3, size=(batch, D, L, H, Q, K))
    weights = np.exp(log_field[:, :, None, None, None, :] + noise)
    weights *= valid[:, None, None, None, None, :]

    # attention sink: the first language token (BOS) takes a per-head share of the mass
    lang = lay.region_slice(S.REGION_LANGUAGE)
    sink = lang.start if lay.num_language and valid[:, lang.start].all() else None
    if sink is not None:
        weights[..., sink] = 0.0
    probs = weights / weights.sum(-1, keepdims=True)
    if sink is not None:
        share = rng.uniform(*SINK_RANGE, size=(batch, 1, L, H, 1))
        probs *= 1.0 - share[..., None]
        probs[..., sink] = share
    attention = probs.astype(np.float32)
    return attention, valid


def prompt_tokens(task: str, n: int) -> list[str]:
    """The first ``n`` word tokens of a Pi0.5-style prompt (cycled if the prompt is shorter)."""
    words = f"Task: {task}, State: 12 200 7;\nAction: ".split()
    return [words[i % len(words)] for i in range(n)]


def synthetic_images(spec: StoreSpec, episodes: Sequence[int], env_steps: Sequence[int]) -> np.ndarray:
    """(B, C_present, H, W, 3) uint8: gradient + camera tint + white square on the bump's patch."""
    lay = spec.layout
    assert spec.image_shape is not None
    h, w, _ = spec.image_shape
    present = [slot for slot, p in enumerate(lay.camera_present) if p]
    out = np.empty((len(episodes), len(present), h, w, 3), np.uint8)
    ph, pw = h / lay.grid_rows, w / lay.grid_cols
    for b, (ep, step) in enumerate(zip(episodes, env_steps)):
        for c, slot in enumerate(present):
            img = out[b, c]
            img[..., 0] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
            img[..., 1] = np.linspace(0, 200, h, dtype=np.uint8)[:, None]
            img[..., 2] = 80 * slot
            r, cc = bump_patch(lay, int(ep), int(step), slot)
            img[int(r * ph) : int((r + 1) * ph), int(cc * pw) : int((cc + 1) * pw)] = 255
    return out


def synthetic_actions(spec: StoreSpec, episodes: Sequence[int], env_steps: Sequence[int]) -> np.ndarray:
    """(B, chunk, action_dim) float32: smooth sines of time, different per episode and dimension."""
    assert spec.action_shape is not None
    chunk, dim = spec.action_shape
    t = np.asarray(env_steps, float)[:, None, None] + np.arange(chunk)[None, :, None]
    phase = np.asarray(episodes, float)[:, None, None] + np.arange(dim)[None, None, :]
    return np.sin(0.1 * t + phase).astype(np.float32)


def synthetic_batch(
    spec: StoreSpec,
    rng: np.random.Generator,
    episodes: Sequence[int],
    env_steps: Sequence[int],
    *,
    keep: Sequence[bool] | None = None,
    n_valid_language: int | Sequence[int] = 30,
    tasks: Sequence[str] | None = None,
) -> InferenceBatch:
    """One InferenceBatch (B = len(episodes)) filling every field the spec requires."""
    episodes = [int(e) for e in episodes]
    env_steps = [int(s) for s in env_steps]
    batch = len(episodes)
    attention, valid = synthetic_attention(
        spec, rng, batch, n_valid_language, episodes=episodes, env_steps=env_steps
    )
    out = InferenceBatch(
        episodes=np.asarray(episodes, np.int64),
        env_steps=np.asarray(env_steps, np.int32),
        attention=attention,
        key_valid=valid,
        times=np.asarray(spec.times, np.float32),
        keep=None if keep is None else np.asarray(keep, bool),
    )
    lay = spec.layout
    if spec.store_language_tokens and lay.num_language:
        n = lay.num_language
        lang = lay.region_slice(S.REGION_LANGUAGE)
        ids = np.full((batch, n), S.LANGUAGE_PAD_ID, np.int32)
        text = np.full((batch, n), "", dtype=object)
        for b, ep in enumerate(episodes):
            n_valid = int(valid[b, lang].sum())
            task = tasks[b] if tasks is not None else task_of(ep)
            words = prompt_tokens(task, n_valid)
            text[b, :n_valid] = words
            ids[b, :n_valid] = [1000 + sum(map(ord, w)) for w in words]
        out.language_token_id = ids
        out.language_token_text = text.astype(str)
    if spec.image_shape is not None:
        out.images = synthetic_images(spec, episodes, env_steps)
    if spec.action_shape is not None:
        out.actions = synthetic_actions(spec, episodes, env_steps)
    if spec.prefix_layers:
        PL, H, P, _ = spec.prefix_attention_shape_per_inference
        w = np.tril(rng.uniform(0.1, 1.0, size=(batch, PL, H, P, P)))  # causal-looking rows
        out.prefix_attention = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    return out


def task_id_of(episode: int) -> int:
    """Task id of a synthetic episode (alternates 0, 1, 0, ... so exports span two task folders)."""
    return episode % 2


def task_of(episode: int) -> str:
    return TASKS[task_id_of(episode) % len(TASKS)]


def num_env_steps_of(episode: int, rollouts: int) -> int:
    """Env steps of a synthetic episode with ``rollouts`` inferences: the last chunk is cut short.

    The last inference serves 1..10 env steps (3 for episode 0, 7 for episode 1, ...).

    >>> num_env_steps_of(0, 5), num_env_steps_of(1, 3)
    (43, 27)
    """
    return (rollouts - 1) * ENV_STEPS_PER_INFERENCE + 1 + (2 + 4 * episode) % ENV_STEPS_PER_INFERENCE


def default_run(episodes: Mapping[int, int]) -> dict[str, Any]:
    """Run attrs a synthetic store carries (like an eval's: task group, ids, n_action_steps)."""
    return {
        "policy": "synthetic",
        "task_group": TASK_GROUP,
        "task_ids": sorted({task_id_of(e) for e in episodes}),
        "n_action_steps": ENV_STEPS_PER_INFERENCE,
    }


def write_synthetic_store(
    path: str | os.PathLike[str],
    spec: StoreSpec,
    episodes: Mapping[int, int] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    finish_episodes: bool | Collection[int] = True,
    *,
    n_valid_language: int = 30,
    run: Mapping[str, Any] | None = None,
    status: str = "closed",
    mode: str = "create",
) -> dict[str, Any]:
    """Write a store of ragged episodes through the real writer; return the ground truth written.

    ``episodes`` maps episode index -> number of inferences (default ``{0: 5, 1: 3}``). Inference r
    of an episode runs at env step ``r * 10``. With ``batch_size`` B > 1, episodes run B at a time in
    lockstep (in the order given): every append carries B rows and rows of already finished
    episodes are dropped with ``keep`` (as lerobot-eval's finished envs keep stepping). An episode's
    EpisodeRecord is queued right after its last inference when it is in ``finish_episodes``
    (True = all, False = none: a killed run). ``status``: ``closed`` / ``interrupted`` close the
    writer with that status; ``writing`` flushes and leaves it open (as a killed run would).

    Returns ``{"spec", "run", "rows": [...], "episodes": {...}}`` plus stacked arrays in commit
    order: ``episode``, ``rollout``, ``env_step``, ``attention``, ``key_valid`` and, where the spec
    stores them, ``images``, ``actions``, ``language_token_id``, ``language_token_text``,
    ``prefix_attention``. ``rows`` lists ``(episode, rollout)`` per row; ``episodes[e]`` has
    ``rollouts``, ``num_env_steps``, ``task_group``, ``task_id``, ``task``, ``success``, ``finished``.
    Use ``truth_index(truth, episode, rollout)`` to find a row.
    """
    episodes = dict({0: 5, 1: 3} if episodes is None else episodes)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if status not in ("closed", "interrupted", "writing"):
        raise ValueError(f"status must be closed, interrupted or writing, got {status!r}")
    finished = set(episodes) if finish_episodes is True else set(finish_episodes or ())
    run = default_run(episodes) if run is None else dict(run)
    rng = np.random.default_rng(seed)

    fields = ["attention", "key_valid", "images", "actions", "language_token_id", "language_token_text",
              "prefix_attention"]
    collected: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    rows: list[tuple[int, int]] = []
    env_step_rows: list[int] = []
    table: dict[int, dict[str, Any]] = {}
    for ep, n in episodes.items():
        table[ep] = {
            "rollouts": n,
            "num_env_steps": num_env_steps_of(ep, n),
            "task_group": TASK_GROUP,
            "task_id": task_id_of(ep),
            "task": task_of(ep),
            "success": ep % 2 == 0,
            "finished": ep in finished,
        }

    writer = AttentionWriter(path, spec, run=run, mode=mode)  # type: ignore[arg-type]
    order = list(episodes)
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        for r in range(max(episodes[e] for e in group)):
            live = [r < episodes[e] for e in group]
            steps = [r * ENV_STEPS_PER_INFERENCE] * len(group)
            batch = synthetic_batch(
                spec, rng, group, steps, keep=live if batch_size > 1 else None, n_valid_language=n_valid_language
            )
            writer.append(batch)
            for b, ep in enumerate(group):
                if not live[b]:
                    continue
                rows.append((ep, r))
                env_step_rows.append(steps[b])
                for f in fields:
                    value = getattr(batch, f)
                    if value is not None:
                        collected[f].append(np.asarray(value)[b])
            for b, ep in enumerate(group):
                if r == episodes[ep] - 1 and ep in finished:
                    t = table[ep]
                    writer.end_episode(
                        EpisodeRecord(
                            episode=ep,
                            task_group=t["task_group"],
                            task_id=t["task_id"],
                            task=t["task"],
                            success=t["success"],
                            num_env_steps=t["num_env_steps"],
                        )
                    )
    if status == "writing":
        writer.flush()  # everything committed; the store stays "writing", unconsolidated, like a kill
    else:
        writer.close(status=status)

    truth: dict[str, Any] = {
        "path": Path(path),
        "spec": spec,
        "run": run,
        "rows": rows,
        "episodes": table,
        "episode": np.asarray([e for e, _ in rows], np.int64),
        "rollout": np.asarray([r for _, r in rows], np.int32),
        "env_step": np.asarray(env_step_rows, np.int32),
    }
    for f, values in collected.items():
        if values:
            truth[f] = np.stack(values)
    return truth


def truth_index(truth: Mapping[str, Any], episode: int, rollout: int) -> int:
    """Row of ``(episode, rollout)`` in the ground-truth arrays."""
    return truth["rows"].index((int(episode), int(rollout)))
