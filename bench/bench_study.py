"""Study benchmark: open and reduce many episodes, locally and on an S3-compatible server, before and after pack.

Stores are written through the real writer with small synthetic shapes (tests/synthetic.py: 2 cameras of
4x4 patches, 12 language tokens, 4 action tokens, 2 heads, 2 layers, 10 denoise steps; 28 inferences per
episode as a 280-step LIBERO episode; B=50 envs in lockstep, to write quickly), as one store per size. For each size:

* ``open_attention`` and ``open_study`` (the same rows as 10 runs) time, medians over repeats;
* a whole-study reduction: region shares per run x outcome (``region_shares(...).groupby(...)``), its dask
  graph size and compute time;
* objects per inference before and after ``attnstore pack``; upload time to moto_server (127.0.0.1) of the
  unpacked and the packed store (the unpacked upload only up to --max-unpacked-upload episodes: ~6 objects
  per inference make it slow; larger sizes are reported as not run);
* open time from S3 (packed store).

    .venv/bin/python bench/bench_study.py                    # 20, 200, 2000 episodes (~10 min)
    .venv/bin/python bench/bench_study.py --episodes 20 200  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ROWS_PER_EPISODE = 28


def write_store(path: Path, episodes: int, seed: int = 0) -> None:
    import synthetic as syn

    spec = syn.make_spec(num_language=12, num_action=4, grid=4, num_heads=2, image_size=8)
    syn.write_synthetic_store(path, spec, episodes={e: ROWS_PER_EPISODE for e in range(episodes)}, batch_size=50,
                              seed=seed)


def write_study(root: Path, episodes: int, runs: int = 10) -> None:
    for r in range(runs):
        write_store(root / "runs" / f"task{r}" / "attention.zarr", max(1, episodes // runs), seed=r)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def count_objects(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-unpacked-upload", type=int, default=20)
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()

    import attnstore
    from attnstore.readers import region_shares
    from attnstore.store.pack import pack

    s3 = None
    if not args.no_s3:
        from s3server import CREDENTIALS, start_server

        os.environ.update(CREDENTIALS)
        s3 = start_server()
        bucket = s3.make_bucket("attnstore-bench")
    work = Path(tempfile.mkdtemp(prefix="bench_study_"))
    rows = []
    try:
        for n in args.episodes:
            store = work / f"e{n}" / "attention.zarr"
            t = time.perf_counter()
            write_store(store, n)
            write_s = time.perf_counter() - t
            study_root = work / f"study{n}"
            write_study(study_root, n)
            inferences = n * ROWS_PER_EPISODE
            open_s, ds = timed(lambda: attnstore.open_attention(store), args.repeats)
            study_s, study = timed(lambda: attnstore.open_study(study_root), args.repeats)
            final = study.sel(layer=17, denoise=9)
            reduction = region_shares(final).groupby("outcome").mean()
            graph = len(dict(reduction.__dask_graph__()))
            reduce_s, _ = timed(lambda: reduction.compute(), args.repeats)
            packed = work / f"e{n}_packed.zarr"
            pack(store, packed, progress=False)
            before, after = count_objects(store), count_objects(packed)
            row = {"episodes": n, "inferences": inferences, "write_s": write_s, "open_s": open_s, "study_s": study_s,
                   "graph": graph, "reduce_s": reduce_s, "objects_before": before, "objects_after": after,
                   "per_inf_before": before / inferences, "per_inf_after": after / inferences}
            if s3 is not None:
                fs = s3.filesystem()
                if n <= args.max_unpacked_upload:
                    t = time.perf_counter()
                    fs.put(str(store), f"{bucket}/e{n}/attention.zarr", recursive=True)
                    row["upload_before_s"] = time.perf_counter() - t
                t = time.perf_counter()
                fs.put(str(packed), f"{bucket}/e{n}_packed.zarr", recursive=True)
                row["upload_after_s"] = time.perf_counter() - t
                url = f"s3://{bucket}/e{n}_packed.zarr"
                row["open_s3_s"], _ = timed(lambda: attnstore.open_attention(url, storage_options=s3.storage_options),
                                            args.repeats)
            rows.append(row)
            print(f"# {n} episodes done: {row}", file=sys.stderr, flush=True)
    finally:
        if s3 is not None:
            from s3server import stop_server

            stop_server(s3)
        shutil.rmtree(work, ignore_errors=True)

    def f(v, fmt="{:.2f}"):
        return "not run" if v is None else fmt.format(v)

    print("| episodes (inferences) | open_attention | open_study (10 runs) | study reduction (tasks, time) | "
          "objects / inference: store -> packed | upload to S3: store -> packed | open from S3 (packed) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['episodes']} ({r['inferences']}) | {f(r['open_s'])} s | {f(r['study_s'])} s | "
              f"{r['graph']} tasks, {f(r['reduce_s'])} s | {r['per_inf_before']:.2f} -> {r['per_inf_after']:.3f} | "
              f"{f(r.get('upload_before_s'), '{:.1f}')} s -> {f(r.get('upload_after_s'), '{:.1f}')} s | "
              f"{f(r.get('open_s3_s'))} s |")
    print()
    print(f"Command: .venv/bin/python bench/bench_study.py --episodes {' '.join(map(str, args.episodes))} "
          f"--repeats {args.repeats}; {os.cpu_count()} cores; moto_server on 127.0.0.1.")


if __name__ == "__main__":
    main()
