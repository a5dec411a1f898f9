"""Benchmark: the AttentionWriter's throughput, the previous path vs the current one, on 1 and on 2 cores.

Reproduce:
    .venv/bin/python bench/bench_writer.py [--rows 8] [--repeats 3] [--layers 2] [--batch-size 1] [--cores 1,2]

Each core count runs in its own child process pinned to that many cores (``os.sched_setaffinity``, like
``taskset -c 0``), so the figures say what one or two cores can encode. In it, every variant writes the
same ``--rows`` model runs (B = ``--batch-size``, 10 denoise x ``--layers`` layers x 8 heads x 50 x 1018:
32.6 MB of float32 per env at 2 layers) through the real AttentionWriter into a fresh store, back to back
(the writer is the bottleneck, as it would be behind a GPU), in rotating order over ``--repeats`` rounds:

* ``previous``: float32 handed over, the writer thread quantises (``schema.encoding.quantise``), copies the
  kept rows, checks finiteness, zarr compares every chunk with the fill value, blosc single-threaded with
  its automatic block size, every array resized and written one after the other;
* ``current, float32 in``: the same float32 hand-over (the CPU recorder's path) on the current writer:
  no fill-value pass, no row copy when every row is kept, blosc on ``encode_threads`` = the cores;
* ``current, uint16 in``: attention quantised on the device (the recorder's CUDA path): the writer only
  compresses and writes;
* ``uint16 in, blosc automatic blocksize``: the same with blosc's automatic block size (small blocks for
  zstd level 1, as ``previous`` and every store before ``schema.encoding.BLOSC_BLOCKSIZE``) instead of the
  current 1 MiB: a codec parameter the reader never needs (the frames say it); the two differ only in it.
* ``uint16 in, one array at a time``: the same with every array's resize and write as its own round trip
  to zarr's event loop (``previous`` too), instead of ``writer.together``'s concurrent ones.

Reported per variant and core count (medians over rounds): writer MB/s of raw float32 equivalent (float32
bytes / writer-thread busy time), the same per CPU-second of the process (``time.process_time``: every
thread; stable when the machine is shared), MB on disk per row, and the ratio to ``previous``. Data:
tests/synthetic.py's structured attention (masked keys exactly 0, a sink, moving camera bumps), a pool of
4 rows rolled per row so every chunk differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/synthetic.py
POOL = 4
VARIANTS = ("previous", "current, float32 in", "current, uint16 in", "uint16 in, blosc automatic blocksize",
            "uint16 in, one array at a time")


def bench_spec(layers: int):
    from synthetic import make_spec

    return make_spec(layers=tuple(range(18 - layers, 18)), images=False, actions=False, language_tokens=False)


def make_pool(spec, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(POOL, B, D, L, H, Q, K) float32 attention and (B, K) key_valid with real structure."""
    from synthetic import synthetic_attention

    rng = np.random.default_rng(0)
    rows = [synthetic_attention(spec, rng, batch_size, 30, episodes=list(range(batch_size)), env_steps=[10 * i] * batch_size)
            for i in range(POOL)]
    return np.stack([a for a, _ in rows]), rows[0][1]


@contextlib.contextmanager
def variant_settings(name: str, cores: int):
    """The writer knobs and codec of one variant (module settings restored after)."""
    from attnstore import schema
    from attnstore.store import writer as W

    saved_config, saved_codecs, saved_together = W.ARRAY_CONFIG, schema.attention_codecs, W.together
    threads = 1 if name == "previous" else cores
    if name == "previous":
        W.ARRAY_CONFIG = {}
    if name == "previous" or name.endswith("automatic blocksize"):  # blocksize 0: blosc's choice, as before
        schema.attention_codecs = _with_blocksize(saved_codecs, 0)
    if name == "previous" or name.endswith("one array at a time"):  # each resize and write its own round trip
        W.together = _one_at_a_time
    try:
        yield threads
    finally:
        W.ARRAY_CONFIG, schema.attention_codecs, W.together = saved_config, saved_codecs, saved_together


def _one_at_a_time(coroutines) -> None:
    """The writer before ``together``: every array's resize, then every array's write, one after the other."""
    from zarr.core.sync import sync

    for coro in coroutines:
        sync(coro)


def _with_blocksize(attention_codecs, blocksize: int):
    def codecs(encoding: str):
        import dataclasses

        from zarr.codecs import BloscCodec

        out = dict(attention_codecs(encoding))
        out["compressors"] = tuple(
            dataclasses.replace(c, blocksize=blocksize) if isinstance(c, BloscCodec) else c for c in out["compressors"]
        )
        return out

    return codecs


def write_rows(path: Path, spec, pool: np.ndarray, quantised: np.ndarray | None, valid: np.ndarray, rows: int,
               threads: int) -> dict[str, float]:
    """Write ``rows`` model runs back to back; writer busy time, process CPU time, wall, bytes."""
    from attnstore.store.writer import AttentionWriter, InferenceBatch, directory_bytes

    b = pool.shape[1]
    source = quantised if quantised is not None else pool
    data = [np.roll(source[k % POOL], k, axis=-2) for k in range(rows)]  # made before the clock starts
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with AttentionWriter(path, spec, encode_threads=threads, max_queue=2) as writer:
        for k, att in enumerate(data):
            writer.append(InferenceBatch(episodes=np.arange(b), env_steps=np.full(b, 10 * k), attention=att,
                                         key_valid=valid))
        writer.flush()
        stats = writer.stats
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"busy": stats.busy_seconds, "cpu": cpu, "wall": wall, "mb": stats.attention_bytes / 1e6,
            "disk": directory_bytes(path / "attention") / 1e6 / (rows * b), "wait": stats.wait_seconds}


def child(args) -> None:
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    from attnstore.schema.encoding import quantise

    spec = bench_spec(args.layers)
    pool, valid = make_pool(spec, args.batch_size)
    quantised = np.stack([quantise(p.copy()) for p in pool])
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    tmp = Path(tempfile.mkdtemp(prefix="attnstore-bench-writer-"))
    try:
        for rep in range(args.repeats):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
            for name in order:
                with variant_settings(name, len(cores)) as threads:
                    uint16 = name not in ("previous", "current, float32 in")
                    path = tmp / f"r{rep}_{VARIANTS.index(name)}.zarr"
                    results[name].append(write_rows(path, spec, pool, quantised if uint16 else None, valid,
                                                    args.rows, threads))
                    shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"cores": len(cores), "results": results}))


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds: MB/s per busy second and per CPU second, MB on disk per row.

    >>> summarise([{"busy": 1.0, "cpu": 2.0, "wall": 1.0, "mb": 100.0, "disk": 3.0, "wait": 0.5}])
    {'mb_s': 100.0, 'mb_cpu_s': 50.0, 'disk': 3.0}
    """
    return {
        "mb_s": statistics.median(r["mb"] / r["busy"] for r in runs),
        "mb_cpu_s": statistics.median(r["mb"] / r["cpu"] for r in runs),
        "disk": statistics.median(r["disk"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="model runs written per measurement (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the variants (default 3)")
    parser.add_argument("--layers", type=int, default=2, help="layers per row (default 2; 18 = all, 293 MB/env)")
    parser.add_argument("--batch-size", type=int, default=1, help="envs per model run (default 1)")
    parser.add_argument("--cores", default="1,2", help="core counts to measure, comma-separated (default 1,2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.cores = int(args.cores)
        child(args)
        return 0
    for name in ("rows", "repeats", "layers", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    counts = [int(c) for c in args.cores.split(",")]
    available = len(os.sched_getaffinity(0))
    if any(c < 1 or c > available for c in counts):
        parser.error(f"--cores: each count must be in 1..{available} (the cores this process may use)")
    out: dict[int, dict[str, dict[str, float]]] = {}
    for cores in counts:
        cmd = [sys.executable, __file__, "--child", "--cores", str(cores), "--rows", str(args.rows),
               "--repeats", str(args.repeats), "--layers", str(args.layers), "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"bench_writer: the {cores}-core child failed:\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        out[cores] = {name: summarise(runs) for name, runs in data["results"].items()}
    mb_row = 10 * args.layers * 8 * 50 * 1018 * 4 / 1e6 * args.batch_size
    print(f"AttentionWriter throughput: {args.rows} model runs x B={args.batch_size} x {mb_row / args.batch_size:.1f} MB "
          f"float32 ({args.layers} layers), back to back, {args.repeats} rounds, medians; {os.cpu_count()} cores "
          f"on this machine")
    head = f"{'variant':<38}" + "".join(
        f"{f'{c} core MB/s':>14}{'ratio':>7}{'per CPU-s':>11}{'ratio':>7}" for c in counts)
    print(head + f"{'MB/env on disk':>16}")
    for name in VARIANTS:
        cells = ""
        for c in counts:
            r, base = out[c][name], out[c]["previous"]
            cells += f"{r['mb_s']:>14.0f}{r['mb_s'] / base['mb_s']:>6.2f}x{r['mb_cpu_s']:>11.0f}{r['mb_cpu_s'] / base['mb_cpu_s']:>6.2f}x"
        print(f"{name:<38}{cells}{out[counts[0]][name]['disk']:>16.2f}")
    print("MB/s: raw float32 equivalent per writer-thread busy second; per CPU-s: per CPU second of the process "
          "(all threads); ratio: to 'previous' at the same core count")
    print("command: .venv/bin/python bench/bench_writer.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
