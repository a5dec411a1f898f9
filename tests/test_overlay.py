"""Overlays check pixels: a map with its mass on one patch lights exactly that patch's 14x14 block.

Expected pixels are computed here independently (matplotlib's colour map, numpy block indexing,
the blend formula), never by the code under test. Store tests write real Zarr stores through the
real AttentionWriter, run the real ``attnstore`` CLI, and decode its PNGs / MP4s.
"""

from __future__ import annotations

from pathlib import Path

import av
import matplotlib
import numpy as np
import pytest
from PIL import Image
from synthetic import make_spec, synthetic_batch

from attnstore import schema as S
from attnstore.cli import main
from attnstore.errors import SelectionError
from attnstore.readers.overlay import OverlayOptions, camera_grids, write_overlays
from attnstore.readers.render import (
    CMAP,
    panel_layout,
    render_heat,
    render_panel,
    upsample_grid,
    zoom,
)
from attnstore.readers.selection import pick_cameras
from attnstore.schema import EpisodeRecord
from attnstore.store.writer import AttentionWriter

PATCH = 14  # SigLIP patch size in pixels at 224 px


def cmap_rgb(value: float) -> np.ndarray:
    """Reference colour of a value in [0, 1], straight from matplotlib."""
    return np.asarray(matplotlib.colormaps[CMAP](value, bytes=True)[:3], np.uint8)


def block_mask(row: int, col: int, size: int = 224, patch: int = PATCH) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = True
    return mask


def random_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


# ---- pure rendering ------------------------------------------------------------------------------
@pytest.mark.parametrize("row,col", [(0, 0), (15, 15), (3, 11), (12, 1)])
def test_one_hot_patch_lights_exactly_its_block(row, col):
    grid = np.zeros((16, 16))
    grid[row, col] = 0.37  # any positive mass: the colour scale tops at the grid's maximum
    image = random_image()
    out = render_heat(grid, image, alpha=0.4)

    mask = block_mask(row, col)
    assert np.all(out.heat[mask] == cmap_rgb(1.0))
    assert np.all(out.heat[~mask] == cmap_rgb(0.0))
    expected = np.empty_like(image)
    expected[mask] = np.rint(0.6 * image[mask] + 0.4 * cmap_rgb(1.0).astype(float)).astype(np.uint8)
    expected[~mask] = np.rint(0.6 * image[~mask] + 0.4 * cmap_rgb(0.0).astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out.overlay, expected)
    assert out.vmax == pytest.approx(0.37)


def test_heat_values_follow_the_colour_scale():
    grid = np.zeros((16, 16))
    grid[2, 3], grid[9, 9] = 0.8, 0.2
    out = render_heat(grid, None, vmax=1.6)  # fixed scale (as in a video)
    assert out.overlay is None and out.heat.shape == (224, 224, 3)
    assert np.all(out.heat[block_mask(2, 3)] == cmap_rgb(0.5))
    assert np.all(out.heat[block_mask(9, 9)] == cmap_rgb(0.125))


def test_upsample_grid_maps_rows_to_rows_and_columns_to_columns():
    grid = np.arange(16 * 16, dtype=float).reshape(16, 16)
    up = upsample_grid(grid, 224, 224)
    ys, xs = np.mgrid[0:224, 0:224]
    np.testing.assert_array_equal(up, grid[ys // PATCH, xs // PATCH])


def test_panel_holds_the_pictures_pixel_for_pixel():
    grid = np.zeros((16, 16))
    grid[5, 10] = 1.0
    heat = render_heat(grid, random_image(1), alpha=0.5)
    panel, layout = render_panel(heat, "image | env step 0 | action mean", "subtitle", zoom_factor=2)
    assert panel.shape == (layout.height, layout.width, 3) and panel.dtype == np.uint8
    assert layout.height % 2 == 0 and layout.width % 2 == 0  # yuv420p needs even sizes
    np.testing.assert_array_equal(layout.crop(panel, "heat"), zoom(heat.heat, 2))
    np.testing.assert_array_equal(layout.crop(panel, "overlay"), zoom(heat.overlay, 2))
    top, left, _, _ = layout.heat_box  # the lit block, found in the whole panel
    lit = np.argwhere(np.all(panel == cmap_rgb(1.0), axis=-1))
    lit = lit[(lit[:, 1] >= left) & (lit[:, 1] < left + 448)]
    assert lit.min(0).tolist() == [top + 5 * 28, left + 10 * 28]
    assert lit.max(0).tolist() == [top + 6 * 28 - 1, left + 11 * 28 - 1]


def test_panel_without_image_has_no_overlay_picture():
    heat = render_heat(np.eye(16), None)
    panel, layout = render_panel(heat, "t", zoom_factor=1)
    assert layout.overlay_box is None
    np.testing.assert_array_equal(layout.crop(panel, "heat"), heat.heat)
    with pytest.raises(SelectionError):
        layout.crop(panel, "overlay")


def test_options_reject_bad_values():
    for kwargs in ({"alpha": 1.5}, {"scale": "log"}, {"heads": "median"}, {"action": "-1"},
                   {"steps": (0,), "rollouts": (1,)}, {"fps": 0}):
        with pytest.raises(SelectionError):
            OverlayOptions(episode=0, out_dir=Path("x"), **kwargs)
    assert OverlayOptions(episode=0, out_dir=Path("x"), heads="3").heads == 3


def test_pick_cameras_skips_dummy_and_rejects_unknown():
    layout = S.TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False))
    cams, notes = pick_cameras(layout, None)
    assert cams == ["image", "image2"] and len(notes) == 1 and "empty_camera_0" in notes[0]
    with pytest.raises(SelectionError, match="image, image2"):
        pick_cameras(layout, ["wrist"])
    with pytest.raises(SelectionError):
        pick_cameras(layout, ["empty_camera_0"])


# ---- real stores ---------------------------------------------------------------------------------
HOT = {"image": (3, 11), "image2": (12, 1)}  # where every head but head 1 looks, per camera
HEAD1 = {"image": (7, 7), "image2": (0, 15)}  # where head 1 looks
CAMERA_MASS = {"image": 0.3, "image2": 0.2}  # share of all attention each camera gets


def hot_patch(camera: str, rollout: int, head_one: bool = False) -> tuple[int, int]:
    """Planted patch, shifted by one column per rollout so each frame differs."""
    r, c = (HEAD1 if head_one else HOT)[camera]
    return r, (c + rollout) % 16


def planted_attention(spec, key_valid: np.ndarray, rollout: int) -> np.ndarray:
    """(1, D, L, H, Q, K): each camera's mass on one patch; the rest spread over valid language/action."""
    lay = spec.layout
    D, L, H, Q, K = spec.attention_shape_per_inference
    att = np.zeros((1, D, L, H, Q, K), np.float32)
    rest = np.zeros(K, bool)
    for region in (S.REGION_LANGUAGE, S.REGION_ACTION):
        rest[lay.region_slice(region)] = True
    rest &= key_valid[0]
    att[..., rest] = (1.0 - sum(CAMERA_MASS.values())) / rest.sum()
    for cam, mass in CAMERA_MASS.items():
        start = lay.region_slice(cam).start
        for h in range(H):
            r, c = hot_patch(cam, rollout, head_one=h == 1)
            att[:, :, :, h, :, start + r * lay.grid_cols + c] = mass
    return att


def write_planted_store(path: Path, episodes: dict[int, int], images: bool = True) -> dict:
    spec = make_spec(num_language=8, num_action=4, num_heads=2, images=images, actions=False,
                     denoise_steps=(0, 9))
    rng = np.random.default_rng(0)
    stored_images = {}
    with AttentionWriter(path, spec) as writer:
        for ep, n in episodes.items():
            for r in range(n):
                batch = synthetic_batch(spec, rng, [ep], [10 * r], n_valid_language=5)
                batch.attention = planted_attention(spec, np.asarray(batch.key_valid), r)
                writer.append(batch)
                if images:
                    stored_images[(ep, r)] = np.asarray(batch.images[0])
            writer.end_episode(EpisodeRecord(episode=ep, success=ep % 2 == 0, num_env_steps=10 * n))
    return {"spec": spec, "images": stored_images}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "attention.zarr"
    info = write_planted_store(path, {0: 4, 1: 2})
    return path, info


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_panels_light_the_planted_patch_on_the_stored_image(planted, tmp_path, capsys):
    store, info = planted
    out = tmp_path / "ov"
    code = main(["overlay", str(store), "--episode", "0", "--steps", "10", "30", "--out", str(out),
                 "--alpha", "0.5", "--no-progress"])
    assert code == 0
    assert "empty_camera_0" in capsys.readouterr().err  # the dummy camera is skipped with a note
    files = sorted(p.name for p in (out / "episode_000").iterdir())
    assert files == ["image2_step0010.png", "image2_step0030.png", "image_step0010.png", "image_step0030.png"]
    layout = panel_layout((448, 448), with_overlay=True)
    for cam in ("image", "image2"):
        for rollout, step in ((1, 10), (3, 30)):
            panel = read_png(out / "episode_000" / f"{cam}_step{step:04d}.png")
            assert panel.shape == (layout.height, layout.width, 3)
            heat = layout.crop(panel, "heat")[::2, ::2]  # undo the 2x zoom
            # heads mean, renormalised in the camera: the planted patch holds 1/2 (head 0), the
            # head-1 patch 1/2 as well with 2 heads -> both at the top of the scale
            r0, c0 = hot_patch(cam, rollout)
            r1, c1 = hot_patch(cam, rollout, head_one=True)
            lit = block_mask(r0, c0) | block_mask(r1, c1)
            assert np.all(heat[lit] == cmap_rgb(1.0))
            assert np.all(heat[~lit] == cmap_rgb(0.0))
            image = info["images"][(0, rollout)][["image", "image2"].index(cam)]
            overlay = layout.crop(panel, "overlay")[::2, ::2]
            expected = np.rint(0.5 * image + 0.5 * np.where(lit[..., None], cmap_rgb(1.0), cmap_rgb(0.0)))
            np.testing.assert_array_equal(overlay, expected.astype(np.uint8))


def test_one_head_and_total_scale_read_the_planted_values(planted):
    import attnstore

    store, _ = planted
    ds = attnstore.open_attention(store)
    rows = np.flatnonzero(ds[S.EPISODE].values == 0)
    head1 = camera_grids(ds, rows, ["image"], layer=17, denoise=9, heads=1, renormalize=False)["image"]
    mean = camera_grids(ds, rows, ["image2"], layer=16, denoise=0, heads="mean", renormalize=False)["image2"]
    for i, rollout in enumerate(ds[S.ROLLOUT].values[rows]):
        expected1 = np.zeros((16, 16))
        expected1[hot_patch("image", rollout, head_one=True)] = CAMERA_MASS["image"]
        np.testing.assert_allclose(head1[i], expected1, atol=1e-4)  # uint16 storage: 7.6e-6 per key
        expected = np.zeros((16, 16))
        expected[hot_patch("image2", rollout)] += CAMERA_MASS["image2"] / 2
        expected[hot_patch("image2", rollout, head_one=True)] += CAMERA_MASS["image2"] / 2
        np.testing.assert_allclose(mean[i], expected, atol=1e-4)


def test_cli_single_head_lights_only_its_patch(planted, tmp_path):
    store, _ = planted
    out = tmp_path / "h1"
    assert main(["overlay", str(store), "--episode", "1", "--rollouts", "1", "--heads", "1",
                 "--camera", "image", "--scale", "total", "--out", str(out), "--no-progress"]) == 0
    (png,) = (out / "episode_001").iterdir()
    heat = panel_layout((448, 448), True).crop(read_png(png), "heat")[::2, ::2]
    lit = block_mask(*hot_patch("image", 1, head_one=True))
    assert np.all(heat[lit] == cmap_rgb(1.0)) and np.all(heat[~lit] == cmap_rgb(0.0))


def test_cli_video_has_one_frame_per_inference(planted, tmp_path):
    store, _ = planted
    out = tmp_path / "vid"
    assert main(["overlay", str(store), "--episode", "0", "--video", "--out", str(out), "--no-progress"]) == 0
    layout = panel_layout((448, 448), with_overlay=True)
    assert not (out / "episode_000").exists()  # --video alone: videos only
    for cam in ("image", "image2"):
        path = out / f"episode_000_{cam}.mp4"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert float(stream.average_rate) == pytest.approx(2.0)  # 10 env steps at 20 Hz per frame
        assert len(frames) == 4
        assert frames[0].shape == (layout.height, layout.width, 3)
        for rollout, frame in enumerate(frames):  # lossy h264: the planted block is the bright one
            heat = layout.crop(frame, "heat")[::2, ::2].astype(float).mean(-1)
            lit = block_mask(*hot_patch(cam, rollout))
            assert heat[lit].mean() > 150 and np.percentile(heat[~lit], 95) < 60


def test_store_without_images_draws_heat_alone(tmp_path, capsys):
    store = tmp_path / "noimg.zarr"
    write_planted_store(store, {0: 1}, images=False)
    result = write_overlays(store, OverlayOptions(episode=0, out_dir=tmp_path / "o", cameras=("image",),
                                                  progress=False))
    assert any("no images" in n for n in result.notes)
    (png,) = result.pngs
    layout = panel_layout((448, 448), with_overlay=False)
    panel = read_png(png)
    assert panel.shape == (layout.height, layout.width, 3)
    heat = layout.crop(panel, "heat")[::2, ::2]
    lit = block_mask(*hot_patch("image", 0)) | block_mask(*hot_patch("image", 0, head_one=True))
    assert np.all(heat[lit] == cmap_rgb(1.0)) and np.all(heat[~lit] == cmap_rgb(0.0))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--episode", "7"], "holds episodes 0-1"),
        (["--episode", "0", "--steps", "5"], "captured env steps: 0, 10, 20, 30"),
        (["--episode", "0", "--rollouts", "9"], "captured rollouts: 0-3"),
        (["--episode", "0", "--layer", "3"], "layers 16-17"),
        (["--episode", "0", "--denoise", "4"], "denoise steps 0, 9"),
        (["--episode", "0", "--camera", "wrist"], "cameras are image, image2"),
        (["--episode", "0", "--heads", "5"], "2 heads"),
        (["--episode", "0", "--action-idx", "4"], "4 action tokens"),
    ],
)
def test_bad_selection_is_one_line_error_and_writes_nothing(planted, tmp_path, capsys, args, message):
    store, _ = planted
    out = tmp_path / "bad"
    assert main(["overlay", str(store), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstore: error:") and "\n" not in err and message in err
    assert not out.exists()


def test_write_mp4_crops_odd_sizes_and_leaves_nothing_on_failure(tmp_path):
    from attnstore.errors import StoreError
    from attnstore.readers.video import write_mp4

    frames = [np.full((51, 65, 3), 40 * i, np.uint8) for i in range(3)]
    assert write_mp4(tmp_path / "odd.mp4", frames, fps=5) == 3
    with av.open(str(tmp_path / "odd.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 3 and decoded[0].shape == (50, 64, 3)
    assert [int(round(f.mean())) for f in decoded] == pytest.approx([0, 40, 80], abs=3)
    with pytest.raises(StoreError, match="no frames"):
        write_mp4(tmp_path / "empty.mp4", [], fps=5)
    with pytest.raises(StoreError, match="the first was"):
        write_mp4(tmp_path / "mixed.mp4", [frames[0], np.zeros((10, 10, 3), np.uint8)], fps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]  # no partial files left
