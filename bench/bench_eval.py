"""Benchmark: a LIBERO evaluation with attention capture on vs off, and bytes per episode vs legacy .pt.

Runs the same evaluation (libero_object task 0, tiny Pi0.5, same seed) as plain lerobot-eval
(only the tiny-model patches, no recorder) and as ``attnstore eval``, interleaved off/on, each in
its own process, and reports medians of lerobot's own loop time (eval_info.json ``eval_s``: resets,
env steps, policy, videos) and of the process wall time. Then it exports the last store to the
legacy ``.pt`` layout (float32 and bfloat16, once per inference and once per env step as the old
workflow stored it) and compares sizes per episode.

Reproduce (about 5 min on 2 CPU cores):
    .venv/bin/python bench/bench_eval.py --repeats 2 --steps 40
    .venv/bin/python bench/bench_eval.py --repeats 2 --batch-size 2 --episodes 2 --layers all \
        --baseline-src /tmp/attnstore-before/src      # + capture with an earlier attnstore tree, interleaved

``--layers`` is ``--attention.layers`` (the tiny policy has 2 layers: ``all`` = both); ``--batch-size`` is
lerobot's ``--eval.batch_size`` (``--episodes`` per task, a multiple of it). ``--baseline-src DIR`` adds a
third variant, capture on with the attnstore package at ``DIR`` (e.g. ``git archive <commit> src | tar -x``
into a temporary folder), so the previous code and the current one are measured in the same run.
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


def eval_args(policy: Path, out: Path, steps: int, episodes: int, seed: int, batch_size: int = 1) -> list[str]:
    return [
        f"--policy.path={policy}",
        "--env.type=libero",
        "--env.task=libero_object",
        "--env.task_ids=[0]",
        f"--eval.n_episodes={episodes}",
        f"--eval.batch_size={batch_size}",
        f"--env.episode_length={steps}",
        f"--seed={seed}",
        f"--output_dir={out}",
    ]


def run_once(capture: bool, policy: Path, out: Path, args: argparse.Namespace, src: Path | None = None,
             nice: int | None = None) -> dict[str, float]:
    common = eval_args(policy, out, args.steps, args.episodes, args.seed, args.batch_size)
    if capture:
        cmd = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval", *common,
               f"--attention.layers={args.layers}", *([f"--attention.writer_nice={nice}"] if nice is not None else [])]
    else:
        cmd = [sys.executable, "-c", PLAIN_LEROBOT_EVAL, str(policy), *common]
    env = dict(os.environ)
    if src is not None:  # an earlier attnstore tree first on the path (the installed package is editable)
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
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
    parser.add_argument("--batch-size", type=int, default=1, help="--eval.batch_size (default 1)")
    parser.add_argument("--layers", default="last:2", help="--attention.layers (default last:2)")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="an earlier attnstore src/ tree: adds 'capture on (baseline)' to the rotation")
    parser.add_argument("--writer-nice", type=int, default=None,
                        help="adds 'capture on' with --attention.writer_nice=N to the rotation")
    parser.add_argument("--policy", type=Path, default=None, help="tiny checkpoint (default: build one in a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnstore.capture.tiny import make_tiny_policy

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp_path = Path(tmp)
        policy = args.policy or make_tiny_policy(tmp_path / "tiny_pi05")
        variants = ["off", "on"] + (["baseline"] if args.baseline_src else []) + (["nice"] if args.writer_nice is not None else [])
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        last_store = None
        for i in range(args.repeats):
            for v in variants[i % len(variants):] + variants[: i % len(variants)]:
                out = tmp_path / f"{v}_{i}"
                src = args.baseline_src if v == "baseline" else None
                results[v].append(run_once(v != "off", policy, out, args, src, args.writer_nice if v == "nice" else None))
                if v == "on":
                    last_store = out / "attention.zarr"
                print(f"  run {i} capture {v}: {results[v][-1]}", flush=True)

        def median(v: str, key: str) -> float:
            return statistics.median(r[key] for r in results[v])

        def ratio(v: str, key: str) -> float:  # paired: each repeat against its own 'off'
            return statistics.median(r[key] / o[key] for r, o in zip(results[v], results["off"]))

        print()
        print(f"LIBERO libero_object task 0, tiny Pi0.5, B={args.batch_size}, {args.episodes} episode(s) x "
              f"{args.steps} env steps, --attention.layers={args.layers}, seed {args.seed}; medians of "
              f"{args.repeats} interleaved runs, ratios paired per repeat")
        labels = {"off": "capture off", "on": "capture on", "baseline": "on (baseline)", "nice": f"on, nice {args.writer_nice}"}
        print(f"{'metric':<34}" + "".join(f"{labels[v]:>15}" for v in variants)
              + "".join(f"{'ratio ' + v:>16}" for v in variants[1:]))
        for key, label in (("eval_s", "lerobot eval loop (eval_s) [s]"), ("wall_s", "process wall time [s]")):
            print(f"{label:<34}" + "".join(f"{median(v, key):>15.1f}" for v in variants)
                  + "".join(f"{ratio(v, key):>15.2f}x" for v in variants[1:]))

        from attnstore.store.open import open_attention
        from attnstore.legacy.export_pt import export_pt

        ds = open_attention(last_store)
        n_episodes = len(set(ds["episode"].values.tolist()))
        n_inferences = ds.sizes["inference"]
        store_bytes = dir_bytes(last_store)
        attention_bytes = dir_bytes(last_store / "attention")
        summary_bytes = sum(dir_bytes(d) for d in last_store.glob("summary_*") if d.is_dir())
        rows = [
            ("attnstore store, all variables", store_bytes),
            ("attnstore store, attention array only", attention_bytes),
            ("attnstore store, per-layer summaries only", summary_bytes),
        ]
        for dtype in ("float32", "bfloat16"):
            for every in (False, True):
                files = export_pt(last_store, tmp_path / f"pt_{dtype}_{every}", dtype=dtype,
                                  every_env_step=every, progress=False)
                label = f"legacy .pt {dtype}, {'per env step' if every else 'per inference'}"
                rows.append((label, sum(f.stat().st_size for f in files)))
        print()
        layers = ds.sizes["layer"]
        print(f"bytes per episode ({n_inferences // n_episodes} inferences, 10 denoise x {layers} layers x 8 heads x 50 x 1018; "
              f"summaries: {ds.sizes.get('summary_layer', 0)} layers, {100 * summary_bytes / max(store_bytes - summary_bytes, 1):.1f}% "
              f"of the rest of the store)")
        print(f"{'format':<44}{'MB / episode':>14}{'vs store':>10}")
        for label, size in rows:
            per_episode = size / n_episodes
            print(f"{label:<44}{per_episode / 1e6:>14.2f}{size / store_bytes:>9.2f}x")
        print()
        print("reproduce: .venv/bin/python bench/bench_eval.py "
              f"--repeats {args.repeats} --steps {args.steps} --episodes {args.episodes} --seed {args.seed} "
              f"--batch-size {args.batch_size} --layers {args.layers}"
              + (f" --baseline-src {args.baseline_src}" if args.baseline_src else "")
              + (f" --writer-nice {args.writer_nice}" if args.writer_nice is not None else ""))


if __name__ == "__main__":
    main()
