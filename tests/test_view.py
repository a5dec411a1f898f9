"""``attnstore view``: an episode logged to Rerun, read back with Rerun's own reader.

A store is written through the real AttentionWriter (tests/synthetic.py, the real 16x16 grid of
14x14-pixel patches on 224 px images), the real CLI writes an ``.rrd``, and Rerun's RRD reader
(``rerun.experimental.RrdReader``, the replacement of ``rerun.recording.load_recording`` in the
rerun-sdk 0.32+ API) decodes it. Expected values are computed here with plain numpy from
``ds.attention`` and the key coordinates, never by the code under test. The served web viewer is
loaded in headless Chromium (skipped where chromium/chromedriver/selenium are absent).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnstore import open_attention
from attnstore import schema as S
from attnstore.cli import main
from synthetic import make_spec, num_env_steps_of, write_synthetic_store

rr = pytest.importorskip("rerun", reason="rerun-sdk not installed: pip install 'attnstore[viz]'")
RrdReader = pytest.importorskip("rerun.experimental").RrdReader

EPISODES = {0: 5, 1: 3}
PATCH = 14
CLI = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("view") / "run1.zarr"
    spec = make_spec(num_language=20, num_action=4, num_heads=2, denoise_steps=(0, 5, 9))
    truth = write_synthetic_store(path, spec, episodes=EPISODES, n_valid_language=9)
    return path, truth


@pytest.fixture(scope="module")
def saved(store, tmp_path_factory):
    """The CLI's .rrd of episode 0 with two layers and two denoise steps, decoded per entity."""
    path, _ = store
    out = tmp_path_factory.mktemp("rrd")
    assert main(["view", str(path), "--episode", "0", "--save", str(out), "--layers", "all",
                 "--denoise", "0", "9"]) == 0
    rrd = out / "run1_episode_0.rrd"
    return rrd, read_rrd(rrd)


def read_rrd(path: Path) -> dict[str, dict]:
    """entity path -> {"static": [row dicts], "rows": [row dicts sorted by frame_index]} via Rerun's reader."""
    entities: dict[str, dict] = {}
    for chunk in RrdReader(path).stream():
        batch = chunk.to_record_batch()
        names = batch.schema.names
        entry = entities.setdefault(chunk.entity_path, {"static": [], "rows": []})
        for i in range(batch.num_rows):
            row = {n: batch.column(n)[i].as_py() for n in names if n != "rerun.controls.RowId"
                   and not n.startswith("log_")}
            entry["static" if chunk.is_static else "rows"].append(row)
    for entry in entities.values():
        entry["rows"].sort(key=lambda r: r["frame_index"])
    return entities


def depth_image(row: dict) -> np.ndarray:
    fmt = row["DepthImage:format"][0]
    buf = np.frombuffer(bytes(row["DepthImage:buffer"][0]), np.float32)
    return buf.reshape(fmt["height"], fmt["width"])


def rgb_image(row: dict) -> np.ndarray:
    fmt = row["Image:format"][0]
    return np.frombuffer(bytes(row["Image:buffer"][0]), np.uint8).reshape(fmt["height"], fmt["width"], 3)


def reference_grid(ds, episode, rollout, layer, denoise, camera, heads="mean", query="mean", scale="camera"):
    """The camera's 16x16 grid with numpy only: pick/average heads and action tokens, then the camera's keys."""
    att = np.asarray(ds.attention.sel(episode=episode, rollout=rollout, layer=layer, denoise=denoise).values,
                     np.float64)  # (head, query, key)
    att = att.mean(0) if heads == "mean" else att[heads]
    row = att.mean(0) if query == "mean" else att[query]
    region = np.array([str(r) for r in ds.key_region.values])
    keys = np.flatnonzero(region == camera)
    pr, pc = np.asarray(ds.patch_row.values)[keys], np.asarray(ds.patch_col.values)[keys]
    grid = np.zeros((pr.max() + 1, pc.max() + 1))
    grid[pr, pc] = row[keys]
    return grid / (grid.sum() if scale == "camera" else row.sum())


def mean_row(ds, episode, rollout, layer, denoise) -> np.ndarray:
    att = ds.attention.sel(episode=episode, rollout=rollout, layer=layer, denoise=denoise).values
    return np.asarray(att, np.float64).mean((0, 1))


# ---- the saved recording -------------------------------------------------------------------------
def test_save_writes_the_entities_on_both_timelines(store, saved):
    path, truth = store
    rrd, ents = saved
    assert rrd.is_file() and not list(rrd.parent.glob(".*partial"))
    tags = [f"layer_{la}/denoise_{d}" for la in (16, 17) for d in (0, 9)]
    expected = {"/actions", "/episode/info", "/episode/success", "/__properties"}
    expected |= {f"/cameras/{c}/image" for c in ("image", "image2")}
    expected |= {f"/cameras/{c}/attention/{t}" for c in ("image", "image2") for t in tags}
    expected |= {f"/shares/{r}/{t}" for r in ("image", "image2", "language", "action") for t in tags}
    expected |= {f"/entropy/{t}" for t in tags} | {f"/language/{t}" for t in tags}
    assert set(ents) == expected  # the masked empty_camera_0 gets no entity
    steps = [10 * r for r in range(EPISODES[0])]
    for name, entry in ents.items():
        if name in ("/episode/info", "/__properties"):
            assert entry["rows"] == [] and len(entry["static"]) == 1
            continue
        if name == "/episode/success":
            assert [r["frame_index"] for r in entry["rows"]] == [num_env_steps_of(0, EPISODES[0]) - 1]
            assert entry["rows"][0]["Scalars:scalars"] == [1.0]  # episode 0 succeeds (synthetic convention)
            continue
        assert [r["frame_index"] for r in entry["rows"]] == steps, name
        assert [r["time"].total_seconds() for r in entry["rows"]] == pytest.approx([s / 20 for s in steps]), name
    assert RrdReader(rrd).blueprints(), "the .rrd carries the default blueprint"


@pytest.mark.parametrize("rollout,layer,denoise,camera", [(3, 16, 0, "image2"), (0, 17, 9, "image"),
                                                          (4, 17, 0, "image2")])
def test_heat_map_equals_the_store_grid_patch_for_patch(store, saved, rollout, layer, denoise, camera):
    path, _ = store
    _, ents = saved
    ds = open_attention(path)
    heat = depth_image(ents[f"/cameras/{camera}/attention/layer_{layer}/denoise_{denoise}"]["rows"][rollout])
    assert heat.shape == (224, 224)
    grid = heat[::PATCH, ::PATCH]
    np.testing.assert_array_equal(heat, np.kron(grid, np.ones((PATCH, PATCH), np.float32)))  # 14x14 blocks
    np.testing.assert_allclose(grid, reference_grid(ds, 0, rollout, layer, denoise, camera), rtol=1e-5, atol=1e-8)


def test_images_are_the_ones_the_policy_saw(store, saved):
    _, truth = store
    _, ents = saved
    for c, cam in enumerate(("image", "image2")):
        for r, row in enumerate(ents[f"/cameras/{cam}/image"]["rows"]):
            np.testing.assert_array_equal(rgb_image(row), truth["images"][r, c])


def test_scalars_and_prompt_text(store, saved):
    path, truth = store
    _, ents = saved
    ds = open_attention(path)
    region = np.array([str(r) for r in ds.key_region.values])
    for r in range(EPISODES[0]):
        row = mean_row(ds, 0, r, 17, 9)
        for name in ("image", "language", "action"):
            got = ents[f"/shares/{name}/layer_17/denoise_9"]["rows"][r]["Scalars:scalars"][0]
            assert got == pytest.approx(row[region == name].sum() / row.sum(), rel=1e-5)
        att = np.asarray(ds.attention.sel(episode=0, rollout=r, layer=17, denoise=9).values, np.float64)
        valid = np.asarray(ds.key_valid.sel(episode=0, rollout=r).values)
        p = att[..., valid] / att[..., valid].sum(-1, keepdims=True)
        h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1).mean()
        assert ents["/entropy/layer_17/denoise_9"]["rows"][r]["Scalars:scalars"][0] == pytest.approx(h, rel=1e-5)
        np.testing.assert_allclose(ents["/actions"]["rows"][r]["Scalars:scalars"], truth["actions"][r, 0], rtol=1e-6)
        text = ents["/language/layer_17/denoise_9"]["rows"][r]["TextDocument:text"][0]
        lang = np.flatnonzero(region == "language")
        tokens = [str(t) for t in truth["language_token_text"][r]]
        assert f"| 0 | {tokens[0]} | {100 * row[lang[0]] / row.sum():.2f}% |" in text
        assert sum(line.startswith("| ") and line[2].isdigit() for line in text.splitlines()) == 9  # no padding
    info = ents["/episode/info"]["static"][0]["TextDocument:text"][0]
    assert "success" in info and truth["episodes"][0]["task"] in info


def test_head_token_and_scale_choices(store, tmp_path):
    path, _ = store
    assert main(["view", str(path), "--episode", "1", "--save", str(tmp_path), "--heads", "1",
                 "--action-idx", "2", "--scale", "total"]) == 0
    ents = read_rrd(tmp_path / "run1_episode_1.rrd")
    ds = open_attention(path)
    for r in range(EPISODES[1]):
        heat = depth_image(ents["/cameras/image/attention/layer_17/denoise_9"]["rows"][r])
        want = reference_grid(ds, 1, r, 17, 9, "image", heads=1, query=2, scale="total")
        np.testing.assert_allclose(heat[::PATCH, ::PATCH], want, rtol=1e-5, atol=1e-8)
    assert "/episode/success" in ents and ents["/episode/success"]["rows"][0]["Scalars:scalars"] == [0.0]


def test_state_is_logged_when_the_store_has_it(store, tmp_path):
    from attnstore.readers.view import ViewOptions, load_episode, log_episode

    path, _ = store
    ds = open_attention(path)
    state = np.arange(ds.sizes[S.INFERENCE] * 8, dtype=np.float32).reshape(-1, 8)
    ds = ds.assign({getattr(S, "STATE", "state"): ((S.INFERENCE, "state_dim"), state)})
    data = load_episode(ds, ViewOptions(episode=1))
    rec = rr.RecordingStream("attnstore_test_state")
    rec.save(tmp_path / "s.rrd")
    log_episode(rec, data)
    rec.flush()
    rec.disconnect()
    rows = read_rrd(tmp_path / "s.rrd")["/state"]["rows"]
    rows1 = np.flatnonzero(np.asarray(ds.episode.values) == 1)
    np.testing.assert_array_equal([r["Scalars:scalars"] for r in rows], state[rows1])


def test_unfinished_episode_has_no_success(tmp_path):
    path = tmp_path / "killed.zarr"
    write_synthetic_store(path, make_spec(num_language=8, num_action=2, num_heads=1, layers=(17,),
                                          denoise_steps=(9,)), episodes={4: 2}, finish_episodes=False,
                          status="interrupted")
    assert main(["view", str(path), "--save", str(tmp_path)]) == 0  # default: the store's first episode
    ents = read_rrd(tmp_path / "killed_episode_4.rrd")
    assert "/episode/success" not in ents
    assert "unfinished" in ents["/episode/info"]["static"][0]["TextDocument:text"][0]
    assert [r["frame_index"] for r in ents["/cameras/image/image"]["rows"]] == [0, 10]


# ---- a study (--run) and a store read from a URL -------------------------------------------------------
STUDY_EPISODES = {"a": {0: 2, 1: 2}, "b": {0: 3, 1: 4}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two runs as ``attnstore eval-study`` lays them out (runs/<name>/attention.zarr), other data each."""
    root = tmp_path_factory.mktemp("view-study")
    spec = make_spec(num_language=8, num_action=2, num_heads=2, layers=(16, 17), denoise_steps=(9,))
    truths = {name: write_synthetic_store(root / "runs" / name / "attention.zarr", spec, episodes=episodes,
                                          seed=i, n_valid_language=5)
              for i, (name, episodes) in enumerate(STUDY_EPISODES.items())}
    return root, truths


def check_run_recording(ents: dict, store: Path, truth: dict, episode: int) -> None:
    """The recording shows ``store``'s episode: its frames, images and heat maps (numpy reference)."""
    ds = open_attention(store)
    rows = np.flatnonzero(np.asarray(ds.episode.values) == episode)
    heat_rows = ents["/cameras/image/attention/layer_17/denoise_9"]["rows"]
    assert [r["frame_index"] for r in heat_rows] == [10 * r for r in range(len(rows))]
    for r, row in enumerate(heat_rows):
        np.testing.assert_allclose(depth_image(row)[::PATCH, ::PATCH], reference_grid(ds, episode, r, 17, 9, "image"),
                                   rtol=1e-5, atol=1e-8)
    for r, row in enumerate(ents["/cameras/image2/image"]["rows"]):
        np.testing.assert_array_equal(rgb_image(row), truth["images"][rows[r], 1])


def test_view_run_of_a_study(study, tmp_path):
    root, truths = study
    assert main(["view", str(root), "--run", "b", "--episode", "1", "--save", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["b_episode_1.rrd"]
    ents = read_rrd(tmp_path / "b_episode_1.rrd")
    check_run_recording(ents, root / "runs" / "b" / "attention.zarr", truths["b"], 1)
    assert "**store**: b" in ents["/episode/info"]["static"][0]["TextDocument:text"][0]
    assert main(["view", str(root / "runs" / "*" / "attention.zarr"), "--run", "a", "--save", str(tmp_path)]) == 0
    check_run_recording(read_rrd(tmp_path / "a_episode_0.rrd"), root / "runs" / "a" / "attention.zarr",
                        truths["a"], 0)  # a glob of runs is a study too; default: the run's first episode


def test_view_run_errors_list_the_runs(study, store, tmp_path, capsys):
    root, _ = study
    save = ["--save", str(tmp_path)]
    err = one_line_error(capsys, ["view", str(root), "--run", "c", *save])
    assert f"run 'c' is not in the study {root}: its runs are a, b" in err
    err = one_line_error(capsys, ["view", str(root), *save])
    assert f"{root} is a study of 2 runs (a, b): choose one with --run R" in err
    err = one_line_error(capsys, ["view", str(store[0]), "--run", "a", *save])
    assert "is one store, not a study of runs; drop --run" in err
    assert "does not exist" in one_line_error(capsys, ["view", str(tmp_path / "nope"), "--run", "a", *save])
    assert "no attnstore stores match" in one_line_error(capsys, ["view", str(tmp_path / "x" / "*.zarr"), *save])
    assert not list(tmp_path.iterdir()), "nothing written"


def test_view_reads_a_store_and_a_study_from_s3(s3, store, study, tmp_path):
    """The real CLI in a subprocess, endpoint and credentials from the standard AWS_* variables."""
    path, truth = store
    root, truths = study
    bucket = s3.make_bucket("attnstore-view")
    fs = s3.filesystem()
    fs.put(str(path), f"{bucket}/one/run1.zarr", recursive=True)
    fs.put(str(root / "runs"), f"{bucket}/study/runs", recursive=True)
    for source, flags, name in ((f"s3://{bucket}/one/run1.zarr", [], "run1_episode_1.rrd"),
                                (f"s3://{bucket}/study", ["--run", "b"], "b_episode_1.rrd")):
        out = subprocess.run([*CLI, "view", source, *flags, "--episode", "1", "--save", str(tmp_path)],
                             capture_output=True, text=True, env=s3.env(), timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert (tmp_path / name).is_file(), out.stdout
    check_run_recording(read_rrd(tmp_path / "b_episode_1.rrd"), root / "runs" / "b" / "attention.zarr",
                        truths["b"], 1)
    ents = read_rrd(tmp_path / "run1_episode_1.rrd")
    check_run_recording(ents, path, truth, 1)
    out = subprocess.run([*CLI, "view", f"s3://{bucket}/study", "--run", "z", "--save", str(tmp_path)],
                         capture_output=True, text=True, env=s3.env(), timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"run 'z' is not in the study s3://{bucket}/study: its runs are a, b" in out.stderr


# ---- bad input: one line, exit 2 -----------------------------------------------------------------
def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnstore: error: "), err
    return err


def test_bad_inputs_are_one_line_errors(store, tmp_path, capsys, monkeypatch):
    path, _ = store
    p = str(path)
    save = ["--save", str(tmp_path)]
    assert "episode 7 is not in the store" in one_line_error(capsys, ["view", p, "--episode", "7", *save])
    assert "layer 3 was not captured" in one_line_error(capsys, ["view", p, "--layers", "3", *save])
    assert "denoise step 4 was not captured" in one_line_error(capsys, ["view", p, "--denoise", "4", *save])
    assert "--heads 5 is out of range" in one_line_error(capsys, ["view", p, "--heads", "5", *save])
    assert "--action-idx" in one_line_error(capsys, ["view", p, "--action-idx", "first", *save])
    assert "does not exist" in one_line_error(capsys, ["view", str(tmp_path / "nope.zarr"), *save])
    assert "--save writes a file" in one_line_error(capsys, ["view", p, "--mode", "distant", *save])
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform.startswith("linux"):
        err = one_line_error(capsys, ["view", p, "--mode", "local"])
        assert "no display" in err and "--save" in err and "--mode distant" in err
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_ports_in_use_are_one_line_errors(store, capsys):
    path, _ = store
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, ["view", str(path), "--mode", "distant", "--grpc-port", str(port)])
        assert f"--grpc-port {port} is in use" in err
        err = one_line_error(capsys, ["view", str(path), "--grpc-port", str(free_port()), "--web-port", str(port)])
        assert f"--web-port {port} is in use" in err


def test_missing_rerun_names_the_extra(store):
    path, _ = store
    code = ("import sys; sys.modules['rerun'] = None; from attnstore.cli import main; "
            f"sys.exit(main(['view', {str(path)!r}, '--save', 'unused']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "pip install 'attnstore[viz]'" in out.stderr


# ---- serving: gRPC and the web viewer ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serving(path: Path, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """Run ``attnstore view --mode distant`` until it prints its Ctrl-C line; return it and its stdout."""
    proc = subprocess.Popen([*CLI, "view", str(path), "--mode", "distant", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"view exited early: {proc.wait()} {proc.stderr.read()}")
        lines.append(line.rstrip())
        if "Ctrl-C" in line:
            return proc, lines
    proc.kill()
    raise AssertionError(f"view did not start serving: {lines}")


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C the server; its exit code (0 = stopped cleanly), with its stderr shown on failure."""
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if rc != 0:
        print(proc.stderr.read(), file=sys.stderr)
    return rc


def test_distant_mode_serves_grpc_and_stops_on_ctrl_c(store):
    path, _ = store
    port = free_port()
    proc, lines = start_serving(path, "--grpc-port", str(port))
    try:
        assert any(f"rerun --connect rerun+http://127.0.0.1:{port}/proxy" in line for line in lines), lines
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        assert stop(proc) == 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                               else None)
GL_FLAGS = ([], ["--use-gl=swiftshader"], ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"])


def screenshot_viewer(url: str, out: Path, flags: list[str], wait_s: float = 90) -> np.ndarray | None:
    """Load ``url`` in headless Chromium and screenshot it once the viewer has drawn (None: never did)."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900", *flags]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(url)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(3)
            has_gl = driver.execute_script("const c = document.createElement('canvas'); "
                                           "return !!(c.getContext('webgl2') || c.getContext('webgl'));")
            driver.save_screenshot(str(out))
            pixels = np.asarray(Image.open(out).convert("RGB"), np.float64)
            # the viewer drew its panels and the recording: many distinct colours, strong variance
            colours = len(np.unique(pixels[::4, ::4].reshape(-1, 3), axis=0))
            if has_gl and pixels.std() > 20 and colours > 500:
                return pixels
        return None
    finally:
        driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (apt-get install "
                    "chromium chromium-driver)")
def test_web_viewer_renders_in_headless_chromium(store, tmp_path):
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    path, _ = store
    grpc, web = free_port(), free_port()
    proc, lines = start_serving(path, "--grpc-port", str(grpc), "--web-port", str(web))
    try:
        url = next(line.split()[-1] for line in lines if "web viewer:" in line)
        assert url.startswith(f"http://127.0.0.1:{web}/?url=rerun%2Bhttp")
        tried = []
        for flags in GL_FLAGS:
            pixels = screenshot_viewer(url, tmp_path / "view.png", flags)
            tried.append(" ".join(flags) or "default flags")
            if pixels is not None:
                break
        else:
            pytest.skip(f"headless Chromium could not render the WebGL viewer (tried: {'; '.join(tried)})")
        h, w, _ = pixels.shape
        assert h > 500 and w > 1000
        # the recording (images, heat maps, plot lines: saturated colours) on the viewer's light grey chrome
        saturated = (pixels.max(-1) - pixels.min(-1)) > 60
        assert saturated.mean() > 0.05, "the recording is not on screen"
        assert (pixels.min(-1) > 200).mean() > 0.05, "no viewer panels"
    finally:
        assert stop(proc) == 0
