"""Benchmark: the attention encodings (portable / compact / analysis) vs a bf16 ``.pt`` of the same tensor.

Reproduce:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_encoding.py [--inferences 28] [--repeats 3] [--only tiny|synthetic]
    .venv/bin/python bench/bench_encoding.py --entropy   # why the synthetic maps stay near 1x losslessly

Two sources of float32 attention, (inference, denoise 10, layer 2, head 8, query 50, key 1018) each:

* ``tiny``: a real capture by the real AttentionRecorder of the tiny random-weight Pi0.5 (lerobot's own
  classes), one 10-step-per-inference episode of ``--inferences`` model runs with slowly changing images,
  cached as a float32 store under ``build/bench-encoding/`` (made on first use; ~1 min);
* ``synthetic``: tests/synthetic.py's structured maps (sink, moving camera bumps, i.i.d. log-normal noise
  per element, so no denoise correlation).

Each source is written through the real AttentionWriter once per encoding and repeat (attention + key_valid
only), then read back with ``open_attention(...).attention.values``. Reported: attention bytes per episode
(28 inferences = 280 env steps), ratio to portable, encode MB/s (float32 MB / writer-thread busy time, which
includes the quantisation), decode MB/s (float32 MB / read time), medians over repeats; bf16 ``.pt`` is
``torch.save`` / ``torch.load`` of the same tensor in bfloat16. Then the analysis grade's errors against the
portable store, computed with attnstore's readers per attention row: max |region share error|, max |entropy
error| (nats), max |row sum - 1|, share of rows whose top-5 patches per camera are identical (rank order,
ties to the lower index), nonzero masked keys.

``--entropy``: bits per value of the synthetic maps (2 inferences): portable, the order-0 entropy of the
uint16 values and of their differences along denoise / layer / head / query / key, and the lossless bound,
the entropy of the generator's i.i.d. noise given the exact noise-free field (measured: portable 3.29,
bound 2.01 bits, so no lossless coder gets more than 1.63x under portable there; every difference has
more entropy than the values' own context-free coding by portable, as the noise is independent).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CACHE = ROOT / "build" / "bench-encoding"
ENCODINGS = ("portable", "compact", "analysis")
PER_EPISODE = 28  # inferences in one 280-step LIBERO episode (n_action_steps 10)


# ---- sources -----------------------------------------------------------------------------------------
def tiny_capture(n: int) -> tuple[object, np.ndarray, np.ndarray]:
    """(spec, attention (n, D, L, H, Q, K) float32, key_valid (n, K)) of the tiny Pi0.5, cached."""
    from attnstore import open_attention
    from attnstore.store.open import spec_of

    store = CACHE / f"tiny_float32_{n}.zarr"
    if not (store / "zarr.json").exists():
        import torch

        from attnstore.capture import AttentionRecorder, find_tokenizer, load_policy, make_tiny_policy
        from attnstore.capture.tiny import example_model_batch
        from attnstore.store.writer import AttentionWriter

        CACHE.mkdir(parents=True, exist_ok=True)
        ckpt = CACHE / "tiny_pi05"
        if not ckpt.exists():
            make_tiny_policy(ckpt, seed=0)
        policy, pre, _ = load_policy(ckpt)
        base = example_model_batch(1)
        g = torch.Generator().manual_seed(1)
        target = {k: torch.rand(v.shape, generator=g) for k, v in base.items() if k.startswith("observation.images")}
        shutil.rmtree(store, ignore_errors=True)
        steps = 10 * n
        with AttentionWriter(store) as writer, AttentionRecorder(
            policy, writer, layers="last:2", tokenizer=find_tokenizer(pre), encoding="float32"
        ):
            policy.reset()
            for step in range(steps):  # the images drift from one random frame to another over the episode
                batch = dict(base)
                for k, v in target.items():
                    batch[k] = (1 - step / steps) * base[k] + step / steps * v
                with torch.no_grad():
                    policy.select_action(batch)
    ds = open_attention(store)
    return spec_of(ds), ds.attention.values, ds.key_valid.values


def synthetic(n: int) -> tuple[object, np.ndarray, np.ndarray]:
    from synthetic import make_spec, synthetic_attention

    spec = make_spec(images=False, actions=False)
    rng = np.random.default_rng(0)
    rows = [synthetic_attention(spec, rng, 1, episodes=[0], env_steps=[10 * i]) for i in range(n)]
    return spec, np.concatenate([a for a, _ in rows]), np.concatenate([v for _, v in rows])


# ---- why the synthetic maps compress as they do: empirical entropies and the lossless bound --------------
def _entropy_bits(values: np.ndarray) -> float:
    """Order-0 entropy (bits per value) of the values' histogram."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _quantised_lognormal_bits(m: np.ndarray, sigma: float) -> np.ndarray:
    """Entropy (bits) of round(m * exp(N(0, sigma))) for each expected value m (units of 1/65535)."""
    from scipy.special import ndtr

    grid = np.exp(np.linspace(np.log(1e-4), np.log(70000.0), 400))
    table = np.empty_like(grid)
    for i, g in enumerate(grid):
        if g * sigma > 40:  # fine enough: differential entropy of the log-normal
            table[i] = np.log2(g) + 0.5 * np.log2(2 * np.pi * np.e * sigma**2)
            continue
        j = np.arange(int(g * np.exp(8 * sigma)) + 3)
        hi = ndtr(np.log((j + 0.5) / g) / sigma)
        lo = np.where(j > 0, ndtr(np.log(np.maximum(j - 0.5, 1e-300) / g) / sigma), 0.0)
        p = (hi - lo)[hi > lo]
        table[i] = -(p * np.log2(p)).sum()
    bits = np.interp(np.log(np.maximum(m, 1e-4)), np.log(grid), table)
    return np.where(m < 1e-4, 0.0, bits)


def synthetic_entropy(n: int) -> dict[str, float]:
    """Bits per value of the synthetic maps: portable, order-0 entropies of the uint16 values and of their
    differences along each axis, and the lossless bound: the entropy of the i.i.d. noise alone (sigma 0.3,
    tests/synthetic.py), given the exact noise-free field (the same generator with its normal draws zeroed,
    rescaled per row by the median ratio to the noisy map: the noisy normaliser)."""
    from numcodecs import Blosc
    from synthetic import make_spec, synthetic_attention

    from attnstore.schema.encoding import BLOSC_BLOCKSIZE, quantise

    class NoNoise:  # the same draws as the real run, with the noise itself replaced by 0
        def __init__(self, rng):
            self.rng = rng

        def normal(self, *args, **kw):
            return np.zeros_like(self.rng.normal(*args, **kw))

        def uniform(self, *args, **kw):
            return self.rng.uniform(*args, **kw)

    spec = make_spec(images=False, actions=False)
    noisy_rng, free_rng = np.random.default_rng(0), NoNoise(np.random.default_rng(0))
    noisy = np.concatenate([synthetic_attention(spec, noisy_rng, 1, episodes=[0], env_steps=[10 * i])[0]
                            for i in range(n)])
    free = np.concatenate([synthetic_attention(spec, free_rng, 1, episodes=[0], env_steps=[10 * i])[0]
                           for i in range(n)]).astype(np.float64)
    u = quantise(noisy.copy())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.nanmedian(np.where(free > 1e-6, noisy / free, np.nan), axis=-1, keepdims=True)
    sink = spec.layout.region_slice("language").start  # exact per head: no noise, costs ~0 bits
    m = free * ratio * 65535
    m[..., sink] = 0
    x = u.astype(np.int32)
    blosc = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=BLOSC_BLOCKSIZE)
    out = {"portable": 8 * sum(len(blosc.encode(np.ascontiguousarray(c))) for c in u) / u.size,
           "values": _entropy_bits(u)}
    for name, axis in (("denoise", 1), ("layer", 2), ("head", 3), ("query", 4), ("key", 5)):
        out[f"{name} differences"] = _entropy_bits(np.diff(x, axis=axis))
    out["noise given the field (bound)"] = float(_quantised_lognormal_bits(m, 0.3).mean())
    return out


# ---- measurements ------------------------------------------------------------------------------------
def write_store(path: Path, spec, attention: np.ndarray, valid: np.ndarray, encoding: str) -> float:
    """Write through the real writer; return the writer thread's busy seconds."""
    from attnstore.store.writer import AttentionWriter, InferenceBatch

    only_attention = dict(encoding=encoding, image_shape=None, action_shape=None, store_language_tokens=False,
                          prefix_layers=(), extra_shapes={}, summary_layers=(), summary_prefix_layers=())
    fields = {f.name for f in dataclasses.fields(spec)}
    spec = dataclasses.replace(spec, **{k: v for k, v in only_attention.items() if k in fields})
    with AttentionWriter(path, spec, max_queue=2) as writer:
        for i in range(len(attention)):
            writer.append(InferenceBatch(episodes=[0], env_steps=[10 * i], attention=attention[i : i + 1],
                                         key_valid=valid[i : i + 1], times=np.asarray(spec.times)))
        writer.flush()
        busy = writer.stats.busy_seconds
    return busy


def read_seconds(path: Path) -> tuple[float, np.ndarray]:
    from attnstore import open_attention

    start = time.perf_counter()
    values = open_attention(path).attention.values
    return time.perf_counter() - start, values


def pt_bf16(attention: np.ndarray) -> tuple[int, float, float]:
    import torch

    tensor = torch.from_numpy(attention)
    start = time.perf_counter()
    bf16 = tensor.to(torch.bfloat16)
    buf = io.BytesIO()
    torch.save({"attention": bf16}, buf)
    save = time.perf_counter() - start
    buf.seek(0)
    start = time.perf_counter()
    torch.load(buf, weights_only=True)["attention"].float()
    return buf.getbuffer().nbytes, save, time.perf_counter() - start


def analysis_errors(portable: Path, analysis: Path) -> dict[str, float]:
    from test_encodings import analysis_errors as errors  # the test's own computation, with the readers

    from attnstore import open_attention

    return errors(open_attention(portable), open_attention(analysis))


def run(name: str, spec, attention: np.ndarray, valid: np.ndarray, repeats: int, workdir: Path) -> dict:
    mb = attention.nbytes / 1e6
    scale = PER_EPISODE / len(attention)
    out: dict = {"name": name, "n": len(attention), "rows": {}}
    for encoding in ENCODINGS:
        sizes, enc, dec = [], [], []
        for r in range(repeats):
            path = workdir / f"{name}_{encoding}_{r}.zarr"
            busy = write_store(path, spec, attention, valid, encoding)
            seconds, values = read_seconds(path)
            from attnstore.store.writer import directory_bytes

            sizes.append(directory_bytes(path / "attention"))
            enc.append(mb / busy)
            dec.append(mb / seconds)
            if r:
                shutil.rmtree(path)
        out["rows"][encoding] = (statistics.median(sizes) * scale, statistics.median(enc), statistics.median(dec))
    pts = [pt_bf16(attention) for _ in range(repeats)]
    out["rows"]["bf16 .pt"] = (statistics.median(p[0] for p in pts) * scale,
                               mb / statistics.median(p[1] for p in pts), mb / statistics.median(p[2] for p in pts))
    out["errors"] = analysis_errors(workdir / f"{name}_portable_0.zarr", workdir / f"{name}_analysis_0.zarr")
    return out


def table(results: list[dict]) -> str:
    lines = ["| source | encoding | MB per episode | vs portable | encode MB/s | decode MB/s |",
             "|---|---|---|---|---|---|"]
    for res in results:
        base = res["rows"]["portable"][0]
        for enc, (size, e, d) in res["rows"].items():
            lines.append(f"| {res['name']} ({res['n']} inferences) | {enc} | {size / 1e6:.1f} | "
                         f"{base / size:.2f}x smaller | {e:.0f} | {d:.0f} |")
    lines += ["", "| source | max region-share error | max entropy error (nats) | max \\|row sum - 1\\| | "
                  "top-5 identical | masked nonzero |", "|---|---|---|---|---|---|"]
    for res in results:
        e = res["errors"]
        lines.append(f"| {res['name']} | {e['region_share']:.2e} | {e['entropy']:.2e} | {e['row_sum']:.2e} | "
                     f"{100 * e['top5_identical']:.2f}% | {e['masked_nonzero']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inferences", type=int, default=PER_EPISODE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("tiny", "synthetic"))
    parser.add_argument("--entropy", action="store_true", help="only the synthetic maps' entropies and bound")
    args = parser.parse_args(argv)
    if args.inferences < 1 or args.repeats < 1:
        parser.error("--inferences and --repeats must be >= 1")
    if args.entropy:
        bits = synthetic_entropy(min(args.inferences, 2))
        print("| synthetic maps, bits per value | |\n|---|---|")
        print("\n".join(f"| {k} | {v:.3f} |" for k, v in bits.items()))
        bound = bits["portable"] / bits["noise given the field (bound)"]
        print(f"\nno lossless coder beats {bound:.2f}x smaller than portable on these maps")
        print("command: .venv/bin/python bench/bench_encoding.py " + shlex.join(argv or sys.argv[1:]))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="attnstore-bench-encoding-") as tmp:
        for name, source in (("tiny", tiny_capture), ("synthetic", synthetic)):
            if args.only and name != args.only:
                continue
            spec, attention, valid = source(args.inferences)
            results.append(run(name, spec, attention, valid, args.repeats, Path(tmp)))
            del attention
    print(table(results))
    print()
    print("command: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_encoding.py " + shlex.join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
