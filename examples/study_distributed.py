"""A study on object storage, analysed with dask.distributed: success-vs-failure region shares and the mean
action->camera grid per task, over every run of a study.

    python examples/study_distributed.py s3://lab/study --storage-option endpoint_url=http://127.0.0.1:9000

The same code runs on a real cluster: replace ``LocalCluster(...)`` with your cluster's scheduler, e.g.
``Client("tcp://scheduler:8786")``, ``dask_jobqueue.SLURMCluster(...)`` or a Kubernetes ``KubeCluster``;
the workers need attnstore, xarray, zarr and s3fs installed and the bucket's credentials
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` in their environment, or the storage
options, which travel with the tasks). Scripts that start a LocalCluster need the
``if __name__ == "__main__":`` guard below (the workers are new processes that import this file).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def analyse(study: str, storage_options: dict, layer: int | None = None, camera: str = "image"):
    """(shares by outcome, mean grid per task) as lazy xarray objects over the whole study."""
    import attnstore
    from attnstore.readers import action_to_visual, region_shares

    ds = attnstore.open_study(study, storage_options=storage_options)
    layer = int(ds.layer[-1]) if layer is None else layer
    final = ds.sel(layer=layer, denoise=int(ds.denoise[-1]))
    shares = region_shares(final).groupby("outcome").mean()                      # (outcome, region)
    grids = action_to_visual(final, camera, renormalize=True).groupby("task_key").mean()  # (task_key, row, col)
    return shares, grids


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> dict:
    from dask.distributed import Client, LocalCluster

    from attnstore.store.location import parse_storage_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study folder or URL (runs/<name>/attention.zarr below it)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1.5GB")
    parser.add_argument("--json", help="write the results (and the workers' peak memory) here")
    args = parser.parse_args(argv)
    options = parse_storage_options(args.storage_option)

    shares, grids = analyse(args.study, options)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit,
                      processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        shares_v, grids_v = client.compute([shares, grids], sync=True)
        peak = max(client.run(_peak_rss).values())  # each worker process's peak resident memory
        limit = min(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
    print(shares_v.to_pandas().round(4))
    for task in grids_v.task_key.values:
        grid = grids_v.sel(task_key=task).values
        print(f"{task}: mean grid peak at patch {np.unravel_index(int(grid.argmax()), grid.shape)}")
    result = {
        "shares": {str(o): shares_v.sel(outcome=o).values.tolist() for o in shares_v.outcome.values},
        "regions": shares_v.region.values.tolist(),
        "grids": {str(t): grids_v.sel(task_key=t).values.tolist() for t in grids_v.task_key.values},
        "worker_memory_bytes": int(peak), "worker_memory_limit": int(limit),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":  # required: LocalCluster's worker processes import this module
    main(sys.argv[1:])
