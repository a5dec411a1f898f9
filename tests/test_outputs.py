"""Unwritable outputs and damaged checkpoints: one ``attnstore: error:`` line, exit 2, nothing written.

Every command that writes files checks its output folder before the work starts
(:func:`attnstore.outputs.check_writable_dir`). We run as root in CI, so a ``chmod 555`` folder is
writable and proves nothing: the bad locations are real ones, a path under a file (``file/sub``), a path
that is a file, a read-only tmpfs mount (skipped where mounting is not permitted) and ``/proc``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnstore.cli import main
from attnstore.errors import StoreError
from attnstore.outputs import check_writable_dir
from synthetic import make_spec, write_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "attention.zarr"
    spec = make_spec(num_language=6, num_action=3, grid=4, num_heads=2, image_size=56, layers=(0, 1),
                     num_layers=2, denoise_steps=(0, 9))
    write_synthetic_store(path, spec, episodes={0: 3, 1: 2})
    return path


@pytest.fixture(scope="module")
def readonly_mount(tmp_path_factory):
    """A read-only tmpfs (root cannot write there either), or a skip saying why there is none."""
    where = tmp_path_factory.mktemp("ro")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def bad_locations(kind: str, a_file: Path, request) -> tuple[Path, str]:
    """(output path, what the message must name) for each kind of unwritable location."""
    if kind == "under_a_file":
        return a_file / "sub", f"{a_file} is a file"
    if kind == "is_a_file":
        return a_file, "is a file, not a folder"
    if kind == "readonly_mount":
        mount = request.getfixturevalue("readonly_mount")
        return mount / "out", f"{mount} is not writable (Read-only file system)"
    if kind == "proc":
        return Path("/proc/attnstore-no-such/out"), "/proc is not writable"
    raise AssertionError(kind)


KINDS = ["under_a_file", "is_a_file", "readonly_mount", "proc"]


def commands(store: Path, out: Path) -> dict[str, list[str]]:
    return {
        "export-pt": ["export-pt", str(store), str(out), "--no-progress"],
        "overlay": ["overlay", str(store), "--episode", "0", "--steps", "0", "--out", str(out), "--no-progress"],
        "overlay-video": ["overlay", str(store), "--episode", "0", "--video", "--out", str(out), "--no-progress"],
        "plot": ["plot", str(store), "--out", str(out)],
        "make-tiny-policy": ["make-tiny-policy", str(out)],
    }


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("attnstore: error: cannot write "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["export-pt", "overlay", "overlay-video", "plot", "make-tiny-policy"])
def test_unwritable_output_is_one_line(command, kind, store, a_file, request, capsys):
    out, named = bad_locations(kind, a_file, request)
    before = a_file.read_text()
    code = main(commands(store, out)[command])
    line = one_error_line(capsys)
    assert code == 2
    assert named in line and str(out) in line, line
    assert a_file.read_text() == before  # nothing written over it or beside it
    assert sorted(p.name for p in a_file.parent.iterdir()) == ["a_file"]


def test_make_tiny_policy_fails_before_loading_torch(a_file):
    # a fresh interpreter: the check comes before lerobot/torch are imported (instant, one line)
    code = "import sys; from attnstore.cli import main; rc = main(sys.argv[1:]); " \
           "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, "make-tiny-policy", str(a_file / "tiny")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"attnstore: error: cannot write DIR {a_file / 'tiny'}: {a_file} is a file, not a folder"
    ]


def test_the_check_creates_nothing_and_accepts_new_and_existing_folders(tmp_path):
    new = tmp_path / "a" / "b" / "c"
    assert check_writable_dir(new, "--out") == new
    assert not (tmp_path / "a").exists()  # checked through the nearest existing folder, nothing made
    assert check_writable_dir(tmp_path, "--out") == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    with pytest.raises(StoreError, match="pass --out DIR"):
        check_writable_dir("/proc/x/y", "--out", hint="pass --out DIR")


def test_writable_outputs_still_work(store, tmp_path, capsys):
    assert main(["plot", str(store), "--out", str(tmp_path / "new" / "plots")]) == 0
    assert len(list((tmp_path / "new" / "plots").glob("*.png"))) >= 3
    assert main(["overlay", str(store), "--episode", "0", "--steps", "0", "--out", str(tmp_path / "ov"),
                 "--no-progress"]) == 0
    assert list((tmp_path / "ov").rglob("*.png"))


# ---- a damaged checkpoint -------------------------------------------------------------------------
def fake_checkpoint(path: Path, truncate_to: int | None) -> Path:
    """The files of a lerobot Pi0.5 checkpoint with a real safetensors file, cut to ``truncate_to`` bytes."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"type": "pi05"}))
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        (path / name).write_text("{}")
    file = path / "model.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32), "b": np.ones(100, np.float32)}, str(file))
    if truncate_to is not None:
        data = file.read_bytes()
        file.write_bytes(data[: truncate_to if truncate_to >= 0 else len(data) + truncate_to])
    return path


@pytest.mark.parametrize("cut", [-1000, 40, 5, 0], ids=["data", "header", "length", "empty"])
def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, cut, capsys):
    pytest.importorskip("safetensors")
    ckpt = fake_checkpoint(tmp_path / "ckpt", cut)
    code = main(["eval", f"--policy.path={ckpt}", "--env.type=libero", "--env.task=libero_object",
                 f"--output_dir={tmp_path / 'out'}"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2
    assert lines == [lines[0]] and lines[0].startswith(f"attnstore: error: {ckpt / 'model.safetensors'} is truncated"), lines
    assert "copy or download the checkpoint again" in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_whole_safetensors_passes_the_check(tmp_path):
    pytest.importorskip("safetensors")
    from attnstore.capture.checkpoint import check_safetensors

    ckpt = fake_checkpoint(tmp_path / "ckpt", None)
    assert check_safetensors(ckpt / "model.safetensors") == ckpt / "model.safetensors"


@pytest.mark.lerobot
def test_load_policy_refuses_a_truncated_checkpoint(tmp_path):
    from attnstore.capture.checkpoint import resolve
    from attnstore.errors import CaptureError

    ckpt = fake_checkpoint(tmp_path / "ckpt", -10)
    with pytest.raises(CaptureError, match="is truncated or damaged"):
        resolve(str(ckpt))


def test_root_is_not_fooled_by_permission_bits(tmp_path):
    # as root a chmod 555 folder IS writable: the check must say yes there (it tries, it does not guess)
    folder = tmp_path / "r"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            assert check_writable_dir(folder / "x") == folder / "x"
        else:
            with pytest.raises(StoreError, match="is not writable"):
                check_writable_dir(folder / "x")
    finally:
        folder.chmod(0o755)
