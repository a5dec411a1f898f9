"""Offline LIBERO defaults and the checks that must pass before a simulation starts.

:func:`apply_runtime_defaults` sets the process environment lerobot, hf-libero and MuJoCo read at
import time, so it runs before any of them is imported. It only fills in what the user left unset,
and forces hub-offline mode only for the embedded tiny policy (a hub id stays the user's business).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from attnstore.errors import EvalConfigError

LIBERO_CONFIG_DIRNAME = "libero-config"  # written by `make setup` (scripts/setup_libero.py) in the venv


def apply_runtime_defaults(
    tiny_policy: bool, environ: MutableMapping[str, str] | None = None, prefix: str | None = None
) -> dict[str, str]:
    """Fill in MUJOCO_GL, LIBERO_CONFIG_PATH and (tiny policy only) HF_HUB_OFFLINE; return what was set.

    >>> env = {"MUJOCO_GL": "osmesa"}
    >>> apply_runtime_defaults(True, env, prefix="/nonexistent")
    {'HF_HUB_OFFLINE': '1'}
    >>> env["MUJOCO_GL"], apply_runtime_defaults(False, {}, prefix="/nonexistent")
    ('osmesa', {'MUJOCO_GL': 'egl'})
    """
    environ = os.environ if environ is None else environ
    wanted = {"MUJOCO_GL": "egl"}  # headless rendering, works on CPU (Mesa llvmpipe)
    config_dir = Path(prefix or sys.prefix) / LIBERO_CONFIG_DIRNAME
    if (config_dir / "config.yaml").is_file():
        # hf-libero otherwise asks a question on stdin at first import (EOFError without a tty)
        wanted["LIBERO_CONFIG_PATH"] = str(config_dir)
    if tiny_policy:
        wanted["HF_HUB_OFFLINE"] = "1"  # the tiny model and its tokenizer are local
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied


def check_libero_ready(environ: Mapping[str, str] | None = None) -> None:
    """One-line error unless hf-libero can be imported without prompting (its config file exists)."""
    environ = os.environ if environ is None else environ
    config_dir = Path(environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")).expanduser()
    if not (config_dir / "config.yaml").is_file():
        raise EvalConfigError(
            f"LIBERO is not set up: {config_dir}/config.yaml is missing; run 'make setup' "
            f"(or set LIBERO_CONFIG_PATH to a folder holding LIBERO's config.yaml)"
        )


def check_libero_tasks(task: str, task_ids: Sequence[int] | None) -> dict[str, list[int]]:
    """The ``{suite: [task ids]}`` lerobot will evaluate, or a one-line error for an unknown suite / id.

    Mirrors lerobot's own selection (comma-separated suites; ``task_ids`` filter every suite),
    without building any environment.
    """
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    names = [s.strip() for s in str(task).split(",") if s.strip()]
    if not names:
        raise EvalConfigError(f"--env.task='{task}': name a LIBERO suite, one of {', '.join(sorted(suites))}")
    selected: dict[str, list[int]] = {}
    for name in names:
        if name not in suites:
            raise EvalConfigError(
                f"unknown LIBERO task suite '{name}' (--env.task): choose from {', '.join(sorted(suites))}"
            )
        total = suites[name]().n_tasks
        ids = list(range(total)) if task_ids is None else sorted({int(t) for t in task_ids})
        bad = [t for t in ids if not 0 <= t < total]
        if bad:
            raise EvalConfigError(
                f"--env.task_ids: task {bad[0]} does not exist in {name} (it has tasks 0..{total - 1})"
            )
        selected[name] = ids
    return selected


def successes_from_info(info: Mapping[str, Any], num_envs: int) -> list[bool]:
    """Per-env ``is_success`` of one vector-env step, read the way lerobot's ``rollout`` reads it.

    >>> import numpy as np
    >>> successes_from_info({"is_success": np.array([False, True])}, 2)
    [False, True]
    >>> successes_from_info({"final_info": [None, {"is_success": True}]}, 2), successes_from_info({}, 2)
    ([False, True], [False, False])
    """
    if "final_info" in info:
        final = info["final_info"]
        if isinstance(final, Mapping):
            flags = final.get("is_success", [False] * num_envs)
            return [bool(v) for v in flags] if hasattr(flags, "__len__") else [bool(flags)] * num_envs
        return [bool(item.get("is_success", False)) if isinstance(item, Mapping) else False for item in final]
    if "is_success" in info:
        flags = info["is_success"]
        return [bool(v) for v in flags] if hasattr(flags, "__len__") else [bool(flags)] * num_envs
    return [False] * num_envs
