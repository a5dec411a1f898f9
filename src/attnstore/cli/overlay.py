"""``attnstore overlay``: heat maps of action->camera attention on the images the policy saw."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import URL_EPILOG, add_store_argument, default_output, locate_store

HELP = "draw attention heat maps on the policy's camera images (PNG panels, MP4 per camera)"
DESCRIPTION = """\
Draw where the action tokens look in each camera: for each chosen inference and camera, a PNG
panel with the exact image the policy saw, the heat map blended on it, and the pure heat map
beside it (16x16 patches of 14x14 pixels), with a colour bar. --video writes one MP4 per camera
over the whole episode (h264, yuv420p).

Defaults: the last captured layer, the final captured denoise step, mean over action tokens and
heads, every present camera (missing/dummy cameras are skipped with a note), attention
renormalised within the camera (--scale total shows the raw share of all attention).
Without --steps/--rollouts/--all: every captured inference, or with --video only the videos.

examples:
  attnstore overlay outputs/eval/attention.zarr --episode 0 --steps 0 50 100
  attnstore overlay outputs/eval/attention.zarr --episode 3 --video --camera image --heads max
  attnstore overlay outputs/eval/attention.zarr --episode 0 --all --layer -1 --denoise final

--layer and --denoise use the same grammar as 'attnstore eval --attention.layers' (one value here).

""" + URL_EPILOG.format(command="overlay", args=" --episode 0") + """
For a store read from a URL the output goes to ./<run>_overlays in the current folder unless --out
is given (<run>: the folder holding attention.zarr, e.g. task0_overlays).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument("--episode", type=int, required=True, help="episode index")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--steps", type=int, nargs="+", metavar="STEP",
                       help="env steps (video frames) at which the policy ran, e.g. 0 10 20")
    which.add_argument("--rollouts", type=int, nargs="+", metavar="R",
                       help="inference numbers within the episode instead (0 = first inference)")
    which.add_argument("--all", action="store_true", help="every captured inference of the episode")
    parser.add_argument("--layer", default=None, metavar="L",
                        help="action-expert layer: an index (negative counts from the model's end) or final "
                             "(default: the last captured)")
    parser.add_argument("--denoise", default=None, metavar="D",
                        help="denoise step index, 0 = t=1.0, -1 or final = the model's last "
                             "(default: the final captured step)")
    parser.add_argument("--action-idx", default="mean", metavar="i|mean",
                        help="one action token (query) or the mean over all (default: mean)")
    parser.add_argument("--heads", default="mean", metavar="mean|max|H",
                        help="mean or max over heads, or one head (default: mean)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity on the image (default 0.5)")
    parser.add_argument("--camera", nargs="+", default=["all"], metavar="NAME",
                        help="camera name(s) or 'all' (default: all present cameras)")
    parser.add_argument("--scale", choices=("camera", "total"), default="camera",
                        help="camera: renormalised within the camera; total: raw share of all attention")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="local output folder (default: 'overlays' next to a local store, "
                             "./<run>_overlays for a URL)")
    parser.add_argument("--video", action="store_true", help="also write an MP4 per camera over the episode")
    parser.add_argument("--fps", type=float, default=None,
                        help="video frame rate (default: real time, 20 Hz env steps between inferences)")
    parser.add_argument("--zoom", type=int, default=2, help="integer enlargement of the pictures (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from attnstore.readers.overlay import OverlayOptions, write_overlays

    location = locate_store(args)
    cameras = None if args.camera == ["all"] else tuple(args.camera)
    options = OverlayOptions(
        episode=args.episode,
        out_dir=Path(args.out) if args.out else default_output(location, "overlays"),
        steps=tuple(args.steps) if args.steps else None,
        rollouts=tuple(args.rollouts) if args.rollouts else None,
        all_steps=args.all,
        layer=args.layer,
        denoise=args.denoise,
        action=args.action_idx,
        heads=args.heads,
        alpha=args.alpha,
        cameras=cameras,
        scale=args.scale,
        video=args.video,
        fps=args.fps,
        zoom=args.zoom,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    result = write_overlays(location, options)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.pngs)} PNG panel(s) and {len(result.videos)} video(s) under {options.out_dir}")
    for path in result.videos:
        print(f"  {path}")
    return 0
