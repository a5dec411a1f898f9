"""Per-layer summaries: computed on the device in the recorder's hooks, stored for every layer, read back.

Truth is an independent float64 numpy recomputation from the probabilities themselves: the ones handed to
the writer for the layers stored in full (a spy on ``writer.append``), or random rows for the pure-torch
functions. Stored summaries are float16, so they must match to float16 precision (2**-11 relative).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attnstore import schema as S  # noqa: E402
from attnstore.capture.summary import SummaryPlan  # noqa: E402
from attnstore.errors import SchemaError, SelectionError  # noqa: E402
from attnstore.schema import StoreSpec, TokenLayout  # noqa: E402
from attnstore.schema import variables as V  # noqa: E402

F16 = 2.0**-11  # float16's relative rounding error (half an ulp)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
LAYOUT = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False), grid_rows=4, grid_cols=4,
                     num_language=6, num_action=5)


# ---- the independent float64 recomputation --------------------------------------------------------
def reference(att: np.ndarray, valid: np.ndarray, layout: TokenLayout) -> dict[str, np.ndarray]:
    """float64 summaries of (B, ..., H, Q, K) attention with (B, K) key validity."""
    att = np.asarray(att, np.float64)
    mass = np.stack([att[..., layout.region_slice(r)].sum(-1) for r in layout.regions], -1)
    v = valid.reshape(valid.shape[0], *([1] * (att.ndim - 2)), valid.shape[1]).astype(bool)
    pv = np.where(v, att, 0.0)
    q = pv / pv.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(q > 0, q * np.log(q), 0.0).sum(-1)
    mean = att.mean(axis=(-3, -2))
    cams = [c for c, p in zip(layout.cameras, layout.camera_present) if p]
    grid = np.stack([mean[..., layout.region_slice(c)].reshape(*mean.shape[:-1], layout.grid_rows, layout.grid_cols)
                     for c in cams], -3)
    return {"mass": mass, "entropy": ent, "grid": grid}


def random_attention(rng, layout: TokenLayout, lead: tuple[int, ...], n_valid_language: list[int]):
    """Softmax rows (B, *lead, K) with masked keys exactly 0 (missing camera, language padding)."""
    b = len(n_valid_language)
    valid = np.repeat(layout.static_key_valid()[None], b, axis=0)
    lang = layout.region_slice("language")
    for i, n in enumerate(n_valid_language):
        valid[i, lang.start + n : lang.stop] = False
    logits = rng.normal(0, 2, (b, *lead, layout.num_keys))
    vshape = (b, *([1] * len(lead)), layout.num_keys)
    logits = np.where(valid.reshape(vshape), logits, -np.inf)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    return (att / att.sum(-1, keepdims=True)).astype(np.float32), valid


def assert_f16_close(got, want, what: str, scale: float = 1.0) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = F16 * np.abs(want) + 1e-6 * scale
    err = np.abs(got - want)
    assert (err <= bound).all(), f"{what}: max error {err.max():.3g} (bound {bound.max():.3g})"


# ---- the torch functions ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_plan_matches_float64_numpy(device):
    rng = np.random.default_rng(0)
    att, valid = random_attention(rng, LAYOUT, (2, 5), [6, 2])  # (B, H, Q, K)
    plan = SummaryPlan(LAYOUT, device)
    rows = plan.key_valid(torch.as_tensor(valid[:, LAYOUT.region_slice("language")]).to(device))
    np.testing.assert_array_equal(rows.cpu().numpy(), valid.astype(np.float32))
    mass, ent, grid = (t.cpu().numpy() for t in plan.expert(torch.as_tensor(att).to(device), rows))
    want = reference(att, valid, LAYOUT)
    np.testing.assert_allclose(mass, want["mass"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, want["entropy"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grid, want["grid"], rtol=1e-5, atol=1e-7)
    assert grid.shape == (2, 2, 4, 4) and ent.shape == (2, 2, 5) and mass.shape == (2, 2, 5, 5)
    # bfloat16 input (the GPU's dtype) goes through the same float32 path
    bf = torch.as_tensor(att).to(device, torch.bfloat16)
    mass_bf = plan.expert(bf, rows)[0].cpu().numpy()
    np.testing.assert_allclose(mass_bf, reference(bf.float().cpu().numpy(), valid, LAYOUT)["mass"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_over_layers_equals_one_layer_at_a_time(device):
    """The staged path summarises (B, L, H, Q, K) at once; it must equal the per-hook (B, H, Q, K) one."""
    rng = np.random.default_rng(1)
    att, valid = random_attention(rng, LAYOUT, (3, 2, 5), [1, 6])  # (B, L, H, Q, K)
    plan = SummaryPlan(LAYOUT, device)
    rows = plan.key_valid(torch.as_tensor(valid[:, LAYOUT.region_slice("language")]).to(device))
    batched = plan.expert(torch.as_tensor(att).to(device), rows)
    for layer in range(3):
        single = plan.expert(torch.as_tensor(att[:, layer]).to(device), rows)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[:, layer], s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("log", ["numpy", "torch"])
@pytest.mark.parametrize("n_valid", [[2, 4], [0, 0]])
def test_either_cpu_log_gives_the_float64_entropy(log, n_valid, monkeypatch):
    """cpu_log picks numpy's or torch's log by timing: each must give the recomputed entropies (language
    padding in every row, or none)."""
    from attnstore.capture import summary

    monkeypatch.setattr(summary, "_CPU_LOG", [getattr(summary, f"_log_tiny_{log}")])
    rng = np.random.default_rng(3)
    att, valid = random_attention(rng, LAYOUT, (2, 5), n_valid)
    plan = SummaryPlan(LAYOUT, "cpu")
    rows = plan.key_valid(torch.as_tensor(valid[:, LAYOUT.region_slice("language")]))
    ent = plan.expert(torch.as_tensor(att), rows)[1].numpy()
    np.testing.assert_allclose(ent, reference(att, valid, LAYOUT)["entropy"], rtol=1e-5, atol=1e-5)


def test_entropy_of_uniform_rows_and_of_rows_without_mass():
    lay = TokenLayout(("image",), (True,), grid_rows=1, grid_cols=2, num_language=2, num_action=1)
    plan = SummaryPlan(lay, "cpu")
    rows = plan.key_valid(torch.tensor([[True, False]]))
    p = torch.tensor([[[[0.25, 0.25, 0.25, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0, 0.0]]]])
    mass, ent, grid = plan.expert(p, rows)
    assert ent[0, 0].tolist() == pytest.approx([np.log(4), 0.0])
    assert mass[0, 0, 0].tolist() == [0.5, 0.25, 0.25]
    assert grid.tolist() == [[[[0.125, 0.125]]]]  # head-and-token mean (the all-zero row counts)


def test_prefix_summary_matches_float64_numpy():
    rng = np.random.default_rng(2)
    p = LAYOUT.prefix_len
    att, valid = random_attention(rng, dataclasses.replace(LAYOUT, num_action=1), (2, p), [3])
    att = att[..., :p]
    att = att / att.sum(-1, keepdims=True)
    valid = valid[:, :p]
    plan = SummaryPlan(LAYOUT, "cpu")
    rows = plan.key_valid(torch.as_tensor(valid[:, LAYOUT.region_slice("language")]))
    mass, ent = plan.prefix(torch.as_tensor(att), rows)
    regions = LAYOUT.regions
    want = np.stack([att[..., LAYOUT.region_slice(r)].sum(-1) if r != "action" else np.zeros(att.shape[:-1])
                     for r in regions], -1)
    np.testing.assert_allclose(mass.numpy(), want, rtol=1e-5, atol=1e-6)
    full = np.concatenate([valid, np.ones((1, LAYOUT.num_action), bool)], 1)
    want_ent = reference(np.concatenate([att, np.zeros((*att.shape[:-1], LAYOUT.num_action), np.float32)], -1),
                         full, LAYOUT)["entropy"]
    np.testing.assert_allclose(ent.numpy(), want_ent, rtol=1e-5, atol=1e-5)


# ---- the schema ---------------------------------------------------------------------------------------
def test_spec_emits_summary_fields_only_when_present():
    spec = StoreSpec(layout=LAYOUT, layers=(3,), denoise_steps=(0, 1), num_denoise_steps=2, num_layers=4)
    assert "summary_layers" not in spec.to_dict() and "summary_prefix_layers" not in spec.to_dict()
    assert not any(v.name in V.SUMMARY_VARIABLES for v in S.stored_variables(spec))
    full = dataclasses.replace(spec, summary_layers=(0, 1, 2, 3))
    assert StoreSpec.from_dict(full.to_dict()) == full
    shapes = {v.name: v.row_shape(full) for v in S.stored_variables(full)}
    assert shapes[V.SUMMARY_REGION_MASS] == (2, 4, 8, 5, 5)
    assert shapes[V.SUMMARY_ENTROPY] == (2, 4, 8, 5)
    assert shapes[V.SUMMARY_GRID] == (2, 4, 2, 4, 4)
    assert shapes[S.CAMERA] == () and shapes[V.REGION] == () and V.SUMMARY_PREFIX_ENTROPY not in shapes
    with pytest.raises(SchemaError, match="out of range"):
        dataclasses.replace(spec, summary_layers=(0, 4))


# ---- the recorder on the tiny Pi0.5, and the readers on its store ----------------------------------------
@pytest.fixture(scope="module")
def tiny4():
    pytest.importorskip("lerobot")
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config

    dims = TinyDims(depth=4)
    return build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)


def model_batch(batch_size: int = 2):
    from attnstore.capture.tiny import example_model_batch

    batch = example_model_batch(batch_size)
    batch["observation.language.attention_mask"][1:, 20:] = False  # rows with different padding
    return batch


def record(policy, path, *, staged=None, inferences=3, **kwargs):
    """A store of ``inferences`` model runs (B=2) and the attention handed to the writer (float32). The
    writer is drained after each run, so every run reuses the first run's host and summary buffers: a
    summary left unwritten by a run would be the previous run's, and differ from its attention."""
    from attnstore.capture import AttentionRecorder
    from attnstore.store.writer import AttentionWriter

    batch = model_batch()
    seen = []
    with AttentionWriter(path) as writer:
        append = writer.append

        def spy(b):
            seen.append({"attention": torch.as_tensor(b.attention).float().numpy().copy(),
                         "prefix": None if b.prefix_attention is None else torch.as_tensor(b.prefix_attention).float().numpy().copy(),
                         "key_valid": np.asarray(b.key_valid).copy()})
            return append(b)

        writer.append = spy
        with AttentionRecorder(policy, writer, **kwargs) as rec:
            rec._stage_summaries = staged
            policy.reset()
            torch.manual_seed(0)
            for _ in range(inferences):
                for _ in range(policy.config.n_action_steps):
                    policy.select_action(batch)
                writer.flush()
            assert len(rec._ring) == 1  # one set of buffers, reused by every run
    return seen


@pytest.fixture(scope="module")
def last2_store(tiny4, tmp_path_factory):
    path = tmp_path_factory.mktemp("summary") / "attention.zarr"
    # the per-hook path: the float32 probabilities are in the batch when it is appended (the staged path
    # fills its uint16 on the writer thread), so the spy sees what the summaries were computed from
    seen = record(tiny4, path, staged=False, layers=[1, 3], prefix=[1])
    return path, seen


@pytest.mark.lerobot
def test_summaries_exist_for_every_layer_and_match_the_full_attention(last2_store):
    from attnstore.store.open import open_attention

    path, seen = last2_store
    ds = open_attention(path)
    assert ds[V.SUMMARY_LAYER].values.tolist() == [0, 1, 2, 3]
    assert ds[S.LAYER].values.tolist() == [1, 3]
    assert ds[V.REGION].values.tolist() == ["image", "image2", "empty_camera_0", "language", "action"]
    n = ds.sizes[S.INFERENCE]
    assert n == 6  # 3 model runs x B=2
    mass = ds[V.SUMMARY_REGION_MASS].values.astype(np.float64)
    assert mass.dtype == np.float64 and ds[V.SUMMARY_REGION_MASS].dtype == np.float16
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=5e-3)  # every layer's rows sum to 1
    assert (mass[..., 2] == 0).all()  # the missing camera slot gets nothing
    # rows in store order = appended batches' rows in order (B=2, all kept)
    att = np.concatenate([s["attention"] for s in seen])  # (I, D, 2, H, Q, K)
    valid = np.concatenate([s["key_valid"] for s in seen])
    want = reference(att, valid, open_spec(path).layout)
    stored = ds.sel({V.SUMMARY_LAYER: [1, 3]})
    assert_f16_close(stored[V.SUMMARY_REGION_MASS].values, want["mass"], "region mass")
    assert_f16_close(stored[V.SUMMARY_ENTROPY].values, want["entropy"], "entropy", scale=10)
    assert_f16_close(stored[V.SUMMARY_GRID].values, want["grid"], "grid")
    # the prefix summaries: every VLM layer; layer 1 (stored in full) matches its full map
    assert ds[V.SUMMARY_PREFIX_LAYER].values.tolist() == [0, 1, 2, 3]
    prefix = np.concatenate([s["prefix"] for s in seen])[:, 0]  # (I, H, P, P)
    lay = open_spec(path).layout
    pmass = np.stack([prefix[..., lay.region_slice(r)].sum(-1) if r != "action" else np.zeros(prefix.shape[:-1])
                      for r in lay.regions], -1)
    assert_f16_close(ds[V.SUMMARY_PREFIX_REGION_MASS].sel({V.SUMMARY_PREFIX_LAYER: 1}).values, pmass, "prefix mass")
    assert np.isfinite(ds[V.SUMMARY_PREFIX_ENTROPY].values.astype(np.float32)).all()


def open_spec(path):
    from attnstore.store.open import read_spec

    return read_spec(path)[0]


@pytest.mark.lerobot
def test_staged_summaries_equal_per_hook_ones(tiny4, tmp_path, last2_store):
    """The default staged path (one copy per hook, summarised once per model run over all layers: on the
    writer thread on the CPU, on the device on CUDA) against the per-hook path of ``last2_store``."""
    from attnstore.store.open import open_attention

    record(tiny4, tmp_path / "staged.zarr", layers=[1, 3], prefix=[1])  # the default
    staged, direct = open_attention(tmp_path / "staged.zarr"), open_attention(last2_store[0])
    for name in (V.SUMMARY_REGION_MASS, V.SUMMARY_ENTROPY, V.SUMMARY_GRID, V.SUMMARY_PREFIX_ENTROPY):
        # the same float32 operations, batched over layers or not: equal up to one float16 step
        np.testing.assert_allclose(staged[name].values.astype(np.float32), direct[name].values.astype(np.float32),
                                   rtol=2.0**-10, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(staged.attention.values, direct.attention.values)


@pytest.mark.lerobot
def test_summary_off_stores_none(tiny4, tmp_path):
    from attnstore.readers import region_shares
    from attnstore.store.open import open_attention, read_spec

    record(tiny4, tmp_path / "off.zarr", inferences=1, layers="last:1", summary=False)
    ds = open_attention(tmp_path / "off.zarr")
    assert not any(name in ds for name in V.SUMMARY_VARIABLES)
    assert read_spec(tmp_path / "off.zarr")[0].summary_layers == ()
    with pytest.raises(SelectionError, match="no per-layer summaries"):
        region_shares(ds, source="summary")


@pytest.mark.lerobot
def test_readers_give_every_layer_from_a_last2_store(last2_store):
    from attnstore.readers import action_to_visual, entropy, region_shares, top_k_patches
    from attnstore.store.open import open_attention

    ds = open_attention(last2_store[0])
    # stored layers: the summaries agree with the full maps
    full, summ = region_shares(ds), region_shares(ds, source="summary", layers=[1, 3])
    assert full.dims == summ.dims and summ[S.LAYER].values.tolist() == [1, 3]
    np.testing.assert_allclose(summ.values, full.values, atol=1e-3)
    np.testing.assert_allclose(entropy(ds, source="summary", layers=[1, 3]).values, entropy(ds).values,
                               rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(entropy(ds, over="region", normalize=True, source="summary", layers=3).values,
                               entropy(ds.sel(layer=3), over="region", normalize=True).values, atol=2e-3)
    np.testing.assert_allclose(entropy(ds, normalize=True, source="summary", layers=3).values,
                               entropy(ds.sel(layer=3), normalize=True).values, atol=2e-3)
    for renorm in (False, True):
        want = action_to_visual(ds.sel(layer=3), "image", renormalize=renorm)
        got = action_to_visual(ds, "image", renormalize=renorm, layers=3, source="summary")
        assert got.dims == want.dims
        np.testing.assert_allclose(got.values, want.values, rtol=2e-3, atol=1e-6)
    # a layer not stored in full: automatic
    shares0 = region_shares(ds, layers=0)
    assert S.LAYER not in shares0.dims and np.allclose(shares0.sum(S.REGION), 1.0)
    assert region_shares(ds, source="summary")[S.LAYER].values.tolist() == [0, 1, 2, 3]
    assert entropy(ds, layers=[0, 2]).sizes[S.LAYER] == 2
    assert action_to_visual(ds, "image2", layers=2).shape[-2:] == (16, 16)
    assert top_k_patches(ds, "image", k=3, layers=0).sizes[S.RANK] == 3
    # unchanged default: the full maps
    assert region_shares(ds)[S.LAYER].values.tolist() == [1, 3]
    with pytest.raises(SelectionError, match="head-and-token means"):
        action_to_visual(ds, "image", heads="max", layers=0)
    with pytest.raises(SelectionError, match="not in the policy's input"):
        action_to_visual(ds, "empty_camera_0", layers=0)
    with pytest.raises(SelectionError, match="neither stored in full"):
        region_shares(ds, layers=7)
    with pytest.raises(SelectionError, match="source="):
        region_shares(ds, source="maps")


@pytest.mark.lerobot
def test_plots_show_every_layer_of_a_last2_store(last2_store, tmp_path):
    from attnstore.readers.plots import summarize, write_plots
    from attnstore.store.open import open_attention

    ds = open_attention(last2_store[0])
    assert summarize(ds).shares[S.LAYER].values.tolist() == [0, 1, 2, 3]
    assert summarize(ds, source="attention").shares[S.LAYER].values.tolist() == [1, 3]
    result = write_plots(last2_store[0], tmp_path / "plots")
    assert {p.name for p in result.figures} >= {"per_layer.png", "entropy_per_denoise.png"}


@pytest.mark.lerobot
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_recorder_matches_cpu(tiny4, tmp_path):  # pragma: no cover - needs a GPU
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config
    from attnstore.store.open import open_attention

    dims = TinyDims(depth=4)
    config = tiny_config(dims=dims)
    config.device = "cuda"
    gpu = build_tiny_policy(config, seed=0, dims=dims)
    gpu.to("cuda")
    seen = record(gpu, tmp_path / "gpu.zarr", layers=[1, 3])  # staged on the device (the CUDA default)
    ds = open_attention(tmp_path / "gpu.zarr")
    att = np.concatenate([s["attention"] for s in seen])
    valid = np.concatenate([s["key_valid"] for s in seen])
    want = reference(att, valid, open_spec(tmp_path / "gpu.zarr").layout)
    assert_f16_close(ds[V.SUMMARY_REGION_MASS].sel({V.SUMMARY_LAYER: [1, 3]}).values, want["mass"], "gpu mass")
