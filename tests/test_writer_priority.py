"""The writer's encoding yields the CPU to the policy (store/priority.py): real threads, real nice values.

Run in a subprocess: a nice value cannot be lowered again by an unprivileged process, so the pytest
process's own zarr threads are left as they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnstore.errors import WriterError
from attnstore.store.writer import AttentionWriter

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice values are Linux's")

TESTS = Path(__file__).parent

PROBE = r"""
import json, os, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[2])
from synthetic import make_spec, synthetic_batch
from attnstore.store.writer import AttentionWriter

def nice(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)

# the real attention row size (8 MB of uint16, several 1 MiB blosc blocks): B = 1 compresses with blosc's pool
spec = make_spec(layers=(0,), num_layers=1, image_size=8)
nice_arg = None if sys.argv[3] == "none" else int(sys.argv[3])
# blosc's pool already started by the main thread (at its priority), as an earlier read or write might have
from numcodecs import blosc
blosc.use_threads, _ = True, blosc.set_nthreads(2)
blosc.compress(np.zeros(4 << 20, np.uint8).tobytes(), b"zstd", 1, 1, 1, 1 << 20)
blosc.use_threads = None
with AttentionWriter(sys.argv[1], spec, nice=nice_arg, encode_threads=2) as writer:
    rng = np.random.default_rng(0)
    for step in (0, 10):
        writer.append(synthetic_batch(spec, rng, [0], [step]))
    writer.flush()
    threads = {t.name: nice(t.native_id) for t in threading.enumerate()}
    python = {t.native_id for t in threading.enumerate()}
    others = [nice(int(t)) for t in os.listdir("/proc/self/task") if int(t) not in python]
    tasks = {int(t): nice(int(t)) for t in os.listdir("/proc/self/task")}
print(json.dumps({"threads": threads, "others": others, "main": nice(threading.main_thread().native_id),
                  "tasks": sorted(tasks.values())}))
"""


def probe(tmp_path: Path, nice: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "a.zarr"), str(TESTS), nice],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_nice_writer_lowers_its_own_and_zarrs_threads_and_leaves_the_callers(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    got = probe(tmp_path, "7")
    threads = got["threads"]
    assert threads["attnstore-writer"] == max(7, base)
    zarr = {name: n for name, n in threads.items() if name == "zarr_io" or name.startswith("zarr_pool")}
    assert zarr and all(n == max(7, base) for n in zarr.values()), threads
    assert got["main"] == base  # the caller (the policy's thread) keeps its priority
    # blosc's pool (native threads, started by a zarr worker at the first threaded compression) inherits it
    assert got["others"].count(max(7, base)) >= 2, got["others"]


def test_without_nice_every_thread_keeps_the_process_priority(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    got = probe(tmp_path, "none")
    assert set(got["tasks"]) == {base}


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True])
def test_a_nice_value_out_of_range_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(WriterError, match=r"nice must be 0\.\.19"):
        AttentionWriter(tmp_path / "a.zarr", nice=bad)
    assert not (tmp_path / "a.zarr").exists()
