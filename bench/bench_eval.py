"""Benchmark: a LIBERO evaluation with attention capture on vs off, and bytes per episode vs legacy .pt.

Runs the same evaluation (libero_object task 0, tiny Pi0.5, same seed) as plain lerobot-eval
(only the tiny-model patches, no recorder) and as ``attnstore eval``, interleaved off/on, each in
its own process, and reports medians of lerobot's own loop time (eval_info.json ``eval_s``: resets,
env steps, policy, videos) and of the process wall time. Then it exports the last store to the
legacy ``.pt`` layout (float32 and bfloat16, once per inference and once per env step as the old
workflow stored it) and compares sizes per episode.

Reproduce (about 5 min on 2 CPU cores):
    .venv/bin/python bench/bench_eval.py --repeats 2 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# plain lerobot-eval on the tiny checkpoint: lerobot's own main(), only the tiny-model patches applied
PLAIN_LEROBOT_EVAL = """
import sys
from attnstore.evaluation.libero_env import apply_runtime_defaults
apply_runtime_defaults(tiny_policy=True)
from attnstore.capture.tiny import tiny_model_patches
from lerobot.scripts import lerobot_eval
policy_dir = sys.argv[1]
make_policy = lerobot_eval.make_policy
def make_tiny(*args, **kwargs):
    with tiny_model_patches(policy_dir):
        return make_policy(*args, **kwargs)
lerobot_eval.make_policy = make_tiny
sys.argv = ["lerobot-eval", *sys.argv[2:]]
lerobot_eval.main()
"""


def eval_args(policy: Path, out: Path, steps: int, episodes: int, seed: int) -> list[str]:
    return [
        f"--policy.path={policy}",
        "--env.type=libero",
        "--env.task=libero_object",
        "--env.task_ids=[0]",
        f"--eval.n_episodes={episodes}",
        "--eval.batch_size=1",
        f"--env.episode_length={steps}",
        f"--seed={seed}",
        f"--output_dir={out}",
    ]


def run_once(capture: bool, policy: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    common = eval_args(policy, out, args.steps, args.episodes, args.seed)
    if capture:
        cmd = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval", *common]
    else:
        cmd = [sys.executable, "-c", PLAIN_LEROBOT_EVAL, str(policy), *common]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_eval: {'attnstore eval' if capture else 'lerobot-eval'} failed:\n{proc.stderr[-3000:]}")
    info = json.loads((out / "eval_info.json").read_text())
    return {"eval_s": float(info["overall"]["eval_s"]), "wall_s": wall}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (interleaved off/on)")
    parser.add_argument("--steps", type=int, default=280, help="env steps per episode (--env.episode_length; 280 = a full libero_object episode)")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--policy", type=Path, default=None, help="tiny checkpoint (default: build one in a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnstore.capture.tiny import make_tiny_policy

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp_path = Path(tmp)
        policy = args.policy or make_tiny_policy(tmp_path / "tiny_pi05")
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        last_store = None
        for i in range(args.repeats):
            for capture in (False, True):
                out = tmp_path / f"{'on' if capture else 'off'}_{i}"
                results[capture].append(run_once(capture, policy, out, args))
                if capture:
                    last_store = out / "attention.zarr"
                print(f"  run {i} capture={'on ' if capture else 'off'}: {results[capture][-1]}", flush=True)

        def median(capture: bool, key: str) -> float:
            return statistics.median(r[key] for r in results[capture])

        print()
        print(f"LIBERO libero_object task 0, tiny Pi0.5, B=1, {args.episodes} episode(s) x {args.steps} env steps, "
              f"seed {args.seed}; medians of {args.repeats} interleaved runs")
        print(f"{'metric':<34}{'capture off':>14}{'capture on':>14}{'ratio':>9}")
        for key, label in (("eval_s", "lerobot eval loop (eval_s) [s]"), ("wall_s", "process wall time [s]")):
            off, on = median(False, key), median(True, key)
            print(f"{label:<34}{off:>14.1f}{on:>14.1f}{on / off:>9.2f}x")

        from attnstore.store.open import open_attention
        from attnstore.legacy.export_pt import export_pt

        ds = open_attention(last_store)
        n_episodes = len(set(ds["episode"].values.tolist()))
        n_inferences = ds.sizes["inference"]
        store_bytes = dir_bytes(last_store)
        attention_bytes = dir_bytes(last_store / "attention")
        rows = [
            ("attnstore store, all variables", store_bytes),
            ("attnstore store, attention array only", attention_bytes),
        ]
        for dtype in ("float32", "bfloat16"):
            for every in (False, True):
                files = export_pt(last_store, tmp_path / f"pt_{dtype}_{every}", dtype=dtype,
                                  every_env_step=every, progress=False)
                label = f"legacy .pt {dtype}, {'per env step' if every else 'per inference'}"
                rows.append((label, sum(f.stat().st_size for f in files)))
        print()
        print(f"bytes per episode ({n_inferences // n_episodes} inferences, 10 denoise x 2 layers x 8 heads x 50 x 1018)")
        print(f"{'format':<44}{'MB / episode':>14}{'vs store':>10}")
        for label, size in rows:
            per_episode = size / n_episodes
            print(f"{label:<44}{per_episode / 1e6:>14.2f}{size / store_bytes:>9.2f}x")
        print()
        print("reproduce: .venv/bin/python bench/bench_eval.py "
              f"--repeats {args.repeats} --steps {args.steps} --episodes {args.episodes} --seed {args.seed}")


if __name__ == "__main__":
    main()
