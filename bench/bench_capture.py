"""Benchmark: select_action loop time with the AttentionRecorder vs without (tiny Pi0.5, CPU).

Reproduce:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py [--reps 8] [--inferences 3] [--batch-size 1[,10]] [--threads N]

One process, one policy. Each repetition runs the same select_action loop (``--inferences`` model
runs, ``n_action_steps`` calls each, the LIBERO rollout pattern) once per configuration, in rotating
order so that machine noise hits all of them alike: no recorder, recorder on the last 2 expert
layers without and with the per-layer summaries of every layer, recorder on all layers. Recording
writes to a real Zarr store in a temporary directory (portable uint16 encoding, background writer
thread). Reported: median seconds per model run end to end, until the loop's rows are written (writer
encoding concurrently on the same cores, the final flush timed), the same with the writer drained
between runs (the recorder's cost on the caller's thread), ratios to no recorder, the seconds the
recorder's own code ran on the caller's thread per model run (its hooks, start and end of the run, hand-over
included: :func:`time_own_code`) and as a share of 'off', the writer thread's
time per row and its throughput (GB/s of raw float32), the deepest its queue got, how long the loop
waited for it, MB per row on disk, and peak host RSS (and on CUDA peak device memory) per configuration.
``--writer-nice N`` runs the writers with ``AttentionWriter(nice=N)`` (their encoding yields the CPU to
the policy; one value per run, since zarr's threads keep it). ``--batch-size 1,10`` measures each B in
turn (one table per B).

Full size on a GPU (``--full-size``): a random-weight Pi0.5 at lerobot 0.6.1's PI05Config defaults
(PaliGemma gemma_2b + expert gemma_300m, 18 layers each, SigLIP 224/14) with LIBERO's features, on
``--device`` in ``--dtype`` (default bfloat16), timed with ``torch.cuda.synchronize()``; the table is in
ms per model run. On a machine that has torch but not lerobot (wheels built elsewhere into wheelhouse/):
    python -m venv --system-site-packages .gpu   # reuses the machine's torch
    .gpu/bin/pip install --no-index --find-links wheelhouse wheelhouse/*.whl
    PYTHONPATH=src HF_HUB_OFFLINE=1 .gpu/bin/python bench/bench_capture.py --full-size --device cuda --reps 5
(On CUDA the weights are created on the GPU; a CPU build takes ~2 min and 19 GB RSS on 2 cores. All 18 layers
hand the writer thread ~290 MB of float32 per model run to encode.)
A CPU smoke run of the same path with 2 layers instead of 18:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py --full-size --device cpu --dtype float32 --depth 2 \
        --reps 1 --inferences 1 --layers-only last-2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL_DEPTH = 18  # lerobot 0.6.1's gemma_2b / gemma_300m depth
# --layers-only key -> [(display name, recorder layers, summaries of every layer)]
LAYER_CONFIGS = {
    "last-2": [("last-2 no summary", "last:2", False), ("last-2 layers", "last:2", True)],
    "all": [("all layers", "all", True)],
}


def make_batch(batch_size: int, device: str = "cpu"):
    """A LIBERO-shaped observation as the preprocessor hands it to select_action (on the policy's device)."""
    from attnstore.capture.tiny import example_model_batch

    return {k: v.to(device) for k, v in example_model_batch(batch_size).items()}


def device_sync(device: str):
    """A no-argument function that waits for queued device work (a no-op on CPU).

    >>> device_sync("cpu")() is None
    True
    """
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


# wall: end to end; cpu: the loop thread's CPU time (with --threads 1 torch computes there: the inference and
# the recorder's own cost, not the writer's); process: CPU time of every thread (inference, recorder and writer
# thread: the total compute a configuration costs, immune to other jobs on a shared machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time, "process": time.process_time}
# --malloc fixed: glibc's malloc with fixed thresholds (allocations under 32 MiB from the heap, never trimmed).
# With glibc's default (a dynamic mmap threshold) the tiny model's own activations are mmapped and page-faulted
# on every model run (~131k minor faults, ~0.3 s of system time of ~0.68 s per run on this machine), and
# whatever a configuration allocates moves the threshold for the configurations that follow it in the same
# process: the ratios then measure the allocator, not the capture.
FIXED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def run_loop(policy, batch, inferences: int, writer=None, sync=lambda: None, clock=time.perf_counter,
             written=None) -> list[float]:
    """Seconds per model run of a select_action loop (the queue-served calls are included).

    With ``writer`` given, the writer is drained between model runs outside the timed part, which
    isolates the recorder's own cost on the caller's thread from the writer thread's encoding. With
    ``written`` (a writer) given instead, one figure: the loop's time until that writer has written its
    rows (the loop plus the final flush), per model run: the encoding a writer leaves for after the loop
    (more of it when it yields the CPU, ``--writer-nice``) is counted, not pushed into the next loop.
    ``sync`` waits for the device (``torch.cuda.synchronize``) at both ends of each timed run.
    ``clock``: wall time (default) or the calling thread's CPU time (``--clock cpu``, with ``--threads 1``
    so that torch computes on this thread: immune to other jobs on a shared machine, blind to the writer).
    """
    policy.reset()
    n = policy.config.n_action_steps
    times = []
    for _ in range(inferences):
        if writer is not None:
            writer.flush()
        sync()
        start = clock()
        for _ in range(n):
            policy.select_action(batch)
        sync()
        times.append(clock() - start)
    if written is not None:
        start = clock()
        written.flush()
        return [(sum(times) + clock() - start) / len(times)]
    return times


@contextlib.contextmanager
def gemma_depth(depth: int | None):
    """lerobot's full-size gemma configs with ``depth`` layers (VLM and expert) while open; None: unchanged.

    Only for smoke runs of the full-size path on a small machine: widths, heads and SigLIP stay full size.
    """
    from lerobot.policies.pi05 import modeling_pi05

    original = modeling_pi05.get_gemma_config
    if depth is None or depth == FULL_DEPTH:
        yield
        return

    def get_gemma_config(variant: str):
        config = original(variant)
        config.depth = depth
        return config

    modeling_pi05.get_gemma_config = get_gemma_config
    try:
        yield
    finally:
        modeling_pi05.get_gemma_config = original


def build_full_size_policy(device: str, dtype: str, *, depth: int | None = None, seed: int = 0):
    """A random-weight full-size ``PI05Policy`` (lerobot's PI05Config defaults) with LIBERO's features.

    The features (2 cameras + 1 empty, state 8, action 7, n_action_steps 10, 224 px) come from
    ``tiny_config``; the model is built by lerobot unpatched (``depth`` aside). On CUDA the weights
    are created on the device directly (seconds instead of a CPU init of 4 B parameters); should
    that fail, it builds on the CPU and moves the model, as lerobot does.
    """
    import torch
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    from attnstore.capture.tiny import tiny_config

    config = tiny_config()
    config.device, config.dtype = device, dtype
    torch.manual_seed(seed)
    with gemma_depth(depth):
        if device.startswith("cuda"):
            try:
                with torch.device(device):
                    return PI05Policy(config).eval()
            except Exception as exc:  # noqa: BLE001 - fall back to lerobot's own CPU build
                print(f"building on {device} failed ({type(exc).__name__}: {exc}); building on CPU", file=sys.stderr)
                torch.cuda.empty_cache()
        return PI05Policy(config).eval()


def host_rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB (Linux /proc; (0, 0) elsewhere).

    >>> now, peak = host_rss_gib(); peak >= now >= 0
    True
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def measure(policy, batch, configs: dict, reps: int, inferences: int, sync, clock=time.perf_counter,
            nice: int | None = None) -> dict:
    """Interleaved select_action loops per recorder configuration, into a real store per configuration.

    Returns per configuration: ``loop`` and ``caller`` (median seconds per model run, one per rep),
    ``busy`` (writer seconds per row), ``sizes`` (MB on disk per row), ``writer`` (GB/s of raw float32,
    deepest queue, seconds the loop waited), ``memory`` (host RSS after its loops and, on CUDA, peak
    device memory during them, GiB). ``nice``: the writers' ``nice`` (their encoding yields to the policy).
    """
    from attnstore.capture import AttentionRecorder
    from attnstore.store.writer import AttentionWriter, directory_bytes

    names = list(configs)
    cuda = next(policy.parameters()).is_cuda
    # per rep and configuration: median seconds per model run (loop, caller)
    loop: dict[str, list[float]] = {name: [] for name in configs}
    caller: dict[str, list[float]] = {name: [] for name in configs}
    busy: dict[str, list[float]] = {name: [] for name in configs}
    sizes: dict[str, float] = {}
    writer_stats: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, float]] = {name: {"host": 0.0, "device": 0.0} for name in configs}
    own_runs: dict[str, list[float]] = {name: [0.0, 0] for name in configs}  # own seconds, model runs
    own_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="attnstore-bench-") as tmp:
        writers = {
            name: AttentionWriter(Path(tmp) / f"{name.replace(' ', '_')}.zarr", nice=nice)
            for name in names if configs[name]
        }
        recorders = {
            name: AttentionRecorder(policy, w, layers=configs[name][0], summary=configs[name][1])
            for name, w in writers.items()
        }
        own = {name: time_own_code(rec) for name, rec in recorders.items()}  # before attach: hooks wrapped too
        for rec in recorders.values():  # the first inference creates the store: not timed
            with rec:
                policy.reset()
                policy.select_action(batch)
        for w in writers.values():  # else the first timed loop competes with that encoding
            w.flush()
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                rec = recorders.get(name)
                if cuda:
                    import torch

                    torch.cuda.reset_peak_memory_stats()
                with rec if rec is not None else contextlib.nullcontext():
                    w = writers.get(name)
                    loop[name].append(statistics.median(run_loop(policy, batch, inferences, sync=sync, clock=clock,
                                                                 written=w)))
                    spent, runs = (own[name][0], rec.inferences) if rec is not None else (0.0, 0)
                    caller[name].append(
                        statistics.median(run_loop(policy, batch, inferences, writer=w, sync=sync, clock=clock))
                    )
                    if rec is not None:  # own code timed in the caller loops (no encoding alongside) only
                        own_runs[name][0] += own[name][0] - spent
                        own_runs[name][1] += rec.inferences - runs
                mem = memory[name]
                mem["host"] = max(mem["host"], host_rss_gib()[0])
                if cuda:
                    mem["device"] = max(mem["device"], torch.cuda.max_memory_allocated() / 2**30)
        for name in recorders:
            own_s[name] = own_runs[name][0] / max(own_runs[name][1], 1)
        for name, w in writers.items():
            stats = w.close()
            busy[name].append(stats.busy_seconds / max(stats.rows, 1))
            sizes[name] = directory_bytes(w.path) / 1e6 / max(stats.rows, 1)
            writer_stats[name] = {"gb_s": stats.attention_mb_per_s / 1e3, "queue": stats.max_queue_depth,
                                  "queue_size": stats.queue_size, "waited": stats.wait_seconds}
    return {"loop": loop, "caller": caller, "busy": busy, "sizes": sizes, "writer": writer_stats, "memory": memory,
            "own": own_s}


def time_own_code(rec) -> list[float]:
    """Wrap a recorder (before it attaches) so that the seconds its own code runs on the caller's thread
    add up in the returned one-element list: its hooks, the start (``_begin``) and the end (``_finish``,
    hand-over to the writer included) of every model run. Unlike a ratio of two loop timings this is not
    drowned by the machine's noise; on CUDA it is the host side (launches), which is the caller's cost.

    >>> class Rec:
    ...     def _begin(self, batch): return batch
    ...     def _finish(self, run, actions): return None
    ...     def _make_expert_hook(self, *slots): return lambda *a: sum(slots)
    ...     def _make_prefix_hook(self, *slots): return lambda *a: None
    >>> rec = Rec(); spent = time_own_code(rec)
    >>> rec._begin(1), rec._make_expert_hook(1, 2)("module"), spent[0] > 0
    (1, 3, True)
    """
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    def timed_factory(make):
        return lambda *slots: timed(make(*slots))

    rec._begin, rec._finish = timed(rec._begin), timed(rec._finish)
    rec._make_expert_hook = timed_factory(rec._make_expert_hook)
    rec._make_prefix_hook = timed_factory(rec._make_prefix_hook)
    return spent


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over reps of (this configuration / off) within the same rep.

    >>> paired_ratio({"off": [1.0, 2.0, 4.0], "on": [1.5, 2.5, 6.0]}, "on")
    1.5
    """
    return statistics.median(t / o for t, o in zip(times[name], times["off"]))


def print_table(result: dict, configs: dict, scale: float, unit: str) -> None:
    """The table: per configuration median loop and caller time per model run, ratios, writer cost, size."""
    loop, caller, busy, sizes = result["loop"], result["caller"], result["busy"], result["sizes"]
    writer, memory = result.get("writer", {}), result.get("memory", {})
    device = any(m.get("device") for m in memory.values())
    digits = 4 if scale == 1 else 1
    heads = (
        "configuration",
        f"loop {unit}/run",
        "ratio",
        f"caller {unit}/run",
        "ratio",
        "own ms/run",
        "own %",
        f"writer {unit}/row",
        "writer GB/s",
        "queue",
        "waited s",
        "MB/row",
        "host GiB",
        *(("device GiB",) if device else ()),
    )
    # widths of the seconds table, widened where a header would touch its neighbour
    widths = [max(w, len(h) + 1) for w, h in zip((19, 11, 7, 13, 7, 11, 7, 13, 12, 7, 9, 8, 9, 11), heads)]
    print(f"{heads[0]:<{widths[0]}}" + "".join(f"{h:>{w}}" for h, w in zip(heads[1:], widths[1:])))
    for name in configs:
        lm, cm = statistics.median(loop[name]) * scale, statistics.median(caller[name]) * scale
        wb = f"{statistics.median(busy[name]) * scale:.{digits}f}" if busy[name] else "-"
        size = f"{sizes[name]:.2f}" if name in sizes else "-"
        ws = writer.get(name)
        mem = memory.get(name, {})
        cells = (
            f"{lm:.{digits}f}",
            f"{paired_ratio(loop, name):.3f}",
            f"{cm:.{digits}f}",
            f"{paired_ratio(caller, name):.3f}",
            f"{result['own'][name] * 1e3:.2f}" if name in result.get("own", {}) else "-",
            f"{100 * result['own'][name] / statistics.median(caller['off']):.1f}" if name in result.get("own", {}) else "-",
            wb,
            f"{ws['gb_s']:.2f}" if ws else "-",
            f"{ws['queue']}/{ws['queue_size']}" if ws else "-",
            f"{ws['waited']:.1f}" if ws else "-",
            size,
            f"{mem.get('host', 0):.1f}",
            *((f"{mem.get('device', 0):.1f}",) if device else ()),
        )
        print(f"{name:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:])))
    print(
        "loop: end to end until the loop's rows are written (writer thread encoding concurrently); caller: writer drained between runs "
        "(the recorder's cost on the caller's thread); ratio: median over reps of the ratio to 'off' in the same rep; "
        "own: the recorder's code on the caller's thread per model run in the caller loops (hooks, start, end, hand-over), "
        "% of off's caller time; "
        "writer: its thread's encode+write time per stored row and GB/s of raw float32; queue: deepest / size; "
        "waited: seconds the loop was blocked on a full queue; host: RSS after the loops; device: peak allocated"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="repetitions of each configuration (default 8)")
    parser.add_argument("--inferences", type=int, default=3, help="model runs per loop (default 3)")
    parser.add_argument("--batch-size", type=_batch_sizes, default=(1,),
                        help="envs per batch, or several comma-separated (1,10: one table each; default 1)")
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="layers of the VLM and expert (default 6 for the tiny model, 18 with --full-size; "
        "less than 18 with --full-size only for a smoke run)",
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="random-weight full-size Pi0.5 (PI05Config defaults) instead of the tiny one; table in ms",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:N]")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="PI05Config.dtype (default: float32 for the tiny model, bfloat16 with --full-size)",
    )
    parser.add_argument(
        "--layers-only",
        choices=tuple(LAYER_CONFIGS),
        default=None,
        help="measure 'off' and only this recorder configuration (default: both last-2 and all)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="instead: check compile_model=True with the recorder (first-call time, recompiles, actions vs eager)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--writer-nice", type=int, default=None,
                        help="AttentionWriter(nice=N): the writer's encoding threads yield the CPU to the policy "
                             "(0..19; default: not set). One value per run: zarr's threads keep it")
    parser.add_argument("--malloc", choices=("fixed", "glibc"), default="fixed",
                        help="fixed (default, Linux, when run as a script: the process re-executes itself with "
                             "fixed glibc malloc thresholds, see FIXED_MALLOC) or glibc (its dynamic default)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default); cpu: the loop thread's CPU time (use with --threads 1 on a shared "
                             "machine; the writer thread's work is then not in 'loop'); process: CPU time of all "
                             "threads (the writer's included: what a configuration costs in total)")
    args = parser.parse_args(argv)
    if argv is None and args.malloc == "fixed" and sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": FIXED_MALLOC})
    for name in ("reps", "inferences", "depth"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(b < 1 for b in args.batch_size):
        parser.error(f"--batch-size must be >= 1, got {','.join(map(str, args.batch_size))}")
    if args.compile and (args.full_size or args.device != "cpu" or args.dtype or args.layers_only):
        parser.error("--compile checks the tiny model on CPU only; drop --full-size/--device/--dtype/--layers-only")
    if args.full_size and args.depth is not None and args.depth > FULL_DEPTH:
        parser.error(f"--depth with --full-size is at most {FULL_DEPTH} (lerobot's depth), got {args.depth}")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        return check_compiled(args)
    if args.full_size:
        return bench_full_size(args)

    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config

    # 6 layers (not the tiny default 2) so that "all layers" differs from "last-2"
    depth = args.depth or 6
    dims = TinyDims(depth=depth)
    config = tiny_config(dims=dims)
    config.device, config.dtype = args.device, args.dtype or "float32"
    policy = build_tiny_policy(config, seed=0, dims=dims)
    sync = device_sync(args.device)
    configs = recorder_configs(args.layers_only)
    where = "CPU" if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})"
    for b in args.batch_size:
        batch = make_batch(b, args.device)
        run_loop(policy, batch, 2, sync=sync)  # warm-up (first calls allocate and tune kernels)
        result = measure(policy, batch, configs, args.reps, args.inferences, sync, clock=CLOCKS[args.clock],
                         nice=args.writer_nice)
        print(
            f"tiny Pi0.5 ({depth} layers) on {where} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores), "
            f"B={b}, {args.reps} reps x {args.inferences} model runs x "
            f"{policy.config.n_action_steps} select_action calls, configurations interleaved, {args.clock} clock, "
            f"malloc {'fixed' if os.environ.get('GLIBC_TUNABLES') == FIXED_MALLOC else 'glibc default'}, "
            f"writer nice {args.writer_nice if args.writer_nice is not None else 'not set'}"
        )
        print_table(result, configs, scale=1, unit="s")
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_capture.py " + " ".join(sys.argv[1:]))
    return 0


def recorder_configs(only: str | None) -> dict[str, tuple[str, bool] | None]:
    """Display name -> (recorder ``layers`` selection, summaries on) (None: no recorder), 'off' first.

    >>> recorder_configs("all")
    {'off': None, 'all layers': ('all', True)}
    >>> list(recorder_configs(None))
    ['off', 'last-2 no summary', 'last-2 layers', 'all layers']
    """
    chosen = [only] if only else list(LAYER_CONFIGS)
    return {"off": None, **{name: (layers, summary) for k in chosen for name, layers, summary in LAYER_CONFIGS[k]}}


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-size``: one int or several comma-separated.

    >>> _batch_sizes("1,10"), _batch_sizes("2")
    ((1, 10), (2,))
    """
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ints like 1 or 1,10, got {text!r}") from None


def bench_full_size(args) -> int:
    """--full-size: the same measurement on a full-size random Pi0.5, in ms per model run."""
    import torch

    dtype = args.dtype or "bfloat16"
    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    policy = build_full_size_policy(args.device, dtype, depth=args.depth)
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in policy.parameters())
    depth = len(policy.model.paligemma_with_expert.gemma_expert.model.layers)
    sync = device_sync(args.device)
    configs = recorder_configs(args.layers_only)
    if cuda:
        name = torch.cuda.get_device_name(args.device)
        where = f"{name} ({args.device}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        where = f"CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores, torch {torch.__version__})"
    for b in args.batch_size:
        batch = make_batch(b, args.device)
        started = time.perf_counter()
        run_loop(policy, batch, 2, sync=sync)  # warm-up (first calls allocate and tune kernels)
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        result = measure(policy, batch, configs, args.reps, args.inferences, sync, clock=CLOCKS[args.clock],
                         nice=args.writer_nice)
        measure_s = time.perf_counter() - started
        print(
            f"full-size Pi0.5 ({depth} layers{'' if depth == FULL_DEPTH else ', REDUCED: smoke run'}, "
            f"{params / 1e9:.2f} B parameters, {dtype}, random weights) on {where}, B={b}, "
            f"{args.reps} reps x {args.inferences} model runs x {policy.config.n_action_steps} select_action calls, "
            "configurations interleaved"
        )
        print_table(result, configs, scale=1000, unit="ms")
        print(f"build {build_s:.1f} s, warm-up (2 model runs) {warmup_s:.1f} s, measurement {measure_s:.1f} s, "
              f"host peak RSS {host_rss_gib()[1]:.1f} GiB", flush=True)
    print("command: " + reproduce_command(sys.argv))
    return 0


def reproduce_command(argv: list[str], python: str | None = None, env: dict | None = None) -> str:
    """The shell command that reruns this process: its interpreter, script and arguments, with the env it needs.

    >>> reproduce_command(["bench/bench_capture.py", "--full-size", "--device", "cuda"], "/x/.gpu/bin/python", {})
    'HF_HUB_OFFLINE=1 /x/.gpu/bin/python bench/bench_capture.py --full-size --device cuda'
    >>> reproduce_command(["b.py"], "py", {"PYTHONPATH": "src"})
    'HF_HUB_OFFLINE=1 PYTHONPATH=src py b.py'
    """
    python = python or sys.executable
    env = os.environ if env is None else env
    if os.path.isabs(python) and Path(python).is_relative_to(Path.cwd()):
        python = os.path.relpath(python)
    prefix = ["HF_HUB_OFFLINE=1"] + ([f"PYTHONPATH={env['PYTHONPATH']}"] if env.get("PYTHONPATH") else [])
    return " ".join([*prefix, shlex.join([python, *argv])])


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
    batch = make_batch(args.batch_size[0])
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
    print(f"compile_model=True (mode default), tiny Pi0.5, CPU, B={args.batch_size[0]}, recorder on all layers")
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
