"""Benchmark: select_action loop time with the AttentionRecorder vs without (tiny Pi0.5, CPU).

Reproduce:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py [--reps 8] [--inferences 3] [--batch-size 1] [--threads N]

One process, one policy. Each repetition runs the same select_action loop (``--inferences`` model
runs, ``n_action_steps`` calls each, the LIBERO rollout pattern) once per configuration, in rotating
order so that machine noise hits all of them alike: no recorder, recorder on the last 2 expert
layers, recorder on all layers. Recording writes to a real Zarr store in a temporary directory (uint16
encoding, background writer thread). Reported: median seconds per model run end to end (writer
encoding concurrently on the same cores), the same with the writer drained between runs (the
recorder's own cost on the caller's thread), ratios to no recorder, and the writer thread's time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_batch(batch_size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch_size, 200, dtype=torch.bool)
    mask[:, :48] = True  # a LIBERO prompt with its state string is ~40-60 tokens
    return {
        "observation.images.image": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.images.image2": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.state": torch.zeros(batch_size, 8),
        "observation.language.tokens": torch.randint(4, 500, (batch_size, 200), generator=g),
        "observation.language.attention_mask": mask,
    }


def run_loop(policy, batch, inferences: int, writer=None) -> list[float]:
    """Seconds per model run of a select_action loop (the queue-served calls are included).

    With ``writer`` given, the writer is drained between model runs outside the timed part, which
    isolates the recorder's own cost on the caller's thread from the writer thread's encoding.
    """
    policy.reset()
    n = policy.config.n_action_steps
    times = []
    for _ in range(inferences):
        if writer is not None:
            writer.flush()
        start = time.perf_counter()
        for _ in range(n):
            policy.select_action(batch)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="repetitions of each configuration (default 8)")
    parser.add_argument("--inferences", type=int, default=3, help="model runs per loop (default 3)")
    parser.add_argument("--batch-size", type=int, default=1, help="envs per batch (default 1)")
    parser.add_argument("--depth", type=int, default=6, help="layers of the tiny VLM and expert (default 6)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="instead: check compile_model=True with the recorder (first-call time, recompiles, actions vs eager)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    from attnstore.capture import AttentionRecorder
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config
    from attnstore.store.writer import AttentionWriter, directory_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        return check_compiled(args)
    # 6 layers (not the tiny default 2) so that "all layers" differs from "last-2"
    dims = TinyDims(depth=args.depth)
    policy = build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)
    batch = make_batch(args.batch_size)
    run_loop(policy, batch, 2)  # warm-up (first calls allocate and tune kernels)

    configs = {"off": None, "last-2 layers": "last:2", "all layers": "all"}
    names = list(configs)
    # per rep and configuration: median seconds per model run (loop, caller)
    loop: dict[str, list[float]] = {name: [] for name in configs}
    caller: dict[str, list[float]] = {name: [] for name in configs}
    busy: dict[str, list[float]] = {name: [] for name in configs}
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="attnstore-bench-") as tmp:
        writers = {
            name: AttentionWriter(Path(tmp) / f"{name.replace(' ', '_')}.zarr") for name in names if configs[name]
        }
        recorders = {name: AttentionRecorder(policy, w, layers=configs[name]) for name, w in writers.items()}
        for rec in recorders.values():  # the first inference creates the store: not timed
            with rec:
                policy.reset()
                policy.select_action(batch)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                rec = recorders.get(name)
                with rec if rec is not None else contextlib.nullcontext():
                    loop[name].append(statistics.median(run_loop(policy, batch, args.inferences)))
                    w = writers.get(name)
                    caller[name].append(statistics.median(run_loop(policy, batch, args.inferences, writer=w)))
        for name, w in writers.items():
            stats = w.close()
            busy[name].append(stats.busy_seconds / max(stats.rows, 1))
            sizes[name] = directory_bytes(w.path) / 1e6 / max(stats.rows, 1)

    def paired_ratio(times: dict[str, list[float]], name: str) -> float:
        """Median over reps of (this configuration / off) within the same rep."""
        return statistics.median(t / o for t, o in zip(times[name], times["off"]))

    print(
        f"tiny Pi0.5 ({args.depth} layers) on CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores), "
        f"B={args.batch_size}, {args.reps} reps x {args.inferences} model runs x "
        f"{policy.config.n_action_steps} select_action calls, configurations interleaved"
    )
    print(
        f"{'configuration':<15}{'loop s/run':>11}{'ratio':>7}{'caller s/run':>13}{'ratio':>7}"
        f"{'writer s/row':>13}{'MB/row':>8}"
    )
    for name in configs:
        lm, cm = statistics.median(loop[name]), statistics.median(caller[name])
        wb = f"{statistics.median(busy[name]):.4f}" if busy[name] else "-"
        size = f"{sizes[name]:.2f}" if name in sizes else "-"
        print(
            f"{name:<15}{lm:>11.4f}{paired_ratio(loop, name):>7.3f}{cm:>13.4f}{paired_ratio(caller, name):>7.3f}"
            f"{wb:>13}{size:>8}"
        )
    print(
        "loop: end to end, writer thread encoding concurrently; caller: writer drained between runs "
        "(the recorder's own cost); ratio: median over reps of the ratio to 'off' in the same rep; "
        "writer: its thread's encode+write time per stored row"
    )
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py " + " ".join(sys.argv[1:]))
    return 0


def check_compiled(args) -> int:
    """compile_model=True + recorder: times per call, dynamo recompiles, actions vs the eager model."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from attnstore.capture import AttentionRecorder
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config
    from attnstore.store.writer import AttentionWriter

    dims = TinyDims(depth=2)
    config = tiny_config(dims=dims)
    config.compile_model, config.compile_mode = True, "default"
    compiled = build_tiny_policy(config, seed=0, dims=dims)
    eager = build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)
    batch = make_batch(args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="attnstore-bench-") as tmp:
        with AttentionWriter(Path(tmp) / "a.zarr") as writer, AttentionRecorder(compiled, writer, layers="all") as rec:
            for i in range(max(args.inferences, 3)):
                torch.manual_seed(i)
                start = time.perf_counter()
                got = compiled.predict_action_chunk(batch)
                seconds = time.perf_counter() - start
                torch.manual_seed(i)
                want = eager.predict_action_chunk(batch)
                rows.append((i, seconds, (got - want).abs().max().item()))
        recorded = rec.inferences
        recompiles_with = sum(dynamo_utils.counters["recompiles"].values())
    plain = []  # the same compiled policy without the recorder (first call recompiles: hooks gone)
    for i in range(4):
        start = time.perf_counter()
        compiled.predict_action_chunk(batch)
        plain.append(time.perf_counter() - start)
    print(f"compile_model=True (mode default), tiny Pi0.5, CPU, B={args.batch_size}, recorder on all layers")
    print(f"{'call':>4}{'seconds':>10}{'max |action - eager|':>22}")
    for i, seconds, diff in rows:
        print(f"{i:>4}{seconds:>10.2f}{diff:>22.2e}")
    counters = dynamo_utils.counters
    print(f"compiled, recorder detached: {' '.join(f'{t:.2f}' for t in plain)} s per call")
    print(
        f"recorded inferences: {recorded}; recompiles while recording: {recompiles_with}; "
        f"graph breaks (at the recorder's disabled hooks): {sum(counters['graph_break'].values())}; "
        f"unique graphs: {counters['stats'].get('unique_graphs', 0)}"
    )
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
