"""Benchmark: the recorder's overhead per policy type (tiny Pi0.5, Pi0, SmolVLA; CPU or GPU).

Reproduce:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_policies.py [--policy-types pi05,pi0,smolvla] [--reps 5]
        [--inferences 2] [--batch-size 1] [--depth 4] [--device cpu|cuda] [--threads N]

For each policy type: a tiny random-weight policy built through lerobot's own classes (``--depth`` expert
layers, 4 by default so that "last-2" and "all" differ; SmolVLA alternates self- and cross-attention layers)
runs the same select_action loop as bench/bench_capture.py (its ``measure``: ``--inferences`` model runs of
``n_action_steps`` calls each, configurations interleaved per repetition): no recorder, recorder on the last 2
expert layers, recorder on all of them, into a real Zarr store (uint16, background writer). The table per
policy is bench_capture's: median seconds per model run end to end ("loop") and with the writer drained
between runs ("caller": the recorder's own cost on the inference thread), their ratios to no recorder, the
writer thread's time and MB per stored row. SmolVLA's capture point is an instance-level wrapper of its
attention function that records its softmax with a TorchFunctionMode while a hooked layer runs; Pi0.5 and
Pi0 use forward hooks on the expert's attention modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_capture  # noqa: E402 - measure, print_table, recorder_configs, run_loop, device_sync

TYPES = ("pi05", "pi0", "smolvla")
LABELS = {"pi05": "Pi0.5", "pi0": "Pi0", "smolvla": "SmolVLA"}


def build(kind: str, depth: int, device: str, tmp: Path):
    """(policy, model batch on ``device``) of a tiny ``kind`` policy with ``depth`` expert layers."""
    if kind == "smolvla":
        from attnstore.capture import tiny_smolvla as T

        dims = T.TinySmolDims(depth=depth)
        config = T.tiny_config(dims=dims)
        config.device = device
        policy = T.build_tiny_policy(config, T.write_tiny_vlm(tmp / "vlm", dims), seed=0)
        batch = T.example_model_batch(1)
    else:
        from attnstore.capture import tiny
        from attnstore.capture import tiny_pi0

        module = tiny if kind == "pi05" else tiny_pi0
        dims = tiny.TinyDims(depth=depth)
        config = module.tiny_config(dims=dims)
        config.device = device
        policy = module.build_tiny_policy(config, seed=0, dims=dims)
        batch = module.example_model_batch(1)
    return policy.to(device), batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy-types", default=",".join(TYPES), help="comma-separated (default pi05,pi0,smolvla)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each configuration (default 5)")
    parser.add_argument("--inferences", type=int, default=2, help="model runs per loop (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="envs per batch (default 1)")
    parser.add_argument("--depth", type=int, default=4, help="expert layers of each tiny policy (default 4)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.policy_types.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TYPES]
    if unknown or not kinds:
        parser.error(f"--policy-types: choose from {', '.join(TYPES)}, got {args.policy_types!r}")
    for name in ("reps", "inferences", "batch_size", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import tempfile

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = bench_capture.device_sync(args.device)
    configs = bench_capture.recorder_configs(None)
    where = "CPU" if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})"
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"attnstore-bench-{kind}-") as tmp:
            policy, batch = build(kind, args.depth, args.device, Path(tmp))
            if args.batch_size > 1:
                batch = {k: v.repeat(args.batch_size, *([1] * (v.ndim - 1))) for k, v in batch.items()}
            batch = {k: v.to(args.device) for k, v in batch.items()}
            bench_capture.run_loop(policy, batch, 1, sync=sync)  # warm-up
            result = bench_capture.measure(policy, batch, configs, args.reps, args.inferences, sync)
        print(f"## tiny {LABELS[kind]} ({args.depth} expert layers)")
        print()
        print(
            f"on {where} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores), B={args.batch_size}, "
            f"{args.reps} reps x {args.inferences} model runs x {policy.config.n_action_steps} select_action calls"
        )
        bench_capture.print_table(result, configs, scale=1, unit="s")
        print()
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_policies.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
