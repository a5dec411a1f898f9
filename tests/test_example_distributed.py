"""examples/study_distributed.py on a multi-run study read from a real S3-compatible server, with
dask.distributed's LocalCluster(n_workers=2, memory_limit="1.5GB"): results equal the threaded scheduler's,
and worker memory stays under the limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthetic import make_spec, write_synthetic_store

pytest.importorskip("distributed")
EXAMPLE = Path(__file__).parents[1] / "examples" / "study_distributed.py"


def test_distributed_study_analysis_matches_threads(s3, tmp_path):
    spec = make_spec(num_language=12, num_action=4, grid=4, num_heads=2, image_size=8)
    for i, name in enumerate(("libero_object_task0", "libero_object_task1", "libero_object_task2")):
        write_synthetic_store(tmp_path / "runs" / name / "attention.zarr", spec, episodes={0: 4, 1: 3, 2: 3, 3: 2},
                              seed=i)
    bucket = s3.make_bucket("attnstore-dask")
    s3.filesystem().put(str(tmp_path / "runs"), f"{bucket}/study/runs", recursive=True)
    url = f"s3://{bucket}/study"
    out_json = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(EXAMPLE), url, "--json", str(out_json)], env=s3.env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out_json.read_text())

    import dask

    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from study_distributed import analyse
    finally:
        sys.path.pop(0)
    shares, grids = analyse(url, s3.storage_options)
    with dask.config.set(scheduler="threads"):
        shares, grids = shares.compute(), grids.compute()
    assert sorted(result["shares"]) == sorted(shares.outcome.values.tolist()) == ["failure", "success"]
    for outcome, values in result["shares"].items():
        np.testing.assert_allclose(values, shares.sel(outcome=outcome).values, rtol=1e-6)
    assert sorted(result["grids"]) == sorted(grids.task_key.values.tolist())
    for task, grid in result["grids"].items():
        np.testing.assert_allclose(grid, grids.sel(task_key=task).values, rtol=1e-6)
        assert abs(np.sum(grid) - 1) < 1e-4  # renormalised camera grids
    assert result["worker_memory_bytes"] < result["worker_memory_limit"]
