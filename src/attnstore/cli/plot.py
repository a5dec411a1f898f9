"""``attnstore plot``: summary figures of a store (region shares, entropy, layers, success vs failure)."""

from __future__ import annotations

import argparse

HELP = "summary figures: attention share per region over time, entropy per denoise step and layer"
DESCRIPTION = """\
Write PNG figures summarising where the action tokens look:
  region_shares.png          share per region (each camera, language, action) over env steps
  entropy_per_denoise.png    attention entropy per denoise step, one line per layer
  per_layer.png              region shares and entropy per captured layer
  success_vs_failure.png     region shares over env steps, successful vs failed episodes
                             (whole store only, when it holds several finished episodes)
With --episode, the first three show that episode; without it, the mean over all episodes.

example:
  attnstore plot outputs/eval/attention.zarr --out outputs/eval/plots
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the attention.zarr folder an evaluation wrote")
    parser.add_argument("--episode", type=int, default=None, help="one episode (default: all episodes)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: 'plots' next to the store)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from attnstore.readers.plots import write_plots

    store = Path(args.store)
    out = Path(args.out) if args.out else store.resolve().parent / "plots"
    result = write_plots(store, out, episode=args.episode)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.figures)} figure(s) under {out}:")
    for path in result.figures:
        print(f"  {path.name}")
    return 0
