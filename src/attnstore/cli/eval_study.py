"""``attnstore eval-study``: one lerobot evaluation process per task (per GPU), into one study folder."""

from __future__ import annotations

import argparse

HELP = "run one 'attnstore eval' process per task (and GPU) into STUDY/runs/<suite>_task<id>/"
DESCRIPTION = """\
A LIBERO study, the way it is usually run: one evaluation process per task or per GPU, no coordination.
Each job is 'attnstore eval --env.task=SUITE --env.task_ids=[ID] <your flags> --output_dir=STUDY/runs/<name>'
(its own eval_info.json, videos, attention.zarr, eval.log). At most --jobs run at once; --devices cycles
--policy.device over the jobs (one GPU each). Read the study while it runs and after:
  attnstore.open_study("STUDY")      # committed rows of every run, with a 'run' coordinate
Unknown flags pass to every job (lerobot-eval's and --attention.*), e.g.
  attnstore eval-study --study outputs/study --suite libero_object --task-ids 0 1 --jobs 2 \\
      --policy.path=tiny --env.type=libero --eval.n_episodes=2 --eval.batch_size=1"""
PASS_UNKNOWN = True  # lerobot-eval's and --attention.* flags go to every job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="DIR", help="study folder (runs go to DIR/runs/<name>/)")
    parser.add_argument("--suite", required=True, metavar="SUITE", help="LIBERO suite (lerobot's --env.task), e.g. libero_object")
    parser.add_argument("--task-ids", type=int, nargs="+", required=True, metavar="ID", help="task ids, one job each")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="jobs running at once (default 1)")
    parser.add_argument("--devices", nargs="+", default=(), metavar="DEV",
                        help="--policy.device per job, cycled (e.g. cuda:0 cuda:1)")


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from attnstore.evaluation.study import run_study

    jobs = run_study(args.study, args.suite, args.task_ids, extra or [], jobs=args.jobs, devices=args.devices)
    failed = [j for j in jobs if j.returncode != 0]
    print(f"attnstore eval-study: {len(jobs) - len(failed)} of {len(jobs)} runs done in {args.study}/runs"
          + (f"; failed: {', '.join(j.name for j in failed)} (see their eval.log)" if failed else ""))
    return 1 if failed else 0
