"""A kill at every write: a small writer run is SIGKILLed just before its k-th store write, for every k.

Each write of zarr's local store (``LocalStore.set``) and each rewrite of the readers' snapshot counts.
A reference run (same data, no kill) records after every write how many rows the snapshot shows. For a
kill before write k the store must then either

* open with exactly the rows the snapshot showed after write k-1, equal to the reference data, with plain
  ``xr.open_zarr`` agreeing (no "conflicting sizes"), or
* not exist yet (killed while it was being built beside its path): ``open_attention`` says so in one
  line, and a new writer creates it (removing the leftovers).

The runs are forked from one driver process that imports everything but never starts zarr's I/O thread,
so each run costs a fork, not an interpreter start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from attnstore import schema as S
from attnstore.errors import AttnStoreError
from attnstore.store.open import open_attention
from attnstore.store.writer import AttentionWriter
from synthetic import make_spec

TESTS = Path(__file__).parent

DRIVER = textwrap.dedent(
    r"""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import numpy as np
    import zarr.storage
    from attnstore.store import snapshot
    import synthetic as syn

    work = Path({work!r})
    spec = syn.make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=4, layers=(0,),
                         num_layers=1, denoise_steps=(0, 9))

    def run(path, kill_at, log):
        count = [0]
        events = []

        def before_write(what):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def after_write(what):
            if log:
                root = path / "zarr.json"
                rows = None
                if root.is_file():
                    meta = json.loads(root.read_text()).get("consolidated_metadata")
                    if meta:
                        rows = meta["metadata"]["episode"]["shape"][0]
                events.append([what, rows])

        for name in ("set", "set_if_not_exists"):
            original = getattr(zarr.storage.LocalStore, name)

            def patched(self, key, value, *a, _original=original, **kw):
                async def go():
                    before_write(key)
                    result = await _original(self, key, value, *a, **kw)
                    after_write(key)
                    return result
                return go()

            setattr(zarr.storage.LocalStore, name, patched)
        write = snapshot.Snapshot._write

        def counted_write(self):
            before_write("snapshot")
            write(self)
            after_write("snapshot")

        snapshot.Snapshot._write = counted_write
        syn.write_synthetic_store(path, spec, episodes={{0: 2, 1: 2}}, seed=3)
        if log:
            (work / "events.json").write_text(json.dumps(events))

    def fork_run(path, kill_at, log=False):
        pid = os.fork()
        if pid == 0:
            try:
                run(path, kill_at, log)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return status

    fork_run(work / "reference.zarr", kill_at=-1, log=True)
    n = len(json.loads((work / "events.json").read_text()))
    for k in range(1, n + 1):
        status = fork_run(work / f"kill_{{k:03d}}.zarr", kill_at=k)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
    print(n)
    """
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    script = DRIVER.format(tests=str(TESTS), work=str(work))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    events = json.loads((work / "events.json").read_text())
    return work, events


def test_the_sweep_covers_creation_appends_episodes_and_close(sweep):
    work, events = sweep
    keys = [k for k, _ in events]
    assert len(keys) > 60
    assert "snapshot" in keys and any(k.startswith("attention/c") for k in keys)
    assert any(k.startswith("episode_index/c") for k in keys)
    assert keys[-1] == "snapshot"  # close: the final status, in the snapshot
    assert len(sorted(work.glob("kill_*.zarr"))) + sum(1 for _ in work.glob(".kill_*")) >= 1


def test_every_kill_leaves_a_clean_state(sweep):
    work, events = sweep
    reference = open_attention(work / "reference.zarr")
    ref_rows = list(zip(reference.episode.values.tolist(), reference.rollout.values.tolist()))
    ref_attention = reference.attention.values
    spec = make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=4, layers=(0,),
                     num_layers=1, denoise_steps=(0, 9))
    states = {"absent": 0, "opened": 0}
    for k in range(1, len(events) + 1):
        path = work / f"kill_{k:03d}.zarr"
        visible = next((rows for _, rows in reversed(events[: k - 1]) if rows is not None), None)
        if not path.exists():  # killed before the store was renamed into place
            assert visible is None, f"kill before write {k}: the store vanished after it was in place"
            with pytest.raises(AttnStoreError, match="does not exist"):
                open_attention(path)
            with AttentionWriter(path, spec):  # recoverable: a new run creates it and clears the leftovers
                pass
            assert not list(work.glob(f".{path.name}.*")), f"kill before write {k}: leftovers stay"
            states["absent"] += 1
            continue
        visible = visible or 0  # in place, nothing appended yet
        ds = open_attention(path)
        rows = list(zip(ds.episode.values.tolist(), ds.rollout.values.tolist()))
        assert rows == ref_rows[: len(rows)], f"kill before write {k}: rows {rows}"
        assert len(rows) == visible, f"kill before write {k}: {len(rows)} rows, the snapshot showed {visible}"
        np.testing.assert_array_equal(ds.attention.values, ref_attention[: len(rows)])
        plain = xr.open_zarr(path)
        assert plain.sizes[S.INFERENCE] == visible
        states["opened"] += 1
    assert states["absent"] >= 1 and states["opened"] >= 40, states
