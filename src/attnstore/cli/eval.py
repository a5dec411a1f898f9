"""``attnstore eval``: lerobot-eval with attention capture (every lerobot-eval flag, plus ``--attention.*``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

HELP = "run lerobot-eval (e.g. on LIBERO) and capture Pi0.5 attention into <output_dir>/attention.zarr"
RAW_ARGV = True  # lerobot's flags pass through unparsed

USAGE = """usage: attnstore eval --policy.path=DIR|HUB_ID|tiny --env.type=libero --env.task=SUITE [lerobot-eval flags]
                      [--attention.FIELD=VALUE ...]

Runs lerobot's own evaluation (rollouts, metrics, eval_info.json, videos) and records the action
tokens' attention of every policy inference into a Zarr store, one row per inference.

attention options (defaults in brackets):
  --attention.layers=last:2|all|final|[16,17]       action-expert layers to record [last:2]
  --attention.denoise_steps=all|final|last:N|[0,9]  denoise steps to record [all]
  --attention.episodes=all|[0,3]                    episodes to record (lerobot's numbering) [all]
  --attention.prefix=false|true|last:N|[0,1]        also record the VLM prefix self-attention
                                                    (true: the --attention.layers ones) [false]
  --attention.images=true|false                     store the images the policy saw [true]
  --attention.actions=true|false                    store the predicted action chunks [true]
  --attention.encoding=portable|compact|analysis|float32
                                                    portable: uint16 any Zarr reader reads, max abs
                                                    error 7.6e-6; compact: the same values ~2.6x smaller
                                                    (attnstore's codec); analysis: lossy, bounded
                                                    shares/entropy/top-5 errors; float32: exact [portable]
  --attention.summary=true|false                    store per-layer summaries of every layer (region
                                                    mass, entropy, camera grids; a few % of a last:2
                                                    store) [true]
  --attention.writer_nice=0..19                     the writer's encoding threads yield the CPU to the
                                                    policy (Linux; for few cores and one eval per node)
                                                    [none]
  --attention.overwrite=true|false                  replace an existing store at the same path [false]
  --attention.store=PATH.zarr                       where to write it [<output_dir>/attention.zarr]

Layers and denoise steps share one grammar: all, final (= last:1), last:N, or indices written
[16,17], 16,17 or 17; negative indices count from the end (-1 = the last).

example (tiny offline policy, one short episode):
  attnstore eval --policy.path=tiny --env.type=libero --env.task=libero_object --env.task_ids='[0]' \\
      --eval.n_episodes=1 --eval.batch_size=1 --env.episode_length=40 --output_dir=outputs/eval_demo

All other flags go to lerobot-eval unchanged; see 'lerobot-eval --help'."""


def run(argv: Sequence[str]) -> int:
    if not argv or "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0 if argv else 2
    from attnstore.evaluation.runner import run_eval

    result = run_eval(list(argv))
    print(result.summary(), file=sys.stdout, flush=True)
    return 0
