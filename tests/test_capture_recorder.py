"""AttentionRecorder on a real (tiny, random-weight) lerobot Pi0.5 writing a real Zarr store.

References are computed independently: the softmax is recomputed in float64 from the Q, K and mask
that lerobot's attention function received (captured by a test-side wrapper of transformers'
``eager_attention_forward``), images from the test's own pixels, validity from the tokenizer's mask.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from attnstore import schema as S  # noqa: E402
from attnstore.capture import AttentionRecorder, find_tokenizer, load_policy, make_tiny_policy  # noqa: E402
from attnstore.capture.tiny import build_tiny_policy, tiny_config  # noqa: E402
from attnstore.errors import CaptureError  # noqa: E402
from attnstore.store.open import open_attention  # noqa: E402
from attnstore.store.writer import AttentionWriter  # noqa: E402
from spies import spy_appends  # noqa: E402

TASK = "pick up the alphabet soup and place it in the basket"
CAM = "observation.images."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(policy, preprocessor, postprocessor) of a tiny LIBERO-shaped checkpoint, loaded like a real one."""
    ckpt = make_tiny_policy(tmp_path_factory.mktemp("tiny") / "pi05", seed=0)
    return load_policy(ckpt)


def observation(batch_size: int, seed: int = 0, size: int = 256, cameras=("image", "image2")) -> dict:
    """A LIBERO-like observation after lerobot's env processors: float images in [0, 1] on a 1/255 grid."""
    g = torch.Generator().manual_seed(seed)
    obs = {
        f"{CAM}{c}": torch.randint(0, 256, (batch_size, 3, size, size), generator=g).float() / 255 for c in cameras
    }
    obs["observation.state"] = torch.rand(batch_size, 8, generator=g) * 0.2
    obs["task"] = [TASK if i % 2 == 0 else "put the bowl on the plate" for i in range(batch_size)]
    return obs


class AttentionSpy:
    """Records lerobot's eager attention inputs and a float64 softmax recomputed from them."""

    def __init__(self, modules):
        self.names = {id(m): name for name, m in modules.items()}
        self.calls: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.returned: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    @contextlib.contextmanager
    def installed(self):
        from transformers.models.gemma import modeling_gemma

        original = modeling_gemma.eager_attention_forward

        def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            out = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            name = self.names.get(id(module))
            if name is not None:
                groups = query.shape[1] // key.shape[1]
                k = key.double().repeat_interleave(groups, dim=1)
                scores = query.double() @ k.transpose(2, 3) * scaling
                if attention_mask is not None:
                    scores = scores + attention_mask.double()
                self.calls[name].append(torch.softmax(scores, dim=-1).float())
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


def test_matches_independent_softmax_and_round_trips(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(1))
    store = tmp_path / "attention.zarr"
    spy = AttentionSpy({"e0": expert_attn(policy, 0), "e1": expert_attn(policy, 1), "v1": vlm_attn(policy, 1)})
    with AttentionWriter(store) as writer:
        seen = spy_appends(writer)
        with spy.installed(), AttentionRecorder(
            policy, writer, layers="all", prefix=[1], tokenizer=find_tokenizer(pre), encoding="float32"
        ) as rec:  # float32: the exact probabilities reach the writer (uint16 ones are quantised before)
            policy.reset()
            torch.manual_seed(1)
            policy.select_action(batch)
        assert rec.inferences == 1
    captured = seen[0]["attention"][0]  # (D, L, H, Q, K)
    assert captured.shape == (10, 2, 8, 50, 1018)
    for slot, name in enumerate(("e0", "e1")):
        assert len(spy.calls[name]) == 10  # one call per denoise step
        reference = torch.stack([c[0] for c in spy.calls[name]])  # (D, H, Q, K)
        assert (captured[:, slot] - reference).abs().max().item() <= 1e-5
        # the hook saw exactly what lerobot's attention returned
        assert torch.equal(captured[:, slot], torch.stack([c[0] for c in spy.returned[name]]))
    prefix_ref = spy.calls["v1"][0][0]  # the prefix pass only: one call
    assert len(spy.calls["v1"]) == 1
    assert (seen[0]["prefix"][0, 0] - prefix_ref).abs().max().item() <= 1e-5

    ds = open_attention(store)
    stored = ds[S.ATTENTION].isel({S.INFERENCE: 0}).values
    err = S.MAX_ABS_ERROR["uint16"]
    assert np.abs(stored - captured.numpy()).max() <= err
    assert np.abs(ds[S.PREFIX_ATTENTION].isel({S.INFERENCE: 0}).values[0] - prefix_ref.numpy()).max() <= err
    np.testing.assert_allclose(ds[S.TIME].values, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], atol=1e-6)
    np.testing.assert_allclose(seen[0]["times"], ds[S.TIME].values, atol=1e-7)
    assert list(ds[S.LAYER].values) == [0, 1]


def test_masks_layout_images_language(tiny, tmp_path):
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
    lang_mask = batch["observation.language.attention_mask"].numpy()
    n_valid_lang = lang_mask.sum(1)
    assert 0 < n_valid_lang.min() and n_valid_lang.max() < 200  # the test needs both valid tokens and padding

    # key layout: [image 0-255 | image2 256-511 | empty_camera_0 512-767 | language 768-967 | action 968-1017]
    region = ds[S.KEY_REGION].values
    assert list(region[[0, 255, 256, 511, 512, 767, 768, 967, 968, 1017]]) == [
        "image", "image", "image2", "image2", "empty_camera_0", "empty_camera_0",
        "language", "language", "action", "action",
    ]  # fmt: skip
    assert ds[S.PATCH_ROW].values[256 + 17] == 1 and ds[S.PATCH_COL].values[256 + 17] == 1

    expected_valid = np.ones((2, 1018), bool)
    expected_valid[:, 512:768] = False
    expected_valid[:, 768:968] = lang_mask
    np.testing.assert_array_equal(ds[S.KEY_VALID].values, expected_valid)

    raw = seen[0]["attention"].numpy()  # (B, D, L, H, Q, K), before encoding
    assert raw.shape == (2, 2, 1, 8, 50, 1018)
    np.testing.assert_allclose((raw * expected_valid[:, None, None, None, None]).sum(-1), 1.0, atol=1e-5)
    assert (raw[~np.broadcast_to(expected_valid[:, None, None, None, None], raw.shape)] == 0).all()
    stored = ds[S.ATTENTION].values
    assert (stored[~np.broadcast_to(expected_valid[:, None, None, None, None], stored.shape)] == 0).all()
    np.testing.assert_allclose(ds[S.TIME].values, [1.0, 0.1], atol=1e-6)

    # images: what the policy saw (256 px resized with padding to 224 by lerobot), upright, uint8
    from lerobot.policies.common.vla_utils import resize_with_pad_torch

    for c, cam in enumerate(("image", "image2")):
        want = resize_with_pad_torch(obs[f"{CAM}{cam}"].permute(0, 2, 3, 1), 224, 224)
        want = (want * 255).round().clamp(0, 255).numpy()
        got = ds[S.IMAGES].values[:, c].astype(np.float64)
        assert np.abs(got - want).max() <= 1.0
    assert list(ds[S.CAMERA].values) == ["image", "image2"]

    # language: ids where the mask is set, -1 on padding; text = tokenizer's own decoding of each id
    ids = batch["observation.language.tokens"].numpy()
    np.testing.assert_array_equal(ds[S.LANGUAGE_TOKEN_ID].values, np.where(lang_mask, ids, -1))
    texts = ds[S.LANGUAGE_TOKEN_TEXT].values
    assert "".join(texts[0][lang_mask[0]]) == tokenizer.decode(ids[0][lang_mask[0]].tolist())
    assert all(t == "" for t in texts[0][~lang_mask[0]])
    np.testing.assert_array_equal(ds[S.EPISODE].values, [0, 1])  # B=2: two episodes, one row each


@pytest.mark.parametrize(
    ("cameras", "empty", "drop", "slots", "present"),
    [
        (("image",), 1, (), ("image", "empty_camera_0"), (True, False)),
        (("image", "image2"), 1, (), ("image", "image2", "empty_camera_0"), (True, True, False)),
        (("image", "image2", "image3"), 0, ("image2",), ("image", "image3", "image2"), (True, True, False)),
    ],
    ids=["1cam", "2cam+empty", "3cam-missing-middle"],
)
def test_layout_for_camera_sets(tiny, tmp_path, cameras, empty, drop, slots, present):
    _, pre, _ = tiny
    policy = build_tiny_policy(tiny_config(cameras, empty_cameras=empty), seed=2)
    base = pre(observation(1, seed=5))
    obs = observation(1, seed=6, size=224, cameras=cameras)  # 224 px: what the policy sees, no resize
    batch = {k: v for k, v in base.items() if not k.startswith(CAM)}
    batch.update({f"{CAM}{c}": obs[f"{CAM}{c}"] for c in cameras if c not in drop})
    store = tmp_path / "attention.zarr"
    with AttentionWriter(store) as writer, AttentionRecorder(policy, writer, layers=[-1], denoise_steps="final"):
        policy.select_action(batch)
    ds = open_attention(store)
    n_keys = 256 * len(slots) + 200 + 50
    assert ds.sizes[S.KEY] == n_keys
    assert tuple(dict.fromkeys(ds[S.KEY_REGION].values[: 256 * len(slots)])) == slots
    valid = ds[S.KEY_VALID].values[0]
    attention = ds[S.ATTENTION].values[0]
    for i, (name, is_present) in enumerate(zip(slots, present)):
        assert valid[i * 256 : (i + 1) * 256].all() == is_present
        if not is_present:
            assert (attention[..., i * 256 : (i + 1) * 256] == 0).all()
        else:
            assert (attention[..., i * 256 : (i + 1) * 256] > 0).all()
    stored_cams = [s for s, p in zip(slots, present) if p]
    assert list(ds[S.CAMERA].values) == stored_cams
    for c, cam in enumerate(stored_cams):
        want = (obs[f"{CAM}{cam}"][0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
        np.testing.assert_array_equal(ds[S.IMAGES].values[0, c], want)


def _run_actions(policy, batch, steps: int) -> torch.Tensor:
    policy.reset()
    torch.manual_seed(123)
    return torch.stack([policy.select_action(batch) for _ in range(steps)])


def test_actions_unchanged_and_policy_restored(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(1, seed=7))

    def snapshot():
        hooks = {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs))
            for name, m in policy.named_modules()
        }
        return hooks, dict(policy.__dict__), dict(policy.model.__dict__)

    before = snapshot()
    plain = _run_actions(policy, batch, 2)  # one model run + one action from the queue
    with AttentionWriter(tmp_path / "a.zarr") as writer, AttentionRecorder(policy, writer, layers="all", prefix=True):
        recorded = _run_actions(policy, batch, 2)
    assert torch.equal(plain, recorded)
    assert snapshot()[0] == before[0]
    assert set(snapshot()[1]) == set(before[1]) and set(snapshot()[2]) == set(before[2])
    assert "select_action" not in policy.__dict__ and "denoise_step" not in policy.model.__dict__

    with pytest.raises(RuntimeError, match="boom"):
        with AttentionWriter(tmp_path / "b.zarr") as writer, AttentionRecorder(policy, writer):
            policy.reset()
            policy.select_action(batch)
            raise RuntimeError("boom")
    assert snapshot()[0] == before[0]
    assert set(policy.__dict__) == set(before[1]) and set(policy.model.__dict__) == set(before[2])
    assert torch.equal(_run_actions(policy, batch, 2), plain)


@contextlib.contextmanager
def action_steps(policy, n: int):
    """Temporarily execute n actions per chunk (lerobot reads it at reset and in select_action)."""
    previous = policy.config.n_action_steps
    policy.config.n_action_steps = n
    try:
        yield
    finally:
        policy.config.n_action_steps = previous
        policy.reset()


def test_queue_episodes_and_active_rows(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(2, seed=8))
    store = tmp_path / "attention.zarr"
    with AttentionWriter(store, max_queue=1) as writer, action_steps(policy, 3):
        seen = spy_appends(writer)
        with AttentionRecorder(policy, writer, layers="last:1", denoise_steps="final", first_episode=4) as rec:
            policy.reset()
            for _ in range(7):  # 3 actions per chunk: the model runs at env steps 0, 3, 6 only
                policy.select_action(batch)
            assert rec.inferences == 3 and rec.env_step == 7
            policy.reset()  # next batch: episodes 6, 7
            policy.select_action(batch)
            rec.set_active([True, False])  # env 1 finished: only env 0 recorded from now on
            for _ in range(3):
                policy.select_action(batch)
            policy.reset()
            rec.set_episodes([20, 21])
            policy.select_action(batch)
            assert rec.inferences == 6
    ds = open_attention(store)
    assert ds[S.EPISODE].values.tolist() == [4, 5, 4, 5, 4, 5, 6, 7, 6, 20, 21]
    assert ds[S.ENV_STEP].values.tolist() == [0, 0, 3, 3, 6, 6, 0, 0, 3, 0, 0]
    assert ds[S.ROLLOUT].values.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 0, 0]
    # the two rows of one inference differ (different prompts): each row is its own episode's data
    att = ds[S.ATTENTION].values
    assert not np.array_equal(att[0], att[1])
    # reused host buffers were never overwritten before the writer had stored them
    handed = [row for b in seen for row, keep in zip(b["attention"], b["keep"]) if keep]
    assert len(handed) == len(att)
    for stored, sent in zip(att, handed):
        assert np.abs(stored - sent.numpy()).max() <= S.MAX_ABS_ERROR["uint16"]


def test_bad_requests_fail_in_one_line(tiny, tmp_path):
    policy, _, _ = tiny
    writer = AttentionWriter(tmp_path / "x.zarr")
    with pytest.raises(CaptureError, match=r"out of range: this model has 2 \(valid 0\.\.1"):
        AttentionRecorder(policy, writer, layers="5")
    with pytest.raises(CaptureError, match="denoise step 10 is out of range"):
        AttentionRecorder(policy, writer, denoise_steps=[10])
    with pytest.raises(CaptureError, match="records lerobot's Pi0.5"):
        AttentionRecorder(torch.nn.Linear(2, 2), writer)
    writer.close()
    assert not (tmp_path / "x.zarr").exists()  # nothing half-written


def test_robot_state_the_policy_saw_is_stored_per_row(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(2, seed=3))
    expected = batch["observation.state"].float().numpy()  # what the model got, after lerobot's processors
    store = tmp_path / "attention.zarr"
    with AttentionWriter(store) as writer, AttentionRecorder(policy, writer, layers="last:1") as rec:
        policy.reset()
        policy.select_action(batch)
        assert rec.spec.extra_shapes == {S.STATE: (8,)}
    ds = open_attention(store)
    assert ds[S.STATE].dims == (S.INFERENCE, S.STATE_DIM)
    np.testing.assert_array_equal(ds[S.STATE].values, expected)
    assert ds[S.STATE].sel(episode=1, rollout=0).values.tolist() == expected[1].tolist()

    off = tmp_path / "no_state.zarr"
    with AttentionWriter(off) as writer, AttentionRecorder(policy, writer, layers="last:1", state=False):
        policy.reset()
        policy.select_action(batch)
    assert S.STATE not in open_attention(off)
