"""How many bytes an evaluation's capture will write, and whether the disk can hold them (pure: no torch).

``attnstore eval`` prints the estimate before the first episode and refuses to start when the free disk is
clearly insufficient for the planned episodes: below the *minimum* (the best compression seen, so a refusal
is never a false alarm); below the *expected* size it only warns. With ``--attention.layers=all`` on a
full-size policy an episode is ~8 GB of raw float32 per env (28 inferences x 293 MB), so this matters.

>>> plan = CapturePlan(layers=18, denoise_steps=10, episode_length=280, n_action_steps=10, episodes=50)
>>> est = estimate(plan)
>>> est.inferences_per_episode, round(est.raw_per_inference / 1e6)
(28, 293)
>>> print(describe(est))
capture: 28 inferences/episode x 293 MB raw float32 (18 layers) -> ~1.2 GB per episode on disk (portable; at least 425 MB), ~59 GB for 50 episodes
>>> check_disk(est, free_bytes=10e9)
Traceback (most recent call last):
...
attnstore.errors.EvalConfigError: not enough free disk for the attention store: 50 episodes need at least 21 GB (~59 GB expected), 10 GB are free; these would fit: --attention.layers=last:2 (at least 3.0 GB), --attention.encoding=compact (at least 8.9 GB), recording at most 23 of the 50 episodes (--attention.episodes=[...], 23 indices); or free space, or write elsewhere (--attention.store=...)
>>> check_disk(est, free_bytes=40e9)
'warning: ~59 GB expected for 50 episodes, 40 GB are free: the run may stop with a full disk (every committed inference stays readable)'
>>> check_disk(est, free_bytes=100e9) is None
True
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnstore.errors import EvalConfigError

# On-disk bytes per raw float32 byte of attention, per encoding: (expected, minimum). Expected: the tiny
# Pi0.5's real capture (portable 126.5 MB / 912 MB raw per episode, compact 48.7, analysis 39.0; README);
# minimum: well below the most compressible maps measured, so a refusal is never a false alarm.
DISK_PER_RAW: dict[str, tuple[float, float]] = {
    "portable": (0.14, 0.05),
    "uint16": (0.14, 0.05),
    "compact": (0.06, 0.02),
    "analysis": (0.05, 0.015),
    "float32": (0.6, 0.2),
}
IMAGE_DISK_PER_RAW = (0.7, 0.3)  # uint8 policy images, blosc-zstd 3
SUMMARY_DISK_PER_RAW = (0.8, 0.4)  # float16 summaries (measured ~0.75 on the tiny Pi0.5)
# lerobot 0.6.1's LIBERO episode lengths per suite (env.episode_length when not given)
LIBERO_EPISODE_LENGTH = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                         "libero_90": 400}
FULL_SIZE_LAYERS = 18  # pi05_libero_finetuned's expert depth: where the estimate is printed by default


@dataclass(frozen=True)
class CapturePlan:
    """What a run will capture (defaults: LIBERO Pi0.5, 2 present cameras + 1 empty, images stored)."""

    layers: int  # expert layers stored in full
    denoise_steps: int = 10
    episode_length: int = 280  # env steps per episode (the maximum: failures run to it)
    n_action_steps: int = 10  # env steps per model run
    episodes: int = 1  # episodes that will be recorded
    heads: int = 8
    action_tokens: int = 50
    keys: int = 1018
    encoding: str = "portable"
    cameras: int = 2  # present cameras whose images are stored (0: images off)
    image_pixels: int = 224 * 224 * 3
    summary_layers: int = 18  # layers with a per-layer summary (0: off)
    regions: int = 5
    prefix_layers: int = 0
    prefix_len: int = 968


@dataclass(frozen=True)
class Estimate:
    plan: CapturePlan
    inferences_per_episode: int
    raw_per_inference: float  # float32 bytes of attention (what the writer is handed, before quantising)
    expected_per_episode: float  # on-disk bytes
    minimum_per_episode: float

    @property
    def expected_total(self) -> float:
        return self.expected_per_episode * self.plan.episodes

    @property
    def minimum_total(self) -> float:
        return self.minimum_per_episode * self.plan.episodes


def estimate(plan: CapturePlan) -> Estimate:
    """Bytes per inference (raw) and per episode on disk (expected and minimum) of ``plan``.

    >>> e = estimate(CapturePlan(layers=2, cameras=0, summary_layers=0))
    >>> round(e.raw_per_inference / 1e6, 1), round(e.expected_per_episode / 1e6)
    (32.6, 128)
    """
    p = plan
    per_inf = math.ceil(p.episode_length / max(p.n_action_steps, 1))
    attention = 4.0 * p.denoise_steps * p.layers * p.heads * p.action_tokens * p.keys
    prefix = 4.0 * p.prefix_layers * p.heads * p.prefix_len * p.prefix_len
    images = float(p.cameras * p.image_pixels)
    summaries = 2.0 * p.summary_layers * p.denoise_steps * (p.heads * p.action_tokens * (p.regions + 1) + p.cameras * 256)
    expected_rate, minimum_rate = DISK_PER_RAW.get(p.encoding, DISK_PER_RAW["portable"])

    def disk(i: int, rate: float) -> float:
        return ((attention + prefix) * rate + images * IMAGE_DISK_PER_RAW[i] + summaries * SUMMARY_DISK_PER_RAW[i]) * per_inf

    return Estimate(p, per_inf, attention + prefix, disk(0, expected_rate), disk(1, minimum_rate))


def describe(est: Estimate) -> str:
    """One line for the console: inferences, raw MB per inference, GB per episode and for the run."""
    p = est.plan
    return (
        f"capture: {est.inferences_per_episode} inferences/episode x {est.raw_per_inference / 1e6:.0f} MB raw float32 "
        f"({p.layers} layers) -> ~{_gb(est.expected_per_episode)} per episode on disk ({p.encoding}; at least "
        f"{_gb(est.minimum_per_episode)}), ~{_gb(est.expected_total, 0)} for {p.episodes} episodes"
    )


def check_disk(est: Estimate, free_bytes: float) -> str | None:
    """Raise EvalConfigError when ``free_bytes`` is below the minimum (naming the ``--attention.*`` changes
    that would fit, :func:`fitting_options`); a warning line below the expected."""
    p = est.plan
    if free_bytes < est.minimum_total:
        options = fitting_options(est, free_bytes)
        fits = f"these would fit: {', '.join(options)}; or " if options else (
            "record fewer layers (--attention.layers=last:2) or episodes (--attention.episodes=...), ")
        raise EvalConfigError(
            f"not enough free disk for the attention store: {p.episodes} episodes need at least "
            f"{_gb(est.minimum_total, 0)} (~{_gb(est.expected_total, 0)} expected), {_gb(free_bytes, 0)} are free; "
            f"{fits}free space, or write elsewhere (--attention.store=...)"
        )
    if free_bytes < est.expected_total:
        return (
            f"warning: ~{_gb(est.expected_total, 0)} expected for {p.episodes} episodes, {_gb(free_bytes, 0)} are "
            f"free: the run may stop with a full disk (every committed inference stays readable)"
        )
    return None


def fitting_options(est: Estimate, free_bytes: float) -> list[str]:
    """The single ``--attention.*`` changes whose minimum size fits in ``free_bytes`` (each with it): the last
    2 layers, the compact encoding, no images, fewer episodes.

    >>> est = estimate(CapturePlan(layers=18, episodes=10))
    >>> fitting_options(est, est.minimum_total / 2)
    ['--attention.layers=last:2 (at least 599 MB)', '--attention.encoding=compact (at least 1.8 GB)', 'recording at most 5 of the 10 episodes (--attention.episodes=[...], 5 indices)']
    >>> fitting_options(est, est.minimum_per_episode / 10)
    []
    """
    p = est.plan
    options = []
    for flag, change in (
        ("--attention.layers=last:2", {"layers": min(p.layers, 2)}),
        ("--attention.encoding=compact", {"encoding": "compact"}),
        ("--attention.images=false", {"cameras": 0}),
    ):
        smaller = estimate(dataclasses.replace(p, **change))
        if smaller.minimum_total < est.minimum_total and smaller.minimum_total <= free_bytes:
            options.append(f"{flag} (at least {_gb(smaller.minimum_total)})")
    n = int(free_bytes // est.minimum_per_episode) if est.minimum_per_episode else p.episodes
    if 1 <= n < p.episodes:
        options.append(f"recording at most {n} of the {p.episodes} episodes (--attention.episodes=[...], {n} indices)")
    return options


def free_bytes_at(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem that will hold ``path`` (its first existing parent)."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def plan_from_config(cfg: Any, attention: Any, *, depth: int, n_tasks: int,
                     denoise_steps: int | None = None) -> CapturePlan:
    """A :class:`CapturePlan` from lerobot's ``EvalPipelineConfig`` and attnstore's ``AttentionConfig``,
    before any env or policy exists (duck-typed: reads attributes, imports nothing).

    ``depth``: the expert's layer count (``Checkpoint.depths``); ``n_tasks``: tasks the run evaluates;
    ``denoise_steps``: steps per model run (``Checkpoint.num_denoise_steps``; default the config's
    ``num_inference_steps``).
    """
    from attnstore.selection import parse_denoise_steps, parse_layers

    policy, env = cfg.policy, cfg.env
    layers = len(parse_layers(attention.layer_selection, depth, error=EvalConfigError))
    total = int(denoise_steps) if denoise_steps is not None else int(policy.num_inference_steps)
    steps = len(parse_denoise_steps(attention.denoise_selection, total, error=EvalConfigError))
    length = getattr(env, "episode_length", None) or LIBERO_EPISODE_LENGTH.get(str(getattr(env, "task", "")), 520)
    slots = list(getattr(policy, "image_features", {}) or {})  # camera slots, empty (masked) ones included
    cameras = sum(not str(k).rsplit(".", 1)[-1].startswith("empty_camera") for k in slots)
    episodes = int(cfg.eval.n_episodes) * max(int(n_tasks), 1)
    chosen = getattr(attention, "episodes", None)  # None: all; else the recorded episode indices
    if isinstance(chosen, (list, tuple)):
        episodes = min(episodes, len(chosen))
    chunk = int(policy.chunk_size)
    n_language = int(getattr(policy, "tokenizer_max_length", 200))
    return CapturePlan(
        layers=layers,
        denoise_steps=steps,
        episode_length=int(length),
        n_action_steps=int(policy.n_action_steps),
        episodes=episodes,
        action_tokens=chunk,
        keys=len(slots) * 256 + n_language + chunk,
        encoding=str(getattr(attention, "encoding", "portable")),
        cameras=cameras if getattr(attention, "images", True) else 0,
        summary_layers=depth if getattr(attention, "summary", True) else 0,
    )


def preflight_disk(cfg: Any, attention: Any, store: str | os.PathLike[str], *, depth: int, n_tasks: int,
                   echo: Any = print, free: int | None = None, denoise_steps: int | None = None) -> Estimate:
    """``attnstore eval``'s check before the first episode: print the estimate when an episode is big (every
    layer of a full-size policy, or >= 1 GB), warn when the disk may fill up, refuse when it clearly will
    (EvalConfigError). ``free``: free bytes (default: the filesystem of ``store``).

    >>> from types import SimpleNamespace as NS
    >>> policy = NS(num_inference_steps=10, chunk_size=50, n_action_steps=10, tokenizer_max_length=200,
    ...             image_features=dict.fromkeys(["observation.images.image", "observation.images.image2",
    ...                                           "observation.images.empty_camera_0"]))
    >>> cfg = NS(policy=policy, env=NS(task="libero_object", episode_length=None), eval=NS(n_episodes=2))
    >>> attention = NS(layer_selection="all", denoise_selection="all", episodes=None, encoding="portable")
    >>> est = preflight_disk(cfg, attention, ".", depth=18, n_tasks=1, free=10**13)
    attnstore: capture: 28 inferences/episode x 293 MB raw float32 (18 layers) -> ~1.2 GB per episode on disk (portable; at least 425 MB), ~2 GB for 2 episodes
    """
    est = estimate(plan_from_config(cfg, attention, depth=depth, n_tasks=n_tasks, denoise_steps=denoise_steps))
    if est.plan.layers >= FULL_SIZE_LAYERS or est.expected_per_episode >= 1e9:
        echo(f"attnstore: {describe(est)}")
    note = check_disk(est, free_bytes_at(store) if free is None else free)
    if note:
        echo(f"attnstore: {note}")
    return est


def _gb(n: float, digits: int = 1) -> str:
    """Bytes as GB (or MB below 1 GB).

    >>> _gb(2.5e9), _gb(3.4e8), _gb(58.4e9, 0)
    ('2.5 GB', '340 MB', '58 GB')
    """
    if n < 1e9:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e9:.{digits}f} GB"
