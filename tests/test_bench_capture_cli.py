"""bench/bench_capture.py: its flags, its full-size depth override, and a tiny end-to-end run (~15 s)."""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_capture.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_capture", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_docstring_examples_run():
    result = doctest.testmod(_load_bench(), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_reproduce_command_quotes_arguments():
    bench = _load_bench()
    got = bench.reproduce_command(["bench/bench_capture.py", "--device", "cuda:0", "--x", "a b"], "/opt/py", {})
    assert got == "HF_HUB_OFFLINE=1 /opt/py bench/bench_capture.py --device cuda:0 --x 'a b'"


@pytest.mark.lerobot
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile", "--full-size"], "--compile checks the tiny model on CPU only"),
        (["--full-size", "--depth", "19"], "at most 18"),
        (["--inferences", "0"], "--inferences must be >= 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_bad_flags_fail_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _load_bench().main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


@pytest.mark.lerobot
def test_cuda_without_a_gpu_is_refused(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        _load_bench().main(["--full-size", "--device", "cuda"])
    assert exc.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.lerobot
def test_gemma_depth_shrinks_only_depth_and_restores():
    pytest.importorskip("lerobot")
    from lerobot.policies.pi05 import modeling_pi05

    bench = _load_bench()
    original = modeling_pi05.get_gemma_config
    with bench.gemma_depth(3):
        vlm, expert = modeling_pi05.get_gemma_config("gemma_2b"), modeling_pi05.get_gemma_config("gemma_300m")
    # lerobot 0.6.1's numbers (FINDINGS.md section 3): only depth changes
    assert (vlm.depth, vlm.width, vlm.mlp_dim, vlm.head_dim) == (3, 2048, 16_384, 256)
    assert (expert.depth, expert.width, expert.mlp_dim) == (3, 1024, 4096)
    assert modeling_pi05.get_gemma_config is original
    assert original("gemma_2b").depth == 18
    with bench.gemma_depth(None):
        assert modeling_pi05.get_gemma_config is original


@pytest.mark.lerobot
def test_tiny_run_with_layers_only_prints_its_rows(capsys):
    pytest.importorskip("lerobot")
    argv = ["--reps", "1", "--inferences", "1", "--depth", "2", "--layers-only", "last-2"]
    assert _load_bench().main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"^(off|last-2|all) ", line)}
    assert set(rows) == {"off", "last-2"}
    assert rows["off"][2] == "1.000" and rows["off"][4] == "1.000"  # its own ratios
    assert float(rows["last-2"][-1]) > 0  # MB per row on disk: the store was really written
    assert "tiny Pi0.5 (2 layers) on CPU" in out
