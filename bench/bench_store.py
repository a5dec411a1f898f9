"""Store benchmark: the attnstore Zarr store vs the legacy per-episode ``.pt``, side by side in one run.

One inference is the real LIBERO Pi0.5 size: 10 denoise x 2 layers x 8 heads x 50 action tokens x
1018 keys (32.6 MB of float32). One episode = 28 inferences (a 280-step libero_object episode with
n_action_steps 10); ``--inferences 145`` gives the legacy guide's per-env-step count (~5x longer).

Reproduce (from the repository root):

    .venv/bin/python bench/bench_store.py            # 28 inferences, 3 repeats, ~2 min
    .venv/bin/python bench/bench_store.py --quick    # 6 inferences, ~1 min
    .venv/bin/python bench/bench_store.py --inferences 145

Data: synthetic attention with real structure (tests/synthetic.py: masked keys exactly 0, an attention
sink, moving camera bumps). Four distinct inferences are generated and inference k is one of them
rolled by k along the action-token axis, so every inference differs; each inference is its own chunk
in the store (and its own tensors in the ``.pt``), so reusing a pool does not flatter compression.

Every path runs in its own subprocess so that peak RSS (``resource.getrusage``) belongs to it alone;
repeats run in rounds (each path once per round), timings are medians over rounds, and all reads
run with a warm page cache.
The legacy ``.pt`` is built in the legacy dict layout directly (``rollout_steps`` -> ``attention_maps``
-> ``attention_weights[layer]`` of shape (1, 8, 50, 1018)); reads use the bf16 file (what the legacy
workflow saved), with and without ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/synthetic.py: the shared synthetic-attention generator

POOL = 4
LAYERS = (16, 17)
CAMERA0 = slice(0, 256)  # agentview patches on the key axis


def bench_spec():
    from synthetic import make_spec

    return make_spec(layers=LAYERS, images=False, actions=False, language_tokens=False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- data ------------------------------------------------------------------------------------------
def make_pool(workdir: Path) -> None:
    from synthetic import synthetic_attention

    spec = bench_spec()
    rng = np.random.default_rng(0)
    pool = np.concatenate(
        [synthetic_attention(spec, rng, 1, 30, episodes=[0], env_steps=[10 * i])[0] for i in range(POOL)]
    )
    np.save(workdir / "pool.npy", pool)
    _, valid = synthetic_attention(bench_spec(), rng, 1, 30)
    np.save(workdir / "key_valid.npy", valid[0])


def inference(pool: np.ndarray, k: int) -> np.ndarray:
    """(D, L, H, Q, K) float32 attention of inference k (distinct for every k)."""
    return np.roll(pool[k % len(pool)], k, axis=-2)


# ---- child processes: one measured path, one repeat each ----------------------------------------------
# Repeats run in rounds (every path once per round, in turn), so that load from other jobs on a
# shared machine drifts over all paths alike rather than over whichever ran last.
def child_store_write(workdir: Path, n: int, round_index: int) -> dict:
    import dataclasses

    from attnstore.schema import EpisodeRecord
    from attnstore.store.writer import AttentionWriter, InferenceBatch

    spec = bench_spec()
    pool = np.load(workdir / "pool.npy")
    valid = np.load(workdir / "key_valid.npy")[None]
    base_rss = peak_rss_mb()

    def write(path: Path, store_spec, pace: float = 0.0) -> dict:
        mode = "overwrite" if path.exists() else "create"
        writer = AttentionWriter(path, store_spec, run={"bench": "store"}, mode=mode)
        appends, next_at = [], time.perf_counter()
        for k in range(n):
            batch = InferenceBatch(episodes=[0], env_steps=[10 * k], attention=inference(pool, k)[None],
                                   key_valid=valid, times=spec.times)
            if pace:  # the policy's inference time: the writer works meanwhile
                time.sleep(max(0.0, next_at - time.perf_counter()))
                next_at = time.perf_counter() + pace
            t0 = time.perf_counter()
            writer.append(batch)
            appends.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.end_episode(EpisodeRecord(0, task="bench", num_env_steps=10 * n))
        end_episode = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = writer.close()
        close = time.perf_counter() - t0
        return {"appends": appends, "end_episode": end_episode, "close": close, "blocked": sum(appends) + close,
                "busy": stats.busy_seconds, "bytes": stats.store_bytes, "raw": stats.attention_bytes}

    saturated = write(workdir / "attention.zarr", spec)
    out = {
        "raw_mb": saturated["raw"] / 1e6, "store_mb": saturated["bytes"] / 1e6,
        "blocked_s": saturated["blocked"], "busy_s": saturated["busy"],
        "append_saturated_s": statistics.mean(saturated["appends"]),
    }
    if round_index == 0:  # once: the paced loop (caller cost while the writer keeps up), float32 size
        out["pace_s"] = pace = 1.5 * saturated["busy"] / n
        paced = write(workdir / "paced.zarr", spec, pace=pace)
        out.update(append_paced_s=statistics.median(paced["appends"]), end_episode_s=paced["end_episode"],
                   close_paced_s=paced["close"])
        exact = write(workdir / "float32.zarr", dataclasses.replace(spec, encoding="float32"))
        out["store_f32_mb"] = exact["bytes"] / 1e6
    out.update(rss_mb=peak_rss_mb(), base_rss_mb=base_rss)
    return out


def legacy_dict(pool: np.ndarray, n: int, dtype, spec) -> tuple[dict, list[float]]:
    """The legacy per-episode dict; also the per-inference time the eval loop spends filling it."""
    import torch

    steps, per_inference = [], []
    for k in range(n):
        att = torch.from_numpy(inference(pool, k))
        t0 = time.perf_counter()
        maps = {
            d: {
                "time": float(spec.times[d]),
                "prefix_len": spec.layout.prefix_len,
                "suffix_len": spec.layout.num_action,
                "attention_weights": {layer: att[d, li][None].to(dtype).clone() for li, layer in enumerate(LAYERS)},
            }
            for d in range(len(spec.denoise_steps))
        }
        steps.append({"rollout_step": 10 * k, "attention_maps": maps})
        per_inference.append(time.perf_counter() - t0)
    data = {"rollout_steps": steps,
            "metadata": {"episode_index": 0, "num_rollout_steps": n, "num_denoising_steps": len(spec.times)}}
    return data, per_inference


def child_legacy_write(workdir: Path, n: int, round_index: int, dtype_name: str) -> dict:
    import torch

    spec = bench_spec()
    pool = np.load(workdir / "pool.npy")
    base_rss = peak_rss_mb()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    data, per_inference = legacy_dict(pool, n, dtype, spec)
    del pool
    path = workdir / f"episode_00000_attention_{dtype_name}.pt"
    t0 = time.perf_counter()
    torch.save(data, path)
    save = time.perf_counter() - t0
    return {"save_s": save, "append_s": statistics.median(per_inference), "pt_mb": path.stat().st_size / 1e6,
            "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


def import_readers():
    """open_attention, with the imports and xarray's engine discovery done (outside the timing, as for torch)."""
    import dask.array  # noqa: F401
    import xarray as xr
    import zarr  # noqa: F401

    from attnstore.store.open import open_attention

    xr.backends.list_engines()
    return open_attention


def probe_inference(n: int, round_index: int) -> int:
    return (7 * round_index + n // 2) % n  # a different inference each round


def child_store_slice(workdir: Path, n: int, round_index: int) -> dict:
    open_attention = import_readers()

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    ds = open_attention(workdir / "attention.zarr")
    sel = ds.attention.sel(episode=0, rollout=probe_inference(n, round_index), denoise=9, layer=17)
    grid = sel.isel(key=CAMERA0).mean(("head", "query")).values.reshape(16, 16)
    seconds = time.perf_counter() - t0
    return {"s": seconds, "grid": grid.tolist(), "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


def child_pt_slice(workdir: Path, n: int, round_index: int, mmap: bool) -> dict:
    import torch

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    data = torch.load(workdir / "episode_00000_attention_bfloat16.pt", mmap=mmap, weights_only=True)
    att = data["rollout_steps"][probe_inference(n, round_index)]["attention_maps"][9]["attention_weights"][17]
    grid = att[0, :, :, CAMERA0].float().mean(dim=(0, 1)).reshape(16, 16).numpy()
    seconds = time.perf_counter() - t0
    return {"s": seconds, "grid": grid.tolist(), "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


def child_store_episode(workdir: Path, n: int, round_index: int) -> dict:
    open_attention = import_readers()

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    ds = open_attention(workdir / "attention.zarr")
    mass = ds.attention.isel(key=CAMERA0).sum("key").mean(("head", "query"))  # (inference, denoise, layer)
    result = mass.sel(episode=0).values
    seconds = time.perf_counter() - t0
    return {"s": seconds, "mass": result.tolist(), "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


def child_pt_episode(workdir: Path, n: int, round_index: int, mmap: bool) -> dict:
    import torch

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    data = torch.load(workdir / "episode_00000_attention_bfloat16.pt", mmap=mmap, weights_only=True)
    mass = np.array([
        [[float(step["attention_maps"][d]["attention_weights"][layer][0, :, :, CAMERA0].float().sum(-1).mean())
          for layer in LAYERS] for d in sorted(step["attention_maps"])]
        for step in data["rollout_steps"]
    ])
    seconds = time.perf_counter() - t0
    return {"s": seconds, "mass": mass.tolist(), "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


CHILDREN = {
    "store_write": child_store_write,
    "pt_write_float32": lambda w, n, r: child_legacy_write(w, n, r, "float32"),
    "pt_write_bfloat16": lambda w, n, r: child_legacy_write(w, n, r, "bfloat16"),
    "store_slice": child_store_slice,
    "pt_slice": lambda w, n, r: child_pt_slice(w, n, r, mmap=False),
    "pt_slice_mmap": lambda w, n, r: child_pt_slice(w, n, r, mmap=True),
    "store_episode": child_store_episode,
    "pt_episode": lambda w, n, r: child_pt_episode(w, n, r, mmap=False),
    "pt_episode_mmap": lambda w, n, r: child_pt_episode(w, n, r, mmap=True),
}


def run_child(name: str, workdir: Path, n: int, round_index: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--workdir", str(workdir), "--inferences", str(n),
           "--round", str(round_index)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench child {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(workdir: Path, n: int, repeats: int) -> dict[str, dict[str, list]]:
    """{path: {field: [value per round]}}; writes come first in each round (reads need the files)."""
    results: dict[str, dict[str, list]] = {name: {} for name in CHILDREN}
    for round_index in range(repeats):
        t0 = time.perf_counter()
        for name in CHILDREN:
            for key, value in run_child(name, workdir, n, round_index).items():
                results[name].setdefault(key, []).append(value)
        print(f"  round {round_index + 1}/{repeats}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return results


# ---- the table -----------------------------------------------------------------------------------------
def med(values) -> float:
    return statistics.median(values)


def ratio(legacy: float, ours: float) -> str:
    return f"{legacy / ours:.3g}x" if ours else "-"


def report(r: dict, n: int, repeats: int, command: str) -> str:
    sw, p32, p16 = r["store_write"], r["pt_write_float32"], r["pt_write_bfloat16"]
    raw = sw["raw_mb"][0]
    rows = []

    def row(measure, ours, a, b, better_is="lower", fmt="{:.3g}"):
        cells = [fmt.format(v) for v in (ours, a, b)]
        rows.append(f"| {measure} | {cells[0]} | {cells[1]} | {cells[2]} | {ratio(a, ours)} / {ratio(b, ours)} "
                    f"({better_is} is better) |")

    rows.append("| measure | attnstore (Zarr, uint16) | legacy A | legacy B | legacy A / attnstore, B / attnstore |")
    rows.append("|---|---|---|---|---|")
    row("size on disk, MB (A: .pt float32, B: .pt bf16)", sw["store_mb"][0], p32["pt_mb"][0], p16["pt_mb"][0])
    row("caller time per inference while the writer keeps up, ms (attnstore: append; A/B: copy the maps into "
        "the episode dict, f32/bf16)", 1e3 * sw["append_paced_s"][0], 1e3 * med(p32["append_s"]),
        1e3 * med(p16["append_s"]))
    row("caller time at episode end, ms (attnstore: end_episode; A/B: torch.save f32/bf16)",
        1e3 * sw["end_episode_s"][0], 1e3 * med(p32["save_s"]), 1e3 * med(p16["save_s"]))
    row("write throughput, raw float32 MB/s over caller-blocked time, back to back (A/B: torch.save)",
        raw / med(sw["blocked_s"]), raw / med(p32["save_s"]), raw / med(p16["save_s"]), "higher")
    row("peak RSS while writing one episode, MB (A/B: episode dict + torch.save)",
        max(sw["rss_mb"]), max(p32["rss_mb"]), max(p16["rss_mb"]), fmt="{:.0f}")
    row("one inference's action->camera0 16x16 grid, s (A: torch.load of the bf16 .pt, B: with mmap=True)",
        med(r["store_slice"]["s"]), med(r["pt_slice"]["s"]), med(r["pt_slice_mmap"]["s"]))
    row("peak RSS of that read, MB", max(r["store_slice"]["rss_mb"]), max(r["pt_slice"]["rss_mb"]),
        max(r["pt_slice_mmap"]["rss_mb"]), fmt="{:.0f}")
    row("whole-episode reduction (camera0 mass per inference, denoise, layer), s (A/B: as above)",
        med(r["store_episode"]["s"]), med(r["pt_episode"]["s"]), med(r["pt_episode_mmap"]["s"]))
    row("peak RSS of that reduction, MB", max(r["store_episode"]["rss_mb"]), max(r["pt_episode"]["rss_mb"]),
        max(r["pt_episode_mmap"]["rss_mb"]), fmt="{:.0f}")

    grid_diff = max(np.abs(np.asarray(a) - np.asarray(b)).max()
                    for a, b in zip(r["store_slice"]["grid"], r["pt_slice"]["grid"]))
    mass_diff = np.abs(np.asarray(r["store_episode"]["mass"][0]) - np.asarray(r["pt_episode"]["mass"][0])).max()
    notes = [
        "",
        f"Command: `{command}`; {n} inferences of 10x2x8x50x1018 (raw float32 {raw:.0f} MB) = one episode; "
        f"medians of {repeats} rounds (each path once per round, each in its own process).",
        f"attnstore writer thread alone: {raw / med(sw['busy_s']):.0f} MB/s; appends back to back (the caller "
        f"outruns the writer) cost {1e3 * med(sw['append_saturated_s']):.0f} ms each on average; the paced loop "
        f"ran one inference every {1e3 * sw['pace_s'][0]:.0f} ms; close() at the end of the run (flush + "
        f"consolidate, once per run, not per episode) {sw['close_paced_s'][0]:.2f} s. attnstore float32 "
        f"encoding (exact): {sw['store_f32_mb'][0]:.0f} MB.",
        f"RSS before the measured work (imports, input pool): store write {med(sw['base_rss_mb']):.0f} MB, "
        f".pt write {med(p32['base_rss_mb']):.0f} MB, store reads {med(r['store_slice']['base_rss_mb']):.0f} MB, "
        f".pt reads {med(r['pt_slice']['base_rss_mb']):.0f} MB.",
        f"Cross-check, store vs bf16 .pt: grids differ by at most {grid_diff:.1e}, episode reductions by "
        f"{mass_diff:.1e} (bf16 rounding).",
    ]
    return "\n".join(rows + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inferences", type=int, default=28, help="inferences per episode (28; 145 = legacy count)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; every path runs once per round (3)")
    parser.add_argument("--quick", action="store_true", help="6 inferences (a smoke run)")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a fresh temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and .pt files")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](Path(args.workdir), args.inferences, args.round)
        print(json.dumps(result))
        return 0

    n = 6 if args.quick else args.inferences
    workdir = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.workdir))
    command = "python bench/bench_store.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        t0 = time.perf_counter()
        print(f"bench_store: {n} inferences, {args.repeats} repeats, in {workdir}", file=sys.stderr)
        make_pool(workdir)
        results = run_rounds(workdir, n, args.repeats)
        print(report(results, n, args.repeats, command.strip()))
        print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
