"""Legacy ``.pt`` export and import, against ground truth written through the real AttentionWriter.

Expected values come from tests/synthetic.py's ground truth (what was handed to the writer), from
legacy files built here with torch directly (the guide's variant) or from tests/fork_pt.py (files as
the fork's lerobot_eval.py really writes them), never from the export/import code under test.
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
from fork_pt import KeyLayout, fork_times, storage_locations, write_fork_rollout
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


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A store with the real LIBERO key axis (1018 keys, 8 heads, 50 action tokens), 1 denoise step (9)."""
    root = tmp_path_factory.mktemp("full")
    spec = make_spec(denoise_steps=(9,), layers=(16, 17), image_size=32)
    return write_synthetic_store(root / "s.zarr", spec, episodes={0: 16}, seed=3)


def test_guide_access_pattern_runs_unchanged(full_size, tmp_path):
    """The guide's snippet, verbatim, on an exported full-size (1, 8, 50, 1018) file."""
    truth = full_size
    export_dir = tmp_path / "attention"
    assert main(["export-pt", str(truth["path"]), str(export_dir), "--no-progress"]) == 0
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


@pytest.mark.parametrize(("dtype", "every_env_step"), [("float32", False), ("bfloat16", True)],
                         ids=["float32_per_inference", "bfloat16_per_frame"])
def test_fork_readers_access_pattern_runs_on_export(full_size, tmp_path, dtype, every_env_step):
    """What the fork's own readers do with a file, done on our export (their code is not in this repo).

    IanHuangYH/lerobot ``pi_setting/eval/verify_attention_video_alignment.py`` (HEAD bf0dac1, last changed
    d6543e9): ``load_attention_data`` l.39-64 and ``extract_action_to_img_attention`` l.67-121;
    ``pi_setting/eval/visualize_action_to_img_attention.py`` (f430054): ``main`` l.221-297 and
    ``extract_action_to_img_attention`` l.16-82. Both load with ``torch.load(path, map_location='cpu')``
    (so ``weights_only`` is torch's default, True), pick the entry whose ``rollout_step`` is the wanted
    frame, then ``['attention_maps'][9]['attention_weights'][17]``, and slice camera ``c``'s 256 keys
    and action ``a``'s row ``a + 1``.
    """
    truth = full_size
    args = ["export-pt", str(truth["path"]), str(tmp_path), "--dtype", dtype, "--no-progress"]
    assert main(args + (["--every-env-step"] if every_env_step else [])) == 0
    path = tmp_path / "libero_object_0" / "episode_00000_attention.pt"
    tol = S.MAX_ABS_ERROR["uint16"] + (BF16_REL if dtype == "bfloat16" else 0)
    frames = [0, 5, 150, num_env_steps_of(0, 16) - 1] if every_env_step else [0, 10, 150]
    for frame in frames:
        data = torch.load(path, map_location="cpu")  # verify l.39, visualize l.221
        entry = [e for e in data["rollout_steps"] if e["rollout_step"] == frame]  # verify l.44-47, visualize l.228-231
        assert len(entry) == 1, frame
        denoising = entry[0]["attention_maps"][9]  # --denoising_step default 9 (verify l.347, visualize l.168)
        weights = denoising["attention_weights"]  # verify l.59, visualize l.248
        att = weights[17]  # --layer(s) default 17 (verify l.353, visualize l.182)
        assert att.dim() == 4  # both: drop the batch dim of a 4-d tensor (verify l.92, visualize l.48)

        # visualize l.251-263: camera count from the key axis, 256 patches + 200 language + 50 action tokens
        key_len = weights[list(weights.keys())[0]].shape[-1]
        assert (key_len - 250) % 256 == 0 and (key_len - 250) // 256 == 3

        row = truth_index(truth, 0, frame // 10)  # frame f was acted on by the inference at 10 * (f // 10)
        ref = truth["attention"][row, 0, 1]  # (heads, 50, 1018): denoise 9, layer 17
        for cam in (0, 1):  # agentview, wrist
            keys = slice(cam * 256, (cam + 1) * 256)
            # verify l.100-121: one action's row, mean over heads, 16 x 16, float32 numpy
            grid = att[0][:, :, keys][:, 0 + 1, :].mean(dim=0).reshape(16, 16).to(torch.float32).cpu().numpy()
            assert grid.shape == (16, 16) and np.all(np.abs(grid - ref[:, 1, keys].mean(0).reshape(16, 16)) <= tol)
            # visualize l.55-82: a list of actions (default 0..9) at once
            actions = list(range(10))
            grids = att.squeeze(0)[:, :, keys][:, [a + 1 for a in actions], :].mean(dim=0)
            grids = grids.reshape(len(actions), 16, 16).to(torch.float32).cpu().numpy()
            want = ref[:, 1:11, keys].mean(0).reshape(10, 16, 16)
            assert np.all(np.abs(grids - want) <= tol)


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
        # entries fine, but neither the guide's metadata.episode_index nor the fork's top-level one
        "no_episode_index": {"rollout_steps": torch.load(good, weights_only=True)["rollout_steps"],
                             "batch_index": 0, "metadata": {"num_rollout_steps": 2, "num_denoising_steps": 2}},
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
    "no_episode_index": "no episode index: metadata 'episode_index' is None and top-level 'episode_index' is None",
    "nan_values": "not probabilities",
}
# where the layout is not recognised, the error names what both variants hold
BOTH_LAYOUTS = ("the guide's {'rollout_steps', 'metadata': {'episode_index', 'num_rollout_steps', 'num_denoising_steps'}}",
                "the fork's {'episode_index', 'batch_index', 'rollout_steps', "
                "'metadata': {'num_rollout_steps', 'num_denoising_steps_per_action'}}")


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
        if name in ("wrong_layout", "a_list", "no_episode_index"):
            assert all(layout in lines[0] for layout in BOTH_LAYOUTS), (name, lines[0])
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
    with AttentionWriter(store, spec, run={"tasks": tasks, "batch_size": 2}) as writer:
        for episode in range(4):
            writer.append(synthetic_batch(spec, rng, [episode], [0]))
            writer.end_episode(S.EpisodeRecord(episode, "libero_object", episode // 2, "task", False, 1))
    assert main(["export-pt", str(store), str(tmp_path / "out"), "--no-progress"]) == 0
    files = sorted((tmp_path / "out").rglob("*.pt"))
    # metadata.episode_index: the store's (run-wide) episode; the fork's top-level keys: the file's
    # per-task number, and its slot in lerobot's batch of 2 (episode = batch * batch_size + slot)
    episode_of = {}
    for p in files:
        data = torch.load(p)
        episode_of[p.relative_to(tmp_path / "out").as_posix()] = (
            data["metadata"]["episode_index"], data["episode_index"], data["batch_index"])
    assert episode_of == {
        "libero_object_0/episode_00000_attention.pt": (0, 0, 0),
        "libero_object_0/episode_00001_attention.pt": (1, 1, 1),
        "libero_object_1/episode_00000_attention.pt": (2, 0, 0),
        "libero_object_1/episode_00001_attention.pt": (3, 1, 1),
    }


# ---- files as the fork's lerobot_eval.py really writes them (tests/fork_pt.py) ------------------------------
FORK_SMALL = KeyLayout(patches=16, num_language=12, valid_language=5, suffix_len=4)  # 3 x 4x4 cameras
FORK_SMALL_ARGS = ["--grid", "4", "--num-language", "12"]


@pytest.mark.parametrize(("dtype", "num_envs"), [(torch.bfloat16, 2), (torch.float16, 1), (torch.float32, 1)],
                         ids=["bf16_batch2", "fp16", "fp32"])
def test_import_fork_files(tmp_path, dtype, num_envs):
    """Second batch of a task (episodes num_envs.., per-task numbering), all 18 layers, saved from cuda:0."""
    steps = [0, 10, 20]
    paths, batch = write_fork_rollout(tmp_path / "attention" / "libero_object_3", steps, num_envs=num_envs,
                                      batch_ix=1, heads=2, layout=FORK_SMALL, dtype=dtype, seed=5)
    episodes = [num_envs + b for b in range(num_envs)]

    # the files are the fork's dict, not the guide's
    for b, path in enumerate(paths):
        assert path.name == f"episode_{episodes[b]:05d}_attention.pt"
        assert storage_locations(path) == {"cuda:0"}
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA"):
                torch.load(path, weights_only=True)
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert list(data) == ["episode_index", "batch_index", "rollout_steps", "metadata"]
        assert (data["episode_index"], data["batch_index"]) == (episodes[b], b)
        assert data["metadata"] == {"num_rollout_steps": 3, "num_denoising_steps_per_action": 10}
        dmap = data["rollout_steps"][1]["attention_maps"][1]
        assert dmap["time"] == 0.8999999761581421 and sorted(dmap["attention_weights"]) == list(range(18))
        w = dmap["attention_weights"][17]
        assert w.dtype == dtype and tuple(w.shape) == (1, 2, 4, 64)
        # a view into the whole batch's tensor: every file carries all num_envs episodes' bytes
        assert w.untyped_storage().nbytes() == num_envs * w.nbytes and w.storage_offset() == b * w.numel()

    store = tmp_path / "s.zarr"
    assert main(["import-pt", str(tmp_path / "attention"), str(store), *FORK_SMALL_ARGS, "--encoding", "float32",
                 "--no-progress"]) == 0
    ds = open_attention(store)
    spec = S.StoreSpec.from_dict(ds.attrs["attnstore_spec"])
    assert spec.layers == tuple(range(18)) and spec.denoise_steps == tuple(range(10)) and spec.num_heads == 2
    assert spec.layout.cameras == ("image", "image2", "empty_camera_0")
    assert spec.layout.camera_present == (True, True, False) and spec.layout.num_action == 4
    assert ds.time.values.tolist() == fork_times()  # the file's float32 times, kept as they are
    assert sorted(set(ds.episode.values.tolist())) == episodes
    for b, ep in enumerate(episodes):
        for r, step in enumerate(steps):
            sel = dict(episode=ep, rollout=r)
            assert int(ds.env_step.sel(**sel)) == step
            want = np.stack([np.stack([batch[r]["attention_maps"][d]["attention_weights"][layer][b].float().numpy()
                                       for layer in range(18)]) for d in range(10)])
            assert np.array_equal(ds.attention.sel(**sel).values, want)  # float32 store: exact
            assert np.array_equal(ds.key_valid.sel(**sel).values, FORK_SMALL.valid().numpy())
    table = {int(e): i for i, e in enumerate(ds.episode_index.values)}
    assert sorted(table) == episodes
    for ep in episodes:
        i = table[ep]
        assert (str(ds.task_group.values[i]), int(ds.task_id.values[i])) == ("libero_object", 3)
        assert int(ds.num_env_steps.values[i]) == 30  # last rollout_step + the step between inferences
    sources = ds.attrs["attnstore_run"]["imported_from"]
    assert [(s["episode"], s["layout"], s["batch_index"]) for s in sources] == [
        (ep, "fork", b) for b, ep in enumerate(episodes)]


def test_import_fork_file_default_encoding(tmp_path):
    """The default uint16 store from a bf16 fork file: within the encoding's error of the file's values."""
    (path,), batch = write_fork_rollout(tmp_path / "libero_object_0", [0, 10], heads=2, layout=FORK_SMALL, seed=9)
    store = tmp_path / "s.zarr"
    assert main(["import-pt", str(path), str(store), *FORK_SMALL_ARGS, "--no-progress"]) == 0
    ds = open_attention(store)
    got = ds.attention.sel(episode=0, rollout=1).values
    want = batch[1]["attention_maps"][9]["attention_weights"][0][0].float().numpy()
    assert np.abs(got[9, 0] - want).max() <= S.MAX_ABS_ERROR["uint16"]


def test_export_writes_guide_and_fork_keys(stores, tmp_path):
    """The superset both kinds of reader accept; importing it back prefers the guide's metadata.episode_index."""
    truth = stores["uint16"]
    out = tmp_path / "pt"
    assert main(["export-pt", str(truth["path"]), str(out), "--episodes", "1", "--no-progress"]) == 0
    (f,) = out.rglob("*.pt")
    data = _load(f)
    assert {"episode_index", "batch_index", "rollout_steps", "metadata"} <= set(data)
    meta = data["metadata"]
    assert (meta["episode_index"], meta["num_denoising_steps"], meta["num_denoising_steps_per_action"]) == (1, 10, 10)
    assert data["episode_index"] == 1 and data["batch_index"] == 0  # file number; run attrs have no batch size
    from attnstore.legacy import pt as L
    from attnstore.legacy import pt_validate as V

    info = V.validate_legacy(L.load_legacy(f), f, check_values=True)
    assert (info.variant, info.episode_index, info.file_episode_index, info.num_denoising_steps) == (
        "guide+fork", 1, 1, 10)


# ---- memory --------------------------------------------------------------------------------------------
RSS_CHILD = r"""
import resource, sys
import numpy, torch, tqdm, xarray, zarr  # what import-pt loads, before the baseline
import attnstore.legacy.import_pt, attnstore.store.create, attnstore.store.writer
from attnstore.cli import main

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    reset = True
except OSError:
    reset = False
code = main(sys.argv[1:])
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"RSS base={base} peak={peak} code={code}", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_import_peak_memory_stays_below_1_5x_the_file(tmp_path):
    """A ~210 MB fork file (bf16 from cuda:0, 18 layers, one entry per inference of a 200-step episode).

    Before: the whole file became resident (mmap pages never given back) on top of five queued
    float32 entries: peak RSS 3.46 GB for an 880 MB file. Measured in a child process, after its imports.
    """
    layout = KeyLayout(patches=64, num_language=48, valid_language=20, suffix_len=50)  # 290 keys
    (path,), batch = write_fork_rollout(tmp_path / "attention" / "libero_object_0", range(0, 200, 10), heads=2,
                                        layout=layout, cheap=True)
    del batch
    size = path.stat().st_size
    assert 150e6 < size < 300e6
    cmd = [sys.executable, "-c", RSS_CHILD, "import-pt", str(path), str(tmp_path / "s.zarr"), "--grid", "8",
           "--num-language", "48"]  # with its progress bar
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RSS "))
    fields = dict(kv.split("=") for kv in line.split()[1:])
    growth = int(fields["peak"]) - int(fields["base"])
    assert fields["code"] == "0"
    assert growth < 1.5 * size, f"peak RSS grew by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    # one progress bar for the file, counting its entries, on stderr
    assert "episode_00000_attention.pt" in proc.stderr and "20/20" in proc.stderr
    ds = open_attention(tmp_path / "s.zarr")
    assert ds.sizes["inference"] == 20 and ds.sizes["layer"] == 18
