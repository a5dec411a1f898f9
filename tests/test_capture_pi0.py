"""AttentionRecorder on a real (tiny, random-weight) lerobot Pi0 writing a real Zarr store.

References are computed independently of the code under test: the softmax is recomputed in float64 from
the Q, K and mask lerobot's attention function received (a test-side wrapper of transformers'
``eager_attention_forward``), the key layout is spelled out by hand from lerobot's Pi0 embedding order
(``[256 patches x 3 camera slots | 48 language | state | 50 actions]``), validity from the tokenizer's mask.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from attnstore import schema as S  # noqa: E402
from attnstore.capture import AttentionRecorder, find_tokenizer, load_policy  # noqa: E402
from attnstore.capture.tiny import MARKER_NAME, TinyDims, make_tiny_policy  # noqa: E402
from attnstore.errors import CaptureError  # noqa: E402
from attnstore.schema import EpisodeRecord, TokenLayout  # noqa: E402
from attnstore.store.open import open_attention  # noqa: E402
from attnstore.store.writer import AttentionWriter  # noqa: E402
from spies import spy_appends  # noqa: E402

TASKS = ("pick up the alphabet soup and place it in the basket", "put the bowl on the plate")
CAM = "observation.images."
N_LANG, N_ACT, PATCHES = 48, 50, 256
LANG0 = 3 * PATCHES  # image, image2, empty_camera_0
STATE = LANG0 + N_LANG  # 816
ACT0 = STATE + 1  # 817
N_KEYS = ACT0 + N_ACT  # 867


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "pi0", seed=0, policy_type="pi0")


@pytest.fixture(scope="module")
def tiny(ckpt):
    """(policy, preprocessor, postprocessor) of the tiny Pi0 checkpoint, loaded like a real one."""
    return load_policy(ckpt)


def observation(batch_size: int, seed: int = 0, size: int = 256, cameras=("image", "image2")) -> dict:
    """A LIBERO-like observation after lerobot's env processors: float images in [0, 1] on a 1/255 grid."""
    g = torch.Generator().manual_seed(seed)
    obs = {f"{CAM}{c}": torch.randint(0, 256, (batch_size, 3, size, size), generator=g).float() / 255 for c in cameras}
    obs["observation.state"] = torch.rand(batch_size, 8, generator=g) * 0.2
    obs["task"] = [TASKS[i % 2] for i in range(batch_size)]
    return obs


class GemmaSpy:
    """Records the inputs of transformers' Gemma eager attention for chosen modules and a float64 softmax
    recomputed from them (queries, keys, additive mask), plus what lerobot's attention returned."""

    def __init__(self, modules):
        self.names = {id(m): name for name, m in modules.items()}
        self.reference: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.returned: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    @contextlib.contextmanager
    def installed(self):
        from transformers.models.gemma import modeling_gemma

        original = modeling_gemma.eager_attention_forward

        def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            out = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            name = self.names.get(id(module))
            if name is not None:
                k = key.double().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
                scores = query.double() @ k.transpose(2, 3) * scaling
                if attention_mask is not None:
                    scores = scores + attention_mask.double()
                self.reference[name].append(torch.softmax(scores, dim=-1))
                self.returned[name].append(out[1].detach().clone())
            return out

        modeling_gemma.eager_attention_forward = spy
        try:
            yield self
        finally:
            modeling_gemma.eager_attention_forward = original


def expert_attn(policy, i):
    return policy.model.paligemma_with_expert.gemma_expert.model.layers[i].self_attn


def vlm_attn(policy, i):
    return policy.model.paligemma_with_expert.paligemma.model.language_model.layers[i].self_attn


def expected_regions() -> list[str]:
    return ["image"] * PATCHES + ["image2"] * PATCHES + ["empty_camera_0"] * PATCHES + ["language"] * N_LANG + [
        "state"] + ["action"] * N_ACT


def expected_valid(lang_mask: np.ndarray) -> np.ndarray:
    valid = np.ones((lang_mask.shape[0], N_KEYS), bool)
    valid[:, 2 * PATCHES : 3 * PATCHES] = False  # the empty camera
    valid[:, LANG0:STATE] = lang_mask
    return valid


def test_matches_independent_softmax_and_round_trips(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(2, seed=1))
    store = tmp_path / "attention.zarr"
    spy = GemmaSpy({"e0": expert_attn(policy, 0), "e1": expert_attn(policy, 1), "v0": vlm_attn(policy, 0)})
    with AttentionWriter(store) as writer:
        seen = spy_appends(writer)
        with spy.installed(), AttentionRecorder(
            policy, writer, layers="all", prefix=[0], tokenizer=find_tokenizer(pre), encoding="float32"
        ) as rec:
            policy.reset()
            policy.select_action(batch)
        assert rec.inferences == 1
    captured = seen[0]["attention"]  # (B, D, L, H, Q, K)
    assert captured.shape == (2, 10, 2, 8, N_ACT, N_KEYS)
    for slot, name in enumerate(("e0", "e1")):
        assert len(spy.reference[name]) == 10  # one expert call per denoise step
        for d, (ref, ret) in enumerate(zip(spy.reference[name], spy.returned[name])):
            assert ref.shape == (2, 8, 1 + N_ACT, N_KEYS)  # queries: the state token, then the actions
            assert (captured[:, d, slot].double() - ref[:, :, 1:]).abs().max().item() <= 1e-5
            assert torch.equal(captured[:, d, slot], ret[:, :, 1:])  # exactly what lerobot computed
    # prefix pass: VLM layer 0 over cameras + language; the state token is not in it (zero row and column)
    (ref,) = spy.reference["v0"]
    prefix = seen[0]["prefix"][:, 0]
    assert ref.shape == (2, 8, STATE, STATE) and prefix.shape == (2, 8, ACT0, ACT0)
    assert (prefix[:, :, :STATE, :STATE].double() - ref).abs().max().item() <= 1e-5
    assert (prefix[:, :, STATE] == 0).all() and (prefix[:, :, :, STATE] == 0).all()

    ds = open_attention(store)
    np.testing.assert_array_equal(ds[S.ATTENTION].values, captured.numpy())  # float32 encoding: exact
    assert list(ds[S.LAYER].values) == [0, 1] and "layer_kind" not in ds.coords  # all self-attention
    np.testing.assert_allclose(ds[S.TIME].values, np.arange(10, 0, -1) / 10, atol=1e-6)
    assert ds.attrs["attnstore_spec"]["layout"]["num_state"] == 1


def test_layout_masks_rows_images_language(tiny, tmp_path):
    policy, pre, _ = tiny
    obs = observation(2, seed=3)
    batch = pre(obs)
    store = tmp_path / "attention.zarr"
    tokenizer = find_tokenizer(pre)
    with AttentionWriter(store) as writer:
        seen = spy_appends(writer)
        with AttentionRecorder(policy, writer, layers="last:1", denoise_steps="0,-1", tokenizer=tokenizer,
                               encoding="float32"):  # the exact probabilities: rows sum to 1
            policy.reset()
            policy.select_action(batch)
    ds = open_attention(store)
    lang_mask = batch["observation.language.attention_mask"].numpy().astype(bool)
    assert lang_mask.shape == (2, N_LANG) and 0 < lang_mask.sum(1).min() and lang_mask.sum(1).max() < N_LANG

    assert ds[S.KEY_REGION].values.tolist() == expected_regions()
    assert ds[S.KEY_KIND].values[STATE] == "state" and ds[S.PATCH_ROW].values[STATE] == -1
    assert ds[S.PATCH_ROW].values[PATCHES + 17] == 1 and ds[S.PATCH_COL].values[PATCHES + 17] == 1
    valid = expected_valid(lang_mask)
    np.testing.assert_array_equal(ds[S.KEY_VALID].values, valid)

    raw = seen[0]["attention"].numpy().astype(np.float64)  # (B, D, L, H, Q, K) before encoding
    v = np.broadcast_to(valid[:, None, None, None, None], raw.shape)
    np.testing.assert_allclose(np.where(v, raw, 0).sum(-1), 1.0, atol=1e-5)  # rows sum to 1
    assert (raw[~v] == 0).all()  # masked keys (empty camera, language padding) exactly 0
    assert (raw[..., STATE] > 0).all()  # every action token sees the state token
    assert (raw[..., ACT0:] > 0).all()  # and every action token (bidirectional block)
    stored = ds[S.ATTENTION].values
    assert (stored[~v] == 0).all()

    # images: what the policy saw (256 px resized with padding to 224 by lerobot), upright, uint8
    from lerobot.policies.common.vla_utils import resize_with_pad_torch

    for c, cam in enumerate(("image", "image2")):
        want = resize_with_pad_torch(obs[f"{CAM}{cam}"].permute(0, 2, 3, 1), 224, 224)
        want = (want * 255).round().clamp(0, 255).numpy()
        assert np.abs(ds[S.IMAGES].values[:, c].astype(np.float64) - want).max() <= 1.0
    ids = batch["observation.language.tokens"].numpy()
    np.testing.assert_array_equal(ds[S.LANGUAGE_TOKEN_ID].values, np.where(lang_mask, ids, -1))
    texts = ds[S.LANGUAGE_TOKEN_TEXT].values
    assert "".join(texts[0][lang_mask[0]]) == tokenizer.decode(ids[0][lang_mask[0]].tolist())
    np.testing.assert_array_equal(ds[S.STATE].values, batch["observation.state"].numpy())


def _run_actions(policy, batch, steps: int) -> torch.Tensor:
    policy.reset()
    torch.manual_seed(123)
    return torch.stack([policy.select_action(batch) for _ in range(steps)])


def test_actions_unchanged_and_policy_restored(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(1, seed=7))

    def snapshot():
        hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in policy.named_modules()}
        return hooks, set(policy.__dict__), set(policy.model.__dict__)

    before = snapshot()
    plain = _run_actions(policy, batch, 2)
    with AttentionWriter(tmp_path / "a.zarr") as writer, AttentionRecorder(policy, writer, layers="all", prefix=True):
        recorded = _run_actions(policy, batch, 2)
    assert torch.equal(plain, recorded)  # bit-identical with and without the recorder
    assert snapshot() == before
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionWriter(tmp_path / "b.zarr") as writer, AttentionRecorder(policy, writer):
            policy.reset()
            policy.select_action(batch)
            raise RuntimeError("boom")
    assert snapshot() == before
    assert torch.equal(_run_actions(policy, batch, 2), plain)


def test_two_envs_are_two_episodes_each_with_its_own_attention(tiny, tmp_path):
    """B=2: row b of the store is env b's own attention: the same as env b run alone with its noise."""
    policy, pre, _ = tiny
    both = pre(observation(2, seed=11))
    noise = torch.randn(2, N_ACT, policy.config.max_action_dim, generator=torch.Generator().manual_seed(3))
    runs = []
    for b in (None, 0, 1):
        batch = both if b is None else {k: (v[b : b + 1] if hasattr(v, "shape") else v) for k, v in both.items()}
        store = tmp_path / f"run{b}.zarr"
        with AttentionWriter(store) as writer, AttentionRecorder(policy, writer, layers="all", encoding="float32"):
            policy.reset()
            policy.predict_action_chunk(batch, noise=noise if b is None else noise[b : b + 1])
        runs.append(open_attention(store))
    assert runs[0][S.EPISODE].values.tolist() == [0, 1]
    att = runs[0][S.ATTENTION].values
    assert not np.allclose(att[0], att[1])  # different prompts, images and noise
    for b in (0, 1):
        np.testing.assert_allclose(att[b], runs[1 + b][S.ATTENTION].values[0], atol=1e-5)
        np.testing.assert_array_equal(runs[0][S.KEY_VALID].values[b], runs[1 + b][S.KEY_VALID].values[0])


def test_prefix_is_noise_independent_per_env(tiny, tmp_path):
    """The VLM prefix attention does not depend on the noise: row b with B=2 equals env b alone."""
    policy, pre, _ = tiny
    both = pre(observation(2, seed=12))
    rows = []
    for b in (None, 0, 1):
        batch = both if b is None else {k: (v[b : b + 1] if hasattr(v, "shape") else v) for k, v in both.items()}
        with AttentionWriter(tmp_path / f"p{b}.zarr") as writer, AttentionRecorder(
            policy, writer, layers="last:1", denoise_steps="final", prefix=[1], encoding="float32"
        ):
            policy.reset()
            policy.select_action(batch)
        rows.append(open_attention(tmp_path / f"p{b}.zarr")[S.PREFIX_ATTENTION].values)
    for b in (0, 1):
        np.testing.assert_allclose(rows[0][b], rows[1 + b][0], atol=1e-5)


def test_type_and_weight_checks_fail_in_one_line(ckpt, tiny, tmp_path):
    from attnstore.capture.checkpoint import check_weights_loaded, require_supported
    from attnstore.capture.tiny_pi0 import build_tiny_policy, tiny_config

    policy, _, _ = tiny
    for ok in (policy, policy.config, "pi0", {"type": "pi0"}):
        require_supported(ok)
    other = build_tiny_policy(tiny_config(), dims=TinyDims(vlm_width=48, expert_width=24))
    with pytest.raises(CaptureError, match=r"does not match its config: .* shape mismatches") as err:
        check_weights_loaded(other, ckpt)
    assert "\n" not in str(err.value)
    act = tmp_path / "act"
    shutil.copytree(ckpt, act)
    cfg = json.loads((act / "config.json").read_text())
    cfg["type"] = "act"
    (act / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaptureError, match=r"'act' policy; attnstore records lerobot's Pi0.5, Pi0 and SmolVLA"):
        load_policy(act)
    writer = AttentionWriter(tmp_path / "x.zarr")
    with pytest.raises(CaptureError, match="supported types: pi05, pi0, smolvla"):
        AttentionRecorder(torch.nn.Linear(2, 2), writer)
    with pytest.raises(CaptureError, match=r"out of range: this model has 2 \(valid 0\.\.1"):
        AttentionRecorder(policy, writer, layers="5")
    writer.close()


def test_cli_make_tiny_policy_type(tmp_path):
    from attnstore.cli import main

    out = tmp_path / "cli_pi0"
    assert main(["make-tiny-policy", str(out), "--type", "pi0", "--cameras", "image"]) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["policy_type"] == "pi0" and marker["cameras"] == ["image"]
    assert json.loads((out / "config.json").read_text())["type"] == "pi0"
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    tok = next(s for s in pre["steps"] if s["registry_name"] == "tokenizer_processor")
    assert tok["config"]["tokenizer_name"] == str((out / "tokenizer").resolve())


def test_token_layout_state_field_round_trips_and_leaves_pi05_unchanged():
    pi05 = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False))
    assert set(pi05.to_dict()) == {"cameras", "camera_present", "grid_rows", "grid_cols", "num_language", "num_action"}
    pi0 = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False), num_language=48, num_state=1)
    assert pi0.num_keys == N_KEYS and pi0.prefix_len == ACT0
    assert TokenLayout.from_dict(pi0.to_dict()) == pi0
    assert pi0.key_coords()[S.KEY_REGION].tolist() == expected_regions()
    assert pi0.region_slice("state") == slice(STATE, ACT0) and pi0.regions[-2:] == ("state", "action")


# ---- readers on a Pi0 store ---------------------------------------------------------------------------
def check_readers(store, tmp_path, camera: str = "image") -> None:
    """Every reader works on ``store`` unchanged: analyses, plots, overlays, export-pt, inspect, viewer."""
    from attnstore.cli import main
    from attnstore.readers import action_to_visual, entropy, region_shares, top_k_patches

    ds = open_attention(store)
    layout = TokenLayout.from_dict(ds.attrs["attnstore_spec"]["layout"])
    shares = region_shares(ds).compute()
    np.testing.assert_allclose(shares.sum("region").values, 1.0, atol=1e-5)
    regions = set(shares["region"].values.tolist())
    assert {"language", "action", camera} <= regions
    grid = action_to_visual(ds, camera, renormalize=True).compute()
    assert grid.sizes["patch_row"] == layout.grid_rows and grid.sizes["patch_col"] == layout.grid_cols
    np.testing.assert_allclose(grid.sum(("patch_row", "patch_col")).values, 1.0, atol=1e-5)
    assert np.isfinite(entropy(ds, normalize=True).compute().values).all()
    assert top_k_patches(ds, camera, k=3).sizes["rank"] == 3
    assert main(["inspect", str(store)]) == 0
    assert main(["plot", str(store), "--out", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").rglob("*.png"))
    assert main(["overlay", str(store), "--episode", "0", "--all", "--out", str(tmp_path / "overlay")]) == 0
    assert list((tmp_path / "overlay").rglob("*.png"))
    assert main(["export-pt", str(store), str(tmp_path / "pt")]) == 0
    files = sorted((tmp_path / "pt").rglob("*.pt"))
    data = torch.load(files[0], weights_only=True)
    maps = data["rollout_steps"][0]["attention_maps"]
    first = next(iter(next(iter(maps.values()))["attention_weights"].values()))
    assert tuple(first.shape) == (1, int(ds.sizes["head"]), layout.num_action, layout.num_keys)
    assert main(["view", str(store), "--episode", "0", "--save", str(tmp_path / "rrd")]) == 0
    assert list((tmp_path / "rrd").rglob("*.rrd"))


def test_readers_work_on_a_pi0_store(tiny, tmp_path):
    policy, pre, _ = tiny
    store = tmp_path / "attention.zarr"
    with AttentionWriter(store) as writer:
        with AttentionRecorder(policy, writer, layers="all", denoise_steps="0,-1", tokenizer=find_tokenizer(pre)):
            policy.reset()
            batch = pre(observation(1, seed=21))
            for _ in range(2 * policy.config.n_action_steps):  # two model runs
                policy.select_action(batch)
        writer.end_episode(EpisodeRecord(episode=0, task_group="libero_object", task_id=0, task=TASKS[0],
                                         success=False, num_env_steps=20))
    check_readers(store, tmp_path)
