"""Many runs as one study, on local disk and on a real S3-compatible server (moto_server on 127.0.0.1):
URLs for every entry point, open_study, pack, and one-line errors for bad URLs, buckets and credentials.

Expected values come from opening each run on its own (open_attention, itself tested against the data
written) or from the synthetic ground truth, never from the study code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from attnstore import open_attention, open_study
from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.readers import region_shares
from synthetic import make_spec, write_synthetic_store

TESTS = Path(__file__).parent


def small_spec(**kw):
    return make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=4, **kw)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three runs as ``attnstore eval-study`` lays them out; run c never finished episode 2 (killed)."""
    root = tmp_path_factory.mktemp("study")
    truths = {}
    for i, name in enumerate(("a", "b", "c")):
        truths[name] = write_synthetic_store(
            root / "runs" / name / "attention.zarr", small_spec(), episodes={0: 3, 1: 2, 2: 2}, seed=i,
            finish_episodes={0, 1} if name == "c" else True, status="writing" if name == "c" else "closed",
        )
    return root, truths


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def assert_one_line_error(out, *needles):
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnstore: error: "), out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- local ------------------------------------------------------------------------------------------
def test_study_is_every_run_with_a_run_coordinate(study):
    root, truths = study
    ds = open_study(root)
    assert ds.sizes[S.INFERENCE] == sum(len(t["rows"]) for t in truths.values())
    assert sorted(set(ds.run.values.tolist())) == ["a", "b", "c"]
    for name, truth in truths.items():
        one = open_attention(root / "runs" / name / "attention.zarr")
        part = ds.attention.sel(run=name)
        np.testing.assert_array_equal(part.values, one.attention.values)
        for episode, rollout in truth["rows"]:
            np.testing.assert_array_equal(
                ds.attention.sel(run=name, episode=episode, rollout=rollout).values,
                one.attention.sel(episode=episode, rollout=rollout).values)
    assert ds.run_status.sel(run_index="c").item() == "writing"
    assert sorted(ds.attrs["attnstore_runs"]) == ["a", "b", "c"]


def test_outcome_and_task_join_the_episode_tables(study):
    root, truths = study
    ds = open_study(root)
    for (run, ep), outcome, task in zip(zip(ds.run.values, ds.episode.values), ds.outcome.values, ds.task_key.values):
        info = truths[run]["episodes"][int(ep)]
        expected = ("success" if info["success"] else "failure") if info["finished"] else "unfinished"
        assert outcome == expected
        assert task == (f"{info['task_group']}_{info['task_id']}" if info["finished"] else "")
    assert ds.episode_run.values.tolist().count("c") == 2  # c's table has its two finished episodes


def test_analyses_work_on_a_study_and_group_by_outcome_and_run(study):
    root, _ = study
    ds = open_study(root).sel(layer=17, denoise=9)
    shares = region_shares(ds).compute()
    separately = np.concatenate([
        region_shares(open_attention(root / "runs" / n / "attention.zarr").sel(layer=17, denoise=9)).values
        for n in ("a", "b", "c")
    ])
    np.testing.assert_allclose(shares.values, separately, rtol=1e-6)
    by_outcome = shares.groupby("outcome").mean()
    mask = shares.outcome.values == "failure"
    np.testing.assert_allclose(by_outcome.sel(outcome="failure").values, separately[mask].mean(axis=0), rtol=1e-5)
    assert set(shares.groupby("run").mean().run.values) == {"a", "b", "c"}


def test_a_study_reduction_has_a_small_graph(study):
    root, _ = study
    ds = open_study(root)
    graph = region_shares(ds.sel(layer=17, denoise=9)).groupby("outcome").mean()
    assert len(dict(graph.__dask_graph__())) < 2000


def test_runs_with_other_layers_are_refused_unless_common(tmp_path, study):
    root, _ = study
    other = tmp_path / "other" / "attention.zarr"
    write_synthetic_store(other, small_spec(layers=(15, 17)), episodes={0: 2})
    sources = [root / "runs" / "a" / "attention.zarr", other]
    with pytest.raises(StoreError, match=r"runs differ in layers: a has \[16, 17\], other has \[15, 17\]"):
        open_study(sources)
    ds = open_study(sources, common=True)
    assert ds.layer.values.tolist() == [17]
    np.testing.assert_array_equal(ds.attention.sel(run="other").values,
                                  open_attention(other).attention.sel(layer=[17]).values)
    odd = tmp_path / "odd" / "attention.zarr"
    write_synthetic_store(odd, make_spec(num_language=5, num_action=3, grid=2, num_heads=2, image_size=4),
                          episodes={0: 1})
    with pytest.raises(StoreError, match="differ in layout"):
        open_study([sources[0], odd], common=True)


def test_a_glob_and_a_list_select_runs(study):
    root, _ = study
    assert sorted(set(open_study(str(root / "runs" / "[ab]" / "attention.zarr")).run.values)) == ["a", "b"]
    with pytest.raises(StoreError, match="no attnstore stores found"):
        open_study(str(root / "nothing*"))


def test_study_reads_runs_while_two_processes_write_and_one_is_killed(tmp_path):
    """Two writer processes at once, no coordination; the study sees committed rows only, during and after."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        import numpy as np
        from synthetic import make_spec, synthetic_batch
        from attnstore.store.writer import AttentionWriter
        from attnstore.schema import EpisodeRecord
        spec = make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=4)
        rng = np.random.default_rng(int(sys.argv[2]))
        with AttentionWriter(sys.argv[1], spec) as w:
            for ep in range(100):
                for r in range(3):
                    w.append(synthetic_batch(spec, rng, [ep], [10 * r])); w.flush()
                    print(ep, r, flush=True); time.sleep(0.02)
                w.end_episode(EpisodeRecord(ep, task_group="libero_object", task_id=0, success=True,
                                            num_env_steps=30))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "runs" / n / "attention.zarr"), str(i)],
                              stdout=subprocess.PIPE, text=True) for i, n in enumerate(("x", "y"))]
    try:
        for p in procs:
            for _ in range(6):
                p.stdout.readline()
        seen = []
        for _ in range(5):
            ds = open_study(tmp_path)
            seen.append(ds.sizes[S.INFERENCE])
            assert np.isfinite(ds.attention.values).all()
            np.testing.assert_allclose(ds.attention.sum("key").values, 1.0, atol=5e-3)
            time.sleep(0.2)
        assert seen == sorted(seen) and seen[-1] > seen[0]
        procs[0].kill()
        procs[0].wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ds = open_study(tmp_path)
    for name in ("x", "y"):
        one = open_attention(tmp_path / "runs" / name / "attention.zarr")
        np.testing.assert_array_equal(ds.attention.sel(run=name).values, one.attention.values)


def test_pack_rewrites_with_few_objects_and_identical_contents(study, tmp_path):
    root, truths = study
    src = root / "runs" / "a" / "attention.zarr"
    dest = tmp_path / "a_packed.zarr"
    out = cli("pack", src, dest)
    assert out.returncode == 0, out.stderr
    xr.testing.assert_identical(open_attention(src).load(), open_attention(dest).load())
    plain = xr.open_zarr(dest)  # plain xarray reads the packed layout too
    np.testing.assert_allclose(plain.attention.values, truths["a"]["attention"], atol=S.MAX_ABS_ERROR["uint16"])
    # objects per inference: the packed per-inference arrays are one shard each
    rows = len(truths["a"]["rows"])
    per_row = [p for p in os.listdir(dest) if (dest / p / "c").is_dir() and p in
               (S.ATTENTION, S.KEY_VALID, S.IMAGES, S.ACTIONS, S.LANGUAGE_TOKEN_ID, S.LANGUAGE_TOKEN_TEXT)]
    objects = sum(sum(1 for f in (dest / p / "c").rglob("*") if f.is_file()) for p in per_row)
    assert objects / rows <= 1.0 and len(per_row) >= 5  # 7 rows, one shard per array
    again = cli("pack", src, dest)
    assert_one_line_error(again, "already exists")
    writing = cli("pack", root / "runs" / "c" / "attention.zarr", tmp_path / "c.zarr")
    assert_one_line_error(writing, "still being written")


# ---- S3 (a real S3-compatible server) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bucket(s3, study):
    root, _ = study
    name = s3.make_bucket("attnstore-study")
    s3.filesystem().put(str(root / "runs"), f"{name}/study/runs", recursive=True)
    return f"s3://{name}/study"


def test_open_attention_and_open_study_read_s3(s3, bucket, study):
    root, _ = study
    remote = open_attention(f"{bucket}/runs/a/attention.zarr", storage_options=s3.storage_options)
    xr.testing.assert_identical(remote.load(), open_attention(root / "runs" / "a" / "attention.zarr").load())
    ds = open_study(bucket, storage_options=s3.storage_options)
    local = open_study(root)
    assert ds.run.values.tolist() == local.run.values.tolist()
    np.testing.assert_array_equal(ds.attention.values, local.attention.values)


def test_cli_reads_urls_with_the_standard_environment(s3, bucket, tmp_path):
    env = s3.env()
    out = cli("inspect", f"{bucket}/runs/b/attention.zarr", env=env)
    assert out.returncode == 0, out.stderr
    assert "Attention store: s3://" in out.stdout and "episodes:     3" in out.stdout
    packed = f"{bucket}/packed/b.zarr"
    out = cli("pack", f"{bucket}/runs/b/attention.zarr", packed, env=env)
    assert out.returncode == 0, out.stderr
    import s3fs  # noqa: F401

    a = open_attention(f"{bucket}/runs/b/attention.zarr", storage_options=s3.storage_options)
    b = open_attention(packed, storage_options=s3.storage_options)
    xr.testing.assert_identical(a.load(), b.load())
    opts = [f"--storage-option=endpoint_url={s3.endpoint}", "--storage-option=key=testing",
            "--storage-option=secret=testing"]
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = cli("inspect", f"{bucket}/runs/b/attention.zarr", *opts, env=bare)
    assert out.returncode == 0, out.stderr


def test_bad_urls_give_one_line(s3, bucket):
    env = s3.env()
    assert_one_line_error(cli("inspect", "s3://no-such-bucket-here/x/attention.zarr", env=env),
                          "s3://no-such-bucket-here/x/attention.zarr")
    assert_one_line_error(cli("inspect", f"{bucket}/runs/missing/attention.zarr", env=env), "does not exist")
    assert_one_line_error(cli("inspect", f"{bucket}/runs/a/attention.zarr", "--storage-option", "oops", env=env),
                          "KEY=VALUE")


def test_wrong_credentials_give_one_line(tmp_path):
    """A second server that authenticates every request: unknown keys are refused."""
    pytest.importorskip("moto")
    from s3server import start_server, stop_server

    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        server = start_server()
    finally:
        os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        env = {**server.env(), "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
        out = cli("inspect", "s3://some-bucket/run/attention.zarr", env=env)
        assert_one_line_error(out, "s3://some-bucket/run/attention.zarr")
        assert any(w in out.stderr for w in ("access denied", "credentials", "InvalidAccessKeyId", "denied"))
    finally:
        stop_server(server)


def test_eval_to_an_object_store_is_refused_with_the_way_to_get_there():
    from attnstore.errors import EvalConfigError
    from attnstore.evaluation.config import AttentionConfig

    with pytest.raises(EvalConfigError, match=r"attnstore pack STORE s3://lab/run/attention.zarr"):
        AttentionConfig(store="s3://lab/run/attention.zarr")
    assert str(AttentionConfig(store="file:///tmp/run/attention.zarr").store) == "/tmp/run/attention.zarr"
