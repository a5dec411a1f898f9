"""Summary plots of a store with successful and failed episodes.

The numbers behind the figures are checked against a numpy computation on the ground-truth
attention the synthetic writer handed to the real AttentionWriter; the figures' plotted lines are
read back from the matplotlib objects; the CLI's PNGs are decoded and must not be blank.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attnstore import schema as S
from attnstore.cli import main
from attnstore.store.open import open_attention
from attnstore.readers.plots import (
    ENTROPY_LABEL,
    by_env_step,
    region_shares_figure,
    success_failure_figure,
    summarize,
)
from synthetic import make_spec, write_synthetic_store

EPISODES = {0: 4, 1: 3, 2: 5, 3: 2}  # even episodes succeed, odd ones fail (synthetic convention)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "attention.zarr"
    spec = make_spec(num_language=12, num_action=4, num_heads=2, denoise_steps=(0, 5, 9), images=False,
                     actions=False, encoding="float32")  # exact storage: tight comparisons
    truth = write_synthetic_store(path, spec, episodes=EPISODES, n_valid_language=7)
    return path, truth


def reference_tables(truth):
    """Region shares (row, denoise, layer, region) and entropy in bits (row, denoise, layer), numpy only."""
    lay = truth["spec"].layout
    att = truth["attention"].astype(np.float64).mean(axis=(3, 4))  # mean over heads, queries -> (N, D, L, K)
    present = [c for c, p in zip(lay.cameras, lay.camera_present) if p]
    regions = [*present, S.REGION_LANGUAGE, S.REGION_ACTION]
    sums = np.stack([att[..., lay.region_slice(r)].sum(-1) for r in regions], axis=-1)
    shares = sums / att.sum(-1, keepdims=True)
    p = truth["attention"].astype(np.float64) * truth["key_valid"][:, None, None, None, None, :]
    p = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.where(p > 0, p * np.log2(p), 0.0).sum(-1).mean(axis=(3, 4))
    return regions, shares, bits


def test_summary_matches_numpy_reference(store):
    path, truth = store
    summary = summarize(open_attention(path))
    regions, shares, bits = reference_tables(truth)
    assert summary.regions == regions
    order = np.lexsort((summary.env_step, summary.episode))  # store rows vs truth rows: same commit order
    np.testing.assert_array_equal(summary.episode[order], truth["episode"])
    np.testing.assert_allclose(summary.shares.values[order], shares, atol=1e-6)
    np.testing.assert_allclose(summary.entropy.values[order], bits, atol=1e-4)
    assert summary.outcomes == {0: "success", 1: "failure", 2: "success", 3: "failure"}


def test_success_vs_failure_figure_plots_the_group_means(store):
    path, truth = store
    summary = summarize(open_attention(path))
    regions, shares, _ = reference_tables(truth)
    fig = success_failure_figure(summary, layer=17, denoise=9, subtitle="x")
    axes = fig.axes[:2]
    d, l = [0, 5, 9].index(9), [16, 17].index(17)
    for ax, episodes in zip(axes, ([0, 2], [1, 3])):
        assert ax.get_xlabel() and ax.get_title()
        rows = np.isin(truth["episode"], episodes)
        steps = np.unique(truth["env_step"][rows])
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == regions
        for i, region in enumerate(regions):
            expected = [shares[rows & (truth["env_step"] == s), d, l, i].mean() for s in steps]
            np.testing.assert_array_equal(lines[region].get_xdata(), steps)
            np.testing.assert_allclose(lines[region].get_ydata(), expected, atol=1e-6)
    assert "success: 2 episode(s)" in axes[0].get_title() and "failure: 2 episode(s)" in axes[1].get_title()
    assert fig.legends and axes[0].get_ylabel()


def test_region_shares_figure_of_one_episode(store):
    path, truth = store
    ds = open_attention(path)
    rows = np.flatnonzero(ds[S.EPISODE].values == 2)
    summary = summarize(ds, rows)
    fig = region_shares_figure(summary, layer=16, denoise=0, subtitle="episode 2")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == len(summary.regions) and ax.get_legend() is not None
    np.testing.assert_array_equal(lines[0].get_xdata(), [0, 10, 20, 30, 40])
    assert "env step" in ax.get_xlabel() and "fraction" in ax.get_ylabel()


def test_by_env_step_averages_episodes_at_each_step():
    values = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    steps, means = by_env_step(values, np.array([10, 0, 10]))
    np.testing.assert_array_equal(steps, [0, 10])
    np.testing.assert_array_equal(means, [[3.0, 2.0], [3.0, 2.0]])


def _not_blank(path):
    img = np.asarray(Image.open(path).convert("L"), float)
    return img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 10


def test_cli_writes_all_figures_for_the_store(store, tmp_path, capsys):
    path, _ = store
    assert main(["plot", str(path), "--out", str(tmp_path / "all")]) == 0
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == ["entropy_per_denoise.png", "per_layer.png", "region_shares.png", "success_vs_failure.png"]
    assert all(_not_blank(tmp_path / "all" / n) for n in names)
    assert "success_vs_failure.png" in capsys.readouterr().out


def test_cli_one_episode_and_bad_episode(store, tmp_path, capsys):
    path, _ = store
    assert main(["plot", str(path), "--episode", "1", "--out", str(tmp_path / "one")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["entropy_per_denoise.png", "per_layer.png", "region_shares.png"]
    capsys.readouterr()
    assert main(["plot", str(path), "--episode", "9", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstore: error:") and "\n" not in err and "holds episodes 0-3" in err
    assert not (tmp_path / "bad").exists()
    assert ENTROPY_LABEL.endswith("(bits)")
