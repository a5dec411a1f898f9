"""``attnstore eval``'s checks before any simulation: the policy argument, lerobot's config, the layer and
task selections, the store's writer (an existing store is refused now), the disk budget, the run's record.

Each fails in one ``attnstore: error:`` line (:class:`~attnstore.errors.EvalConfigError`,
:class:`~attnstore.errors.StoreError`) before lerobot builds an env.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnstore.errors import EvalConfigError, StoreError
from attnstore.evaluation.config import AttentionConfig
from attnstore.evaluation.libero_env import check_libero_ready, check_libero_tasks
from attnstore.schema import RunInfo

if TYPE_CHECKING:
    from attnstore.capture.checkpoint import Checkpoint


def resolve_policy_arg(args: list[str]) -> tuple[list[str], Checkpoint]:
    """Check ``--policy.path`` (a missing or non-Pi0.5 local dir fails in one line); ``tiny`` = the
    cached tiny model. Returns the args (a local path made absolute) and the resolved checkpoint."""
    from attnstore.capture import checkpoint

    value = _flag_value(args, "--policy.path")
    if value is None:
        raise EvalConfigError(
            "pass --policy.path=DIR (a Pi0.5 checkpoint directory or hub id; "
            "'attnstore make-tiny-policy DIR' builds a tiny offline one, or use --policy.path=tiny)"
        )
    ckpt = checkpoint.resolve(value)
    args = [a for a in args if not a.startswith("--policy.path=")] + [f"--policy.path={ckpt.source}"]
    return args, ckpt


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """Value of ``flag=VALUE`` (last one wins), the form lerobot's parser reads.

    >>> _flag_value(["--policy.path=a", "--x=1", "--policy.path=b"], "--policy.path")
    'b'
    """
    value = None
    for arg in args:
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_lerobot_config(args: Sequence[str]):
    """lerobot's ``EvalPipelineConfig`` from lerobot-eval flags, parsed by lerobot's own parser.

    lerobot reads ``sys.argv`` (also inside the config's ``__post_init__``), so it is set for the call.
    """
    from lerobot.configs import parser
    from lerobot.configs.eval import EvalPipelineConfig

    def _identity(cfg):
        return cfg

    _identity.__annotations__ = {"cfg": EvalPipelineConfig}  # lerobot's wrap reads the real class here

    saved = sys.argv
    sys.argv = ["attnstore eval", *args]
    try:
        return parser.wrap()(_identity)()
    finally:
        sys.argv = saved


def check_config(cfg: Any, attention: AttentionConfig, checkpoint: Checkpoint) -> int:
    """Every check that can fail before lerobot builds an env: policy type, layers, task suite.
    Returns the number of tasks the run evaluates (LIBERO: from its suites; other envs: 1)."""
    from attnstore.capture.checkpoint import require_pi05
    from attnstore.selection import parse_denoise_steps, parse_layers

    policy = cfg.policy
    require_pi05(policy, what="--policy.path")
    if getattr(cfg.env, "max_parallel_tasks", 1) > 1:
        raise EvalConfigError(
            "--env.max_parallel_tasks > 1 runs tasks concurrently on one policy, which the recorder "
            "cannot attribute to episodes: use --env.max_parallel_tasks=1"
        )
    depth, vlm_depth = checkpoint.depths(policy)

    def label(name: str) -> str:
        return f"--attention.{name}={getattr(attention, name)}"

    parse_layers(attention.layer_selection, depth, error=EvalConfigError, label=label("layers"))
    parse_denoise_steps(
        attention.denoise_selection, checkpoint.num_denoise_steps(policy), error=EvalConfigError,
        label=label("denoise_steps")
    )
    prefix = attention.prefix_selection
    if prefix is not False:
        parse_layers(attention.layer_selection if prefix is True else prefix, vlm_depth, what="VLM layer",
                     error=EvalConfigError, label=label("prefix"))
    if getattr(cfg.env, "type", None) == "libero":
        check_libero_ready()
        return sum(len(ids) for ids in check_libero_tasks(cfg.env.task, cfg.env.task_ids).values())
    return 1


def check_disk(cfg: Any, attention: AttentionConfig, checkpoint: Checkpoint, store: Path, n_tasks: int) -> None:
    """The disk budget (:func:`attnstore.evaluation.budget.preflight_disk`): prints the expected bytes per
    episode when they are big, warns when the disk may fill up, refuses when it clearly will."""
    from attnstore.evaluation.budget import preflight_disk

    depth, _ = checkpoint.depths(cfg.policy)

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    preflight_disk(cfg, attention, store, depth=depth, n_tasks=n_tasks, echo=echo,
                   denoise_steps=checkpoint.num_denoise_steps(cfg.policy))


def make_writer(store_path: Path, attention: AttentionConfig, run: RunInfo):
    """The store's writer; refuses an existing store now, before any simulation."""
    from attnstore.store.writer import AttentionWriter

    try:
        return AttentionWriter(
            store_path, run=run.to_dict(), mode="overwrite" if attention.overwrite else "create",
            nice=attention.writer_nice,
        )
    except StoreError as exc:
        if attention.overwrite or not store_path.exists():
            raise
        raise StoreError(
            f"{store_path} already holds an attention store from another run: pass "
            f"--attention.overwrite=true to replace it, or a fresh --output_dir / --attention.store"
        ) from exc


def run_info(cfg: Any, attention: AttentionConfig, argv: Sequence[str], checkpoint: Checkpoint) -> RunInfo:
    """What produced the store, kept in its root attrs (the task plans are added once the envs exist)."""
    from importlib.metadata import version

    env = cfg.env
    return RunInfo(
        tool="attnstore eval",
        argv=tuple(str(a) for a in argv),
        policy=checkpoint.source if checkpoint.local else str(cfg.policy.pretrained_path),
        policy_type=cfg.policy.type,
        tiny_policy=checkpoint.tiny,
        n_action_steps=int(cfg.policy.n_action_steps),
        env_type=getattr(env, "type", None),
        env_task=str(getattr(env, "task", "")),
        task_ids=None if getattr(env, "task_ids", None) is None else tuple(int(t) for t in env.task_ids),
        episode_length=getattr(env, "episode_length", None),
        n_episodes=int(cfg.eval.n_episodes),
        batch_size=int(cfg.eval.batch_size),
        use_async_envs=bool(cfg.eval.use_async_envs),
        seed=cfg.seed,
        output_dir=str(cfg.output_dir),
        eval_info=str(Path(cfg.output_dir) / "eval_info.json"),
        videos_dir=str(Path(cfg.output_dir) / "videos"),
        lerobot_version=version("lerobot"),
        attention={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(attention).items()},
    )


