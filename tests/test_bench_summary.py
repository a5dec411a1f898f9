"""bench/bench_summary.py: one short run prints its table, after checking the current summaries against the
previous formulation it keeps for the side-by-side figure (~20 s)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_summary.py"


@pytest.mark.lerobot
def test_short_run_prints_every_variant(capsys):
    pytest.importorskip("lerobot")
    import torch

    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_summary", BENCH)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(["--repeats", "1", "--malloc", "glibc"]) == 0  # glibc: no re-exec of pytest
    finally:
        sys.path.remove(str(BENCH.parent))
    assert torch.get_num_threads() == threads  # it times on one thread; the rest of the suite must not inherit that
    out = capsys.readouterr().out
    assert "60 blocks per model run ((1, 8, 50, 1018) float32 each)" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    names = set(rows)
    assert {"previous", "quantise (held path)"} <= names, names
    assert len([n for n in names if n.startswith("current (") and n.endswith(" log, chosen)")]) == 1, names
    assert len([n for n in names if n.startswith("current with ")]) == 1, names
    assert all(float(cells[0]) > 0 for name, cells in rows.items() if name != "variant")

