"""Legacy ``.pt`` export and import, against ground truth written through the real AttentionWriter.

Expected values come from tests/synthetic.py's ground truth (what was handed to the writer) or from
legacy files built here with torch directly, never from the export/import code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnstore import open_attention
from attnstore import schema as S
from attnstore.cli import main
from synthetic import make_spec, num_env_steps_of, truth_index, write_synthetic_store

pytestmark = pytest.mark.lerobot  # needs torch

SMALL = dict(num_language=12, num_action=4, grid=4, num_heads=2, image_size=32)
EPISODES = {0: 5, 1: 3, 2: 2}  # ragged; episode 2 is left unfinished (no table row) below
BF16_REL = 4e-3  # bfloat16 keeps 8 significant bits: relative rounding error <= 2**-9


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store per (encoding, batch size): ragged episodes, the last one unfinished."""
    root = tmp_path_factory.mktemp("legacy")
    out = {}
    for encoding, batch_size in (("uint16", 2), ("float32", 1)):
        spec = make_spec(encoding=encoding, **SMALL)
        path = root / f"{encoding}_b{batch_size}.zarr"
        out[encoding] = write_synthetic_store(
            path, spec, episodes=EPISODES, batch_size=batch_size, seed=7, finish_episodes={0, 1}
        )
    return out


def _expected_pt(truth, episode):
    """Rows of one episode in rollout order, from the ground truth."""
    return [truth_index(truth, episode, r) for r in range(EPISODES[episode])]


@pytest.mark.parametrize("encoding", ["uint16", "float32"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_matches_truth_and_import_restores_store(stores, tmp_path, encoding, dtype):
    truth = stores[encoding]
    spec = truth["spec"]
    err = S.MAX_ABS_ERROR[encoding]
    out = main(["export-pt", str(truth["path"]), str(tmp_path / "pt"), "--dtype", dtype, "--no-progress"])
    assert out == 0
    files = sorted((tmp_path / "pt").rglob("*.pt"))
    assert [f.relative_to(tmp_path / "pt").as_posix() for f in files] == [
        "libero_object_0/episode_00000_attention.pt",
        "libero_object_1/episode_00001_attention.pt",
        "libero_object_unknown/episode_00002_attention.pt",  # no table row: task group from the run attrs
    ]

    # the .pt files themselves, read with plain torch, against what was written
    want_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    for f, ep in zip(files, (0, 1, 2)):
        data = _load(f)
        meta = data["metadata"]
        assert (meta["episode_index"], meta["num_rollout_steps"], meta["num_denoising_steps"]) == (ep, EPISODES[ep], 10)
        assert len(data["rollout_steps"]) == EPISODES[ep]
        for r, row in enumerate(_expected_pt(truth, ep)):
            entry = data["rollout_steps"][r]
            assert entry["rollout_step"] == truth["env_step"][row] == 10 * r
            assert sorted(entry["attention_maps"]) == list(range(10))
            for d in range(10):
                dmap = entry["attention_maps"][d]
                assert dmap["time"] == pytest.approx(1.0 - d / 10, abs=1e-6)
                assert dmap["prefix_len"] == 3 * 16 + 12 and dmap["suffix_len"] == 4
                assert sorted(dmap["attention_weights"]) == [16, 17]
                for li, layer in enumerate((16, 17)):
                    t = dmap["attention_weights"][layer]
                    assert t.dtype == want_dtype and tuple(t.shape) == (1, 2, 4, 64)
                    got = t[0].float().numpy()
                    ref = truth["attention"][row, d, li]
                    tol = err + (BF16_REL * np.abs(ref) if dtype == "bfloat16" else 0)
                    assert np.all(np.abs(got - ref) <= tol)
                    assert np.all(got[..., ~truth["key_valid"][row]] == 0)  # masked keys stay exactly 0

    # back into a store, with the same encoding
    back = tmp_path / "back.zarr"
    assert main(["import-pt", str(tmp_path / "pt"), str(back), "--encoding", encoding, "--no-progress"]) == 0
    ds = open_attention(back)
    got_spec = S.StoreSpec.from_dict(ds.attrs["attnstore_spec"])
    assert got_spec.layout == spec.layout and got_spec.layers == spec.layers
    assert got_spec.denoise_steps == spec.denoise_steps and np.allclose(got_spec.times, spec.times)
    assert sorted(zip(ds.episode.values.tolist(), ds.rollout.values.tolist())) == sorted(truth["rows"])
    for ep, r in truth["rows"]:
        row = truth_index(truth, ep, r)
        sel = dict(episode=ep, rollout=r)
        got = ds.attention.sel(**sel).values
        ref = truth["attention"][row]
        # two quantisations to the same uint16 grid land on the same value; bf16 adds its rounding
        tol = err + (BF16_REL * np.abs(ref) if dtype == "bfloat16" else 0)
        assert np.all(np.abs(got - ref) <= tol)
        assert int(ds.env_step.sel(**sel)) == truth["env_step"][row]
        assert np.array_equal(ds.key_valid.sel(**sel).values, truth["key_valid"][row])
    table = {int(e): i for i, e in enumerate(ds.episode_index.values)}
    assert sorted(table) == [0, 1]  # the unfinished episode stays unfinished
    for ep in (0, 1):
        i, t = table[ep], truth["episodes"][ep]
        assert str(ds.task_group.values[i]) == "libero_object" and int(ds.task_id.values[i]) == t["task_id"]
        assert bool(ds.success.values[i]) == t["success"] and str(ds.task.values[i]) == t["task"]
        assert int(ds.num_env_steps.values[i]) == t["num_env_steps"]


def test_guide_access_pattern_runs_unchanged(tmp_path):
    """The guide's snippet, verbatim, on an exported full-size (1, 8, 50, 1018) file."""
    spec = make_spec(denoise_steps=(9,), layers=(16, 17), image_size=32)  # real key axis, 1 denoise step
    truth = write_synthetic_store(tmp_path / "s.zarr", spec, episodes={0: 16}, seed=3)
    export_dir = tmp_path / "attention"
    assert main(["export-pt", str(tmp_path / "s.zarr"), str(export_dir), "--no-progress"]) == 0
    path = str(export_dir / "libero_object_0" / "episode_00000_attention.pt")

    # ---- from pi05_attention_saving_guide.md, "Basic Access Pattern" (path substituted) ----
    data = torch.load(path)
    num_rollout_steps = data['metadata']['num_rollout_steps']  # e.g., 145
    num_denoising_steps = data['metadata']['num_denoising_steps']  # 10
    rollout_step_15 = data['rollout_steps'][15]
    step_index = rollout_step_15['rollout_step']  # Should be 15*run_chunk_step
    attention_maps = rollout_step_15['attention_maps']  # All 10 denoising steps
    final_denoise = attention_maps[9]  # t≈0.0
    time_value = final_denoise['time']
    prefix_len = final_denoise['prefix_len']  # e.g., 968
    suffix_len = final_denoise['suffix_len']  # e.g., 50
    layer_17_attention = final_denoise['attention_weights'][17]
    # ---- end of the guide's snippet ----

    assert (num_rollout_steps, num_denoising_steps) == (16, 1)
    assert step_index == 150 and time_value == pytest.approx(0.1)
    assert (prefix_len, suffix_len) == (968, 50)
    assert tuple(layer_17_attention.shape) == (1, 8, 50, 1018)
    ref = truth["attention"][truth_index(truth, 0, 15), 0, 1]
    assert np.abs(layer_17_attention[0].numpy() - ref).max() <= S.MAX_ABS_ERROR["uint16"]
    # the guide's region arithmetic: 768 camera keys (512..767 the masked dummy camera), 200 language
    assert float(layer_17_attention[0, :, :, 512:768].abs().max()) == 0.0
    assert torch.allclose(layer_17_attention.sum(-1), torch.ones(1, 8, 50), atol=1e-3)


def test_every_env_step_one_entry_per_frame(stores, tmp_path):
    truth = stores["uint16"]
    paths = {}
    from attnstore.legacy.export_pt import export_pt

    notes: list[str] = []
    for p in export_pt(truth["path"], tmp_path / "pt", every_env_step=True, progress=False, notify=notes.append):
        paths[_load(p)["metadata"]["episode_index"]] = p
    assert any("episode 2" in n and "n_action_steps" in n for n in notes)
    for ep, n in EPISODES.items():
        data = _load(paths[ep])
        frames = [e["rollout_step"] for e in data["rollout_steps"]]
        # finished: num_env_steps frames; unfinished: last inference + n_action_steps (10) frames
        n_frames = num_env_steps_of(ep, n) if ep != 2 else (n - 1) * 10 + 10
        assert frames == list(range(n_frames))
        assert data["metadata"]["num_rollout_steps"] == n_frames
        for f in (0, 9, 10, n_frames - 1):
            row = truth_index(truth, ep, f // 10)  # frame f was acted on by the inference at env step 10*(f//10)
            got = data["rollout_steps"][f]["attention_maps"][4]["attention_weights"][17][0].numpy()
            assert np.abs(got - truth["attention"][row, 4, 1]).max() <= S.MAX_ABS_ERROR["uint16"]

    # import collapses the repeats back to one row per inference, at the right env steps
    back = tmp_path / "back.zarr"
    assert main(["import-pt", *map(str, paths.values()), str(back), "--no-progress"]) == 0
    ds = open_attention(back)
    assert sorted(zip(ds.episode.values.tolist(), ds.env_step.values.tolist())) == sorted(
        (e, 10 * r) for e, r in truth["rows"]
    )
    # --keep-repeats keeps one row per frame
    assert main(["import-pt", str(paths[1]), str(tmp_path / "rep.zarr"), "--keep-repeats", "--no-progress"]) == 0
    assert open_attention(tmp_path / "rep.zarr").sizes["inference"] == num_env_steps_of(1, EPISODES[1])


def _guide_probs(rng, n_keys, rows, n_cams_present=2, n_lang=30, prefix=968, heads=2, full=False):
    """Probabilities over the LIBERO key axis built directly: 512 camera keys + 30 prompt tokens + 50 actions."""
    valid = np.zeros(n_keys, bool)
    valid[: 256 * n_cams_present] = True
    valid[768 : 768 + n_lang] = True
    valid[prefix:] = True
    w = rng.uniform(0.0, 1.0, size=(heads, rows, n_keys)) * valid
    return (w / w.sum(-1, keepdims=True)).astype(np.float32), valid


def _guide_file(path: Path, rng, *, episode, steps, denoise, layers, dtype, full=False, heads=2):
    """A legacy file exactly as the guide describes it, built with torch (no attnstore code)."""
    entries, truth = [], []
    for step in steps:
        maps, rows_truth = {}, {}
        for d in denoise:
            weights = {}
            for layer in layers:
                probs, valid = _guide_probs(rng, 1018, 1018 if full else 50, heads=heads)
                weights[layer] = torch.from_numpy(probs)[None].to(dtype)
                rows_truth[(d, layer)] = weights[layer][0, :, -50:, :].float().numpy()
            maps[d] = {"time": 1.0 - d / 9, "prefix_len": 968, "suffix_len": 50, "attention_weights": weights}
        entries.append({"rollout_step": step, "attention_maps": maps})
        truth.append(rows_truth)
    data = {
        "rollout_steps": entries,
        "metadata": {"episode_index": episode, "num_rollout_steps": len(steps), "num_denoising_steps": len(denoise)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return truth, valid


@pytest.mark.parametrize("full", [False, True], ids=["action_rows", "total_seq"])
def test_import_guide_style_file(tmp_path, full):
    rng = np.random.default_rng(1)
    denoise = tuple(range(10)) if not full else (0, 9)
    src = tmp_path / "attention" / "libero_object_3" / "episode_00007_attention.pt"
    truth, valid = _guide_file(src, rng, episode=7, steps=[0, 10, 20], denoise=denoise, layers=(16, 17),
                               dtype=torch.bfloat16, full=full)
    store = tmp_path / "imported.zarr"
    assert main(["import-pt", str(tmp_path / "attention"), str(store), "--no-progress"]) == 0
    ds = open_attention(store)
    spec = S.StoreSpec.from_dict(ds.attrs["attnstore_spec"])
    assert spec.layout.cameras == ("image", "image2", "empty_camera_0")
    assert spec.layout.camera_present == (True, True, False)
    assert (spec.layout.prefix_len, spec.layout.num_action, spec.num_heads) == (968, 50, 2)
    assert spec.layers == (16, 17) and spec.denoise_steps == denoise
    assert np.allclose(ds.time.values, [1.0 - d / 9 for d in denoise])  # the file's times, not recomputed
    assert ds.episode.values.tolist() == [7, 7, 7] and ds.env_step.values.tolist() == [0, 10, 20]
    assert (int(ds.episode_index.values[0]), str(ds.task_group.values[0]), int(ds.task_id.values[0])) == (
        7, "libero_object", 3)
    assert int(ds.num_env_steps.values[0]) == 30  # last rollout_step + the step between inferences
    for r in range(3):
        assert np.array_equal(ds.key_valid.sel(episode=7, rollout=r).values, valid)
        for di, d in enumerate(denoise):
            for li, layer in enumerate((16, 17)):
                got = ds.attention.sel(episode=7, rollout=r).values[di, li]
                assert np.abs(got - truth[r][(d, layer)]).max() <= S.MAX_ABS_ERROR["uint16"]


def test_import_other_layout_needs_options(tmp_path, capsys):
    """The guide's inspect example (prefix 276 + suffix 7) is not the 3x256+200 layout: say how to read it."""
    probs = np.full((1, 2, 7, 283), 1 / 283, np.float32)
    data = {"rollout_steps": [{"rollout_step": 0, "attention_maps": {0: {
        "time": 1.0, "prefix_len": 276, "suffix_len": 7, "attention_weights": {17: torch.from_numpy(probs)}}}}],
        "metadata": {"episode_index": 0, "num_rollout_steps": 1, "num_denoising_steps": 1}}
    torch.save(data, tmp_path / "ep.pt")
    assert main(["import-pt", str(tmp_path / "ep.pt"), str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--num-language" in err and "276" in err
    assert main(["import-pt", str(tmp_path / "ep.pt"), str(tmp_path / "s.zarr"), "--num-language", "20",
                 "--no-progress"]) == 0
    spec = S.StoreSpec.from_dict(open_attention(tmp_path / "s.zarr").attrs["attnstore_spec"])
    assert spec.layout.cameras == ("cam0",) and spec.layout.num_language == 20 and spec.layout.num_action == 7


# ---- bad input ------------------------------------------------------------------------------------
def _valid_pt(path: Path) -> Path:
    rng = np.random.default_rng(0)
    _guide_file(path, rng, episode=0, steps=[0, 10], denoise=(0, 9), layers=(17,), dtype=torch.float32)
    return path


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _valid_pt(tmp_path / "good" / "libero_object_0" / "episode_00000_attention.pt")
    raw = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    files = {
        "truncated": raw[: len(raw) // 2],
        "garbled": bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8)),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        (bad / f"{name}.pt").write_bytes(content)
        out[name] = bad / f"{name}.pt"
    layouts = {
        "wrong_layout": {"foo": 1},
        "a_list": [1, 2, 3],
        "no_weights": {"rollout_steps": [{"rollout_step": 0, "attention_maps": {0: {"time": 1.0}}}],
                       "metadata": {"episode_index": 0}},
        "wrong_shape": {"rollout_steps": [{"rollout_step": 0, "attention_maps": {0: {
            "time": 1.0, "prefix_len": 968, "suffix_len": 50, "attention_weights": {17: torch.zeros(1, 8, 50, 1000)}}}}],
            "metadata": {"episode_index": 0}},
    }
    for name, obj in layouts.items():
        torch.save(obj, bad / f"{name}.pt")
        out[name] = bad / f"{name}.pt"
    # same layout as the good file, one NaN deep inside: caught by the value check, not the structure check
    nan = _valid_pt(bad / "nan_values.pt")
    data = torch.load(nan, weights_only=True)
    data["metadata"]["episode_index"] = 1
    data["rollout_steps"][1]["attention_maps"][9]["attention_weights"][17][0, 1, 3, 5] = float("nan")
    torch.save(data, nan)
    out["nan_values"] = nan
    out["good"] = good
    return out


EXPECT = {
    "truncated": "truncated or garbled",
    "garbled": "truncated or garbled",
    "empty": "empty file",
    "wrong_layout": "missing key 'rollout_steps'",
    "a_list": "holds a list",
    "no_weights": "'attention_weights'",
    "wrong_shape": "does not match prefix_len=968 + suffix_len=50",
    "nan_values": "not probabilities",
}


def test_bad_files_give_one_line_errors_and_leave_no_store(tmp_path, capsys):
    files = _bad_files(tmp_path)
    store = tmp_path / "out.zarr"
    for name, problem in EXPECT.items():
        # the bad file after a good one: the good one must not survive as a half import
        code = main(["import-pt", str(files["good"]), str(files[name]), str(store), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attnstore: error: "), (name, err)
        assert str(files[name]) in lines[0] and problem in lines[0], (name, lines[0])
        assert not store.exists(), name
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], name  # no temp store left


def test_bad_file_keeps_existing_store(tmp_path, capsys):
    files = _bad_files(tmp_path)
    store = tmp_path / "out.zarr"
    assert main(["import-pt", str(files["good"]), str(store), "--no-progress"]) == 0
    before = open_attention(store).attention.values
    assert main(["import-pt", str(files["good"]), str(files["truncated"]), str(store), "--overwrite"]) == 2
    assert np.array_equal(open_attention(store).attention.values, before)
    assert main(["import-pt", str(files["good"]), str(store)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_subprocess_prints_no_traceback(tmp_path):
    files = _bad_files(tmp_path)
    exe = Path(sys.executable).with_name("attnstore")
    proc = subprocess.run([str(exe), "import-pt", str(files["garbled"]), str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "garbled.pt" in proc.stderr


def test_export_errors(stores, tmp_path, capsys):
    path = str(stores["uint16"]["path"])
    assert main(["export-pt", path, str(tmp_path / "o"), "--layers", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "attnstore: error: layer 5 is not in the store: stored layers are [16, 17]"
    assert main(["export-pt", path, str(tmp_path / "o"), "--episodes", "9"]) == 2
    assert "stored episodes are [0, 1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["export-pt", str(tmp_path / "nope.zarr"), str(tmp_path / "o")]) == 2


def test_export_layer_subset_and_atomic_write(stores, tmp_path, monkeypatch):
    truth = stores["float32"]
    out = tmp_path / "pt"
    assert main(["export-pt", str(truth["path"]), str(out), "--layers", "16", "--episodes", "1", "--no-progress"]) == 0
    (f,) = out.rglob("*.pt")
    data = _load(f)
    assert [sorted(m["attention_weights"]) for m in data["rollout_steps"][0]["attention_maps"].values()] == [[16]] * 10
    got = data["rollout_steps"][2]["attention_maps"][3]["attention_weights"][16][0].numpy()
    assert np.array_equal(got, truth["attention"][truth_index(truth, 1, 2), 3, 0])  # float32 store: exact

    # a save that dies half-way (disk full, kill) leaves neither a half file nor a temp file
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    from attnstore.errors import StoreError
    from attnstore.legacy.export_pt import export_pt

    with pytest.raises(StoreError, match="No space left on device"):
        export_pt(truth["path"], tmp_path / "pt2", episodes=[0], progress=False)
    assert [p for p in (tmp_path / "pt2").rglob("*") if p.is_file()] == []


def test_killed_export_leaves_only_whole_files(tmp_path):
    """SIGKILL an export while it writes: every .pt left loads whole; a rerun finishes and cleans up."""
    import signal
    import time

    spec = make_spec(denoise_steps=(9,), layers=(17,), images=False, actions=False)  # 1.6 MB per inference
    write_synthetic_store(tmp_path / "s.zarr", spec, episodes={0: 8, 1: 8, 2: 8}, seed=2)
    out = tmp_path / "pt"
    exe = Path(sys.executable).with_name("attnstore")
    proc = subprocess.Popen([str(exe), "export-pt", str(tmp_path / "s.zarr"), str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(out.rglob(".episode_0000*_attention.pt.tmp-*")):  # a save is in flight
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export finished before it could be killed"
    for f in out.rglob("*.pt"):
        data = torch.load(f, weights_only=True)  # a half-written file would fail here
        assert data["metadata"]["num_rollout_steps"] == 8
    assert main(["export-pt", str(tmp_path / "s.zarr"), str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        f"episode_0000{e}_attention.pt" for e in range(3)
    ]


def test_import_accepts_numpy_scalars(tmp_path):
    """Legacy writers often leave numpy scalars (np.int64 indices, np.float64 times) in the dict."""
    probs, valid = _guide_probs(np.random.default_rng(4), 1018, 50)
    data = {"rollout_steps": [{"rollout_step": np.int64(s), "attention_maps": {np.int64(9): {
        "time": np.float64(0.1), "prefix_len": np.int64(968), "suffix_len": np.int64(50),
        "attention_weights": {17: torch.from_numpy(probs)[None]}}}} for s in (0, 10)],
        "metadata": {"episode_index": np.int64(5), "num_rollout_steps": 2, "num_denoising_steps": np.int32(1)}}
    torch.save(data, tmp_path / "episode_00005_attention.pt")
    assert main(["import-pt", str(tmp_path / "episode_00005_attention.pt"), str(tmp_path / "s.zarr"),
                 "--encoding", "float32", "--no-progress"]) == 0
    ds = open_attention(tmp_path / "s.zarr")
    assert ds.episode.values.tolist() == [5, 5] and ds.env_step.values.tolist() == [0, 10]
    assert np.array_equal(ds.attention.sel(episode=5, rollout=1).values[0, 0], probs)  # float32 store: exact
    assert np.array_equal(ds.key_valid.sel(episode=5, rollout=0).values, valid)


def test_import_task_folders_with_clashing_episode_indices(tmp_path, capsys):
    """Per-task folders each start at episode 0: later clashes get the next free index, with a note."""
    def small_file(path, episode, value):
        w = torch.zeros(1, 2, 7, 283)
        w[..., 0] = value  # camera patch 0 and the first language token share the mass
        w[..., 256] = 1 - value
        data = {"rollout_steps": [{"rollout_step": 0, "attention_maps": {0: {
            "time": 1.0, "prefix_len": 276, "suffix_len": 7, "attention_weights": {17: w}}}}],
            "metadata": {"episode_index": episode, "num_rollout_steps": 1, "num_denoising_steps": 1}}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)

    small_file(tmp_path / "attention" / "libero_goal_0" / "episode_00000_attention.pt", 0, 0.25)
    small_file(tmp_path / "attention" / "libero_goal_1" / "episode_00000_attention.pt", 0, 0.75)
    assert main(["import-pt", str(tmp_path / "attention"), str(tmp_path / "s.zarr"), "--num-language", "20",
                 "--encoding", "float32", "--no-progress"]) == 0
    assert "episode index 0 already imported" in capsys.readouterr().err
    ds = open_attention(tmp_path / "s.zarr")
    table = {int(e): int(t) for e, t in zip(ds.episode_index.values, ds.task_id.values)}
    assert table == {0: 0, 1: 1}
    assert float(ds.attention.sel(episode=1, rollout=0)[0, 0, 0, 0, 0]) == 0.75  # libero_goal_1's file
    sources = ds.attrs["attnstore_run"]["imported_from"]
    assert [(Path(s["file"]).parent.name, s["episode"], s["episode_index_in_file"]) for s in sources] == [
        ("libero_goal_0", 0, 0), ("libero_goal_1", 1, 0)]



def test_export_names_files_like_lerobots_videos_of_each_task(tmp_path):
    # attnstore eval numbers episodes run-wide (task 1 starts at 2); lerobot's videos restart at 0 per task
    from attnstore.store.writer import AttentionWriter
    from synthetic import synthetic_batch

    tasks = [
        {"task_group": "libero_object", "task_id": 0, "first_episode": 0, "n_episodes": 2},
        {"task_group": "libero_object", "task_id": 1, "first_episode": 2, "n_episodes": 2},
    ]
    spec = make_spec(num_language=8, grid=4, layers=(1,), num_layers=2, denoise_steps=(0, 9), images=False,
                     actions=False)
    store = tmp_path / "multi.zarr"
    rng = np.random.default_rng(0)
    with AttentionWriter(store, spec, run={"tasks": tasks}) as writer:
        for episode in range(4):
            writer.append(synthetic_batch(spec, rng, [episode], [0]))
            writer.end_episode(S.EpisodeRecord(episode, "libero_object", episode // 2, "task", False, 1))
    assert main(["export-pt", str(store), str(tmp_path / "out"), "--no-progress"]) == 0
    files = sorted((tmp_path / "out").rglob("*.pt"))
    episode_of = {p.relative_to(tmp_path / "out").as_posix(): torch.load(p)["metadata"]["episode_index"] for p in files}
    assert episode_of == {
        "libero_object_0/episode_00000_attention.pt": 0,
        "libero_object_0/episode_00001_attention.pt": 1,
        "libero_object_1/episode_00000_attention.pt": 2,
        "libero_object_1/episode_00001_attention.pt": 3,
    }
