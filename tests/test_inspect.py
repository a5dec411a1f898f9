"""``attnstore inspect`` on stores and legacy files: the counts it prints match what was written."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from attnstore.cli import main
from attnstore.legacy.inspect_pt import inspect_path
from synthetic import make_spec, write_synthetic_store

SMALL = dict(num_language=12, num_action=4, grid=4, num_heads=2, image_size=32)
EPISODES = {0: 5, 1: 3, 2: 2}


def _disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _episode_lines(text: str) -> dict[int, list[str]]:
    section = text.split("\nEpisodes\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return {int(line.split()[0]): line.split() for line in section}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "attention.zarr"
    spec = make_spec(**SMALL)
    return write_synthetic_store(path, spec, episodes=EPISODES, batch_size=2, finish_episodes={0, 1})


def test_store_summary_counts(store, capsys):
    text = inspect_path(store["path"])
    assert main(["inspect", str(store["path"])]) == 0
    assert capsys.readouterr().out.strip() == text.strip()

    assert "status:       closed" in text
    assert "episodes:     3 (2 complete, 1 incomplete)" in text
    assert f"inferences:   {len(store['rows'])}" in text
    assert "layers:        [16, 17] of 18" in text and "heads:         2" in text
    assert "denoise steps: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] of 10" in text
    assert "times t:       [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]" in text
    assert "attention:     (10, 10, 2, 2, 4, 64)" in text
    # 3 camera slots of 4x4 patches + 12 language tokens; 4 action tokens
    assert "prefix_len:    60" in text and "suffix_len:    4" in text
    assert "encoding:     uint16" in text
    assert re.search(r"empty_camera_0\s+keys\s+32-47\s+4x4 patches, missing", text)
    assert re.search(r"language\s+keys\s+48-59", text) and re.search(r"action\s+keys\s+60-63", text)
    size = float(re.search(r"size on disk: ([\d.]+) kB", text).group(1))
    assert size == pytest.approx(_disk_bytes(store["path"]) / 1e3, abs=0.06)

    lines = _episode_lines(text)
    assert sorted(lines) == [0, 1, 2]
    for ep, n in EPISODES.items():
        cols = lines[ep]
        assert int(cols[1]) == n and cols[2] == f"0-{10 * (n - 1)}"
        t = store["episodes"][ep]
        if t["finished"]:
            assert cols[3:6] == ["yes", str(t["success"]).lower(), str(t["num_env_steps"])]
            assert f"libero_object_{t['task_id']}: {t['task']}" in " ".join(cols)
        else:
            assert cols[3] == "no" and "(no episode record)" in " ".join(cols)
    assert "task_group: libero_object" in text and "n_action_steps: 10" in text


@pytest.mark.parametrize("status", ["writing", "interrupted"])
def test_store_status(tmp_path, status):
    spec = make_spec(**SMALL, images=False, actions=False)
    write_synthetic_store(tmp_path / "s.zarr", spec, episodes={0: 2}, finish_episodes=False, status=status)
    text = inspect_path(tmp_path / "s.zarr")
    assert {"writing": "writing, or killed", "interrupted": "interrupted"}[status] in text
    assert "episodes:     1 (0 complete, 1 incomplete)" in text


def test_store_inspect_reads_no_attention(store, tmp_path):
    """Inspect works with every attention chunk gone: it reads only indices, table and metadata."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store["path"], copy)
    shutil.rmtree(copy / "attention" / "c")
    text = inspect_path(copy)
    assert f"inferences:   {len(store['rows'])}" in text and "(2 complete, 1 incomplete)" in text


def test_bad_paths(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstore: error:") and "\n" not in err


@pytest.mark.lerobot
def test_legacy_file_and_folder(store, tmp_path, capsys):
    import torch

    # a guide-style file built directly (whole-matrix "total_seq" layout, bfloat16)
    probs = torch.full((1, 8, 1018, 1018), 1 / 1018).to(torch.bfloat16)
    entries = [
        {"rollout_step": s, "attention_maps": {d: {"time": 1.0 - d / 9, "prefix_len": 968, "suffix_len": 50,
                                                   "attention_weights": {16: probs, 17: probs}} for d in (0, 9)}}
        for s in (0, 10, 20, 30)
    ]
    folder = tmp_path / "attention" / "libero_object_0"
    folder.mkdir(parents=True)
    guide = folder / "episode_00004_attention.pt"
    torch.save({"rollout_steps": entries,
                "metadata": {"episode_index": 4, "num_rollout_steps": 4, "num_denoising_steps": 2}}, guide)
    text = inspect_path(guide)
    for needle in ("Episode Index: 4", "Number of rollout steps: 4", "Number of denoising steps per action: 2",
                   "Entries (rollout steps) in file: 4", "rollout_step values: 0 .. 30 (spacing [10])",
                   "Time: t=0.000", "Prefix length (visual+language tokens): 968", "Suffix length (action tokens): 50",
                   "Layers saved: 16, 17", "Layer 17 attention shape: (1, 8, 1018, 1018) bfloat16",
                   "total_seq=1018", "key = prefix_len + suffix_len = 968 + 50"):
        assert needle in text, needle
    size = float(re.search(r"File Size: ([\d.]+) MB", text).group(1))
    assert size == pytest.approx(guide.stat().st_size / 1e6, abs=0.06)

    # an exported file next to it, and a broken one: the folder lists all three, exit status 1
    assert main(["export-pt", str(store["path"]), str(tmp_path / "attention"), "--episodes", "1", "--no-progress"]) == 0
    (tmp_path / "attention" / "libero_object_0" / "episode_00009_attention.pt").write_bytes(b"\x00garbage")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "attention")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"Found 3 attention map files in {tmp_path / 'attention'}")
    assert "Layer 16 attention shape: (1, 2, 4, 64) float32" in out  # the exported episode 1
    assert "Number of rollout steps: 3" in out and "one entry per inference" in out
    assert "saved with batch" not in out  # the export's layers share one storage per inference, all of it viewed
    assert "UNREADABLE" in out and "episode_00009_attention.pt" in out and "1 unreadable" in out


@pytest.mark.lerobot
def test_legacy_fork_file(tmp_path, capsys):
    """A file as the fork's lerobot_eval.py writes it: top-level episode/batch index, all 18 layers, cuda:0."""
    from fork_pt import KeyLayout, write_fork_rollout

    layout = KeyLayout(patches=16, num_language=12, valid_language=5, suffix_len=4)
    paths, _ = write_fork_rollout(tmp_path / "attention" / "libero_object_2", [0, 10, 20, 30], num_envs=2, batch_ix=3,
                                  heads=2, layout=layout)
    text = inspect_path(paths[1])
    for needle in ("fork layout", "Episode Index: 7", "Batch Index: 1", "Number of rollout steps: 4",
                   "Number of denoising steps per action: 10", "rollout_step values: 0 .. 30 (spacing [10])",
                   "Time: t=0.100", "Prefix length (visual+language tokens): 60", "Suffix length (action tokens): 4",
                   "Layers saved: " + ", ".join(map(str, range(18))),
                   "Layers 0..17 attention shape: (1, 2, 4, 64) bfloat16 (each)", "x 18 layers",
                   "saved with batch 2"):
        assert needle in text, needle
    assert main(["inspect", str(tmp_path / "attention")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Found 2 attention map files in {tmp_path / 'attention'}") and "Episode Index: 6" in out
