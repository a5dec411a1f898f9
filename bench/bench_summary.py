"""Benchmark: the per-layer summaries' CPU cost, per layer-step block and per model run, against the model run.

Reproduce:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_summary.py [--repeats 30] [--batch-size 1]

One process. The tiny Pi0.5 with 6 layers (bench_capture's) runs once with hooks on every expert layer
that keep its real probabilities (B x 8 heads x 50 action tokens x 1018 keys per layer and denoise step);
then, on one thread as the CPU writer thread runs them (``torch.set_num_threads(1)``), interleaved over
``--repeats`` rounds:

* ``current``: :meth:`attnstore.capture.summary.SummaryPlan.expert` (slice sums, the log
  :func:`~attnstore.capture.summary.cpu_log` chose on this CPU, two product-sums, one mean);
* ``previous``: the formulation it replaced, kept here for the side-by-side figure: the region masses and
  the valid mass as one matmul with a (K, R + 1) one-hot, a clamp and torch's log;
* ``current with <other>'s log``: the current one with the log cpu_log did not choose (numpy's or torch's;
  torch's is what runs on CUDA);
* ``quantise``: the held path's uint16 quantisation of one block, for scale (per model run: every layer,
  as ``--attention.layers=all`` stores them).

Reported: median ms per block, ms per model run (every hooked layer x denoise step: what the writer thread
spends on the summaries of one model run), and that as a share of the model run itself (median wall time of
the policy's ``predict_action_chunk`` on all its torch threads, measured in the same process) and of its CPU
time (``time.process_time``: every thread). The current path's summaries are checked against the previous
one's (equal to float32 rounding) before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_capture  # noqa: E402  (its tiny policy, batch and fixed-malloc re-exec)


def previous_expert(plan, onehot, p, valid):
    """The formulation before 2026-12-02: one (K, R + 1) matmul for the region masses and the valid mass, a
    clamp and torch's log, the validity multiplied in, one product-sum (same float32 definitions)."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    weights = torch.cat([onehot.expand(valid.shape[0], -1, -1), valid[..., None]], dim=-1)
    lead = [1] * (p.ndim - 3)
    both = p @ weights.reshape(valid.shape[0], *lead, *weights.shape[1:])
    mass, s = both[..., :-1], both[..., -1]
    logp = torch.clamp_min(p, tiny).log_().mul_(valid.reshape(valid.shape[0], *lead, 1, -1))
    plogp = torch.einsum("...k,...k->...", p, logp)
    safe = s.clamp_min(tiny)
    ent = torch.where(s > 0, safe.log() - plogp / safe, torch.zeros_like(s))
    mean = p.mean(dim=(-3, -2))
    grid = mean.index_select(-1, plan.camera_keys)
    return mass, ent, grid.reshape(*mean.shape[:-1], plan.num_cameras, plan.layout.grid_rows, plan.layout.grid_cols)


def capture_blocks(policy, batch):
    """Every expert layer's probabilities of one model run, as the held path's hooks see them, with the
    batch's token layout and language mask: ([tensor (B, H, Q, K)], layout, mask)."""
    from attnstore.capture.policies import adapter_for

    adapter = adapter_for(policy)
    blocks = []

    def hook(module, args, kwargs, output):
        blocks.append(output[1].detach().clone())

    handles = [adapter.register_expert_hook(i, hook) for i in range(len(adapter.expert_layers()))]
    try:
        policy.reset()
        policy.select_action(batch)
    finally:
        for h in handles:
            h.remove()
    return blocks, adapter.token_layout(batch), adapter.language(batch)[1]


def model_run_seconds(policy, batch, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of one ``predict_action_chunk`` (a full model run)."""
    import torch

    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            policy.predict_action_chunk(batch)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--batch-size", type=int, default=1, help="envs per model run (default 1)")
    parser.add_argument("--malloc", choices=("fixed", "glibc"), default="fixed",
                        help="fixed: re-execute with bench_capture's fixed malloc thresholds (default)")
    args = parser.parse_args(argv)
    if args.malloc == "fixed" and os.environ.get("GLIBC_TUNABLES") != bench_capture.FIXED_MALLOC:
        os.environ["GLIBC_TUNABLES"] = bench_capture.FIXED_MALLOC
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch

    from attnstore.capture import summary as summ
    from attnstore.capture.buffers import quantise_into
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config

    dims = TinyDims(depth=6)
    config = tiny_config(dims=dims)
    config.device, config.dtype = "cpu", "float32"
    policy = build_tiny_policy(config, seed=0, dims=dims)
    batch = bench_capture.make_batch(args.batch_size)
    threads = args.model_threads = torch.get_num_threads()
    model_run_seconds(policy, batch, 2)  # warm-up
    wall, cpu = model_run_seconds(policy, batch, max(args.repeats // 3, 5))
    blocks, layout, mask = capture_blocks(policy, batch)

    torch.set_num_threads(1)  # as the writer thread runs them (restored at the end: main() may run in a test)
    try:
        return _time_variants(args, summ, quantise_into, blocks, layout, mask, wall, cpu)
    finally:
        torch.set_num_threads(threads)


def _time_variants(args, summ, quantise_into, blocks, layout, mask, wall: float, cpu: float) -> int:
    import torch

    plan = summ.SummaryPlan(layout, "cpu")
    valid = plan.key_valid(mask)
    onehot = torch.zeros(layout.num_keys, len(layout.regions))
    for j, name in enumerate(layout.regions):
        onehot[layout.region_slice(name), j] = 1.0
    block = blocks[len(blocks) // 2]
    for got, want in zip(plan.expert(block, valid), previous_expert(plan, onehot, block, valid)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    dest, scratch = torch.empty(block.shape, dtype=torch.uint16), torch.empty(block.shape)

    chosen = summ.cpu_log()
    logs = {summ._log_tiny_numpy: "numpy", summ._log_tiny_torch: "torch"}

    def other_log():
        summ._CPU_LOG[0] = other
        try:
            plan.expert(block, valid)
        finally:
            summ._CPU_LOG[0] = chosen

    other = next(f for f in logs if f is not chosen)
    variants = {
        f"current ({logs[chosen]} log, chosen)": lambda: plan.expert(block, valid),
        "previous": lambda: previous_expert(plan, onehot, block, valid),
        f"current with {logs[other]}'s log": other_log,
        "quantise (held path)": lambda: quantise_into(dest, block, scratch),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    n = len(blocks)
    print(f"tiny Pi0.5 (6 layers), B={args.batch_size}: {n} blocks per model run ({tuple(block.shape)} float32 each); "
          f"model run {wall * 1e3:.1f} ms wall on {args.model_threads} torch threads, {cpu * 1e3:.1f} ms CPU; "
          f"summaries on 1 thread, {args.repeats} interleaved rounds, medians")
    print()
    print("| variant | ms per block | ms per model run | % of the model run's wall | % of its CPU | vs current |")
    print("|---|---|---|---|---|---|")
    cur = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
        per = statistics.median(ts)
        print(f"| {name} | {per * 1e3:.3f} | {per * n * 1e3:.1f} | {100 * per * n / wall:.1f} | "
              f"{100 * per * n / cpu:.1f} | {per / cur:.2f}x |")
    print()
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_summary.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
