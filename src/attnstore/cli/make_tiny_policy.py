"""``attnstore make-tiny-policy DIR [--type pi05|pi0|smolvla]``: write a tiny random-weight checkpoint (offline)."""

from __future__ import annotations

import argparse

HELP = "write a tiny random-weight Pi0.5, Pi0 or SmolVLA checkpoint (LIBERO features) for tests and dry runs"
DESCRIPTION = """\
Write a tiny random-weight Pi0.5 to DIR, built through lerobot's own classes (2 layers, 8 heads,
small SigLIP at 224 px / patch 14 = 256 tokens per camera) with LIBERO's features, a local
tokenizer and made-up normalisation stats. Works offline. Use it as --policy.path with
'attnstore eval' (it is rebuilt tiny when loaded) or load_policy(DIR).
--type pi0: a tiny Pi0 the same way (its state token, 48 prompt tokens); --type smolvla: a tiny
SmolVLA with a tiny SmolVLM2 (random weights, offline processor in DIR/vlm; 512 px / patch 16 /
pixel shuffle 4 = 64 tokens per camera, 4 expert layers alternating self- and cross-attention).

examples:
  attnstore make-tiny-policy /tmp/tiny_pi05 --seed 0
  attnstore make-tiny-policy /tmp/tiny_smolvla --type smolvla
"""

LABELS = {"pi05": "Pi0.5", "pi0": "Pi0", "smolvla": "SmolVLA"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", help="output directory (created; must be empty or a tiny checkpoint)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same weights; default 0)")
    parser.add_argument(
        "--cameras",
        default="image,image2",
        help="comma-separated camera names (observation.images.NAME; default image,image2 as LIBERO)",
    )
    parser.add_argument("--empty-cameras", type=int, default=1, help="masked empty camera slots (default 1)")
    parser.add_argument(
        "--type", dest="policy_type", choices=tuple(LABELS), default="pi05",
        help="lerobot policy type to build (default pi05)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from attnstore.outputs import check_writable_dir

    check_writable_dir(args.directory, "DIR")  # before torch and lerobot load
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnstore.capture.tiny import make_tiny_policy

    cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
    path = make_tiny_policy(
        args.directory, seed=args.seed, cameras=cameras, empty_cameras=args.empty_cameras,
        policy_type=args.policy_type,
    )
    print(f"tiny {LABELS[args.policy_type]} written to {path}")
    return 0
