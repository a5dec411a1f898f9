"""AttentionRecorder on a real (tiny, random-weight) lerobot SmolVLA writing a real Zarr store.

SmolVLA computes its attention in ``SmolVLMWithExpertModel.eager_attention_forward`` and returns only
``probs @ V``. References come from a test-side spy of that method (installed on the class for the test,
before the recorder): the softmax is recomputed in float64 from the queries, keys and boolean mask it
received, and put into the store's key order by a mapping spelled out here from lerobot's embedding order
(``[cameras x (specials + 64 tokens) | n language | state | padding | 50 actions]``), independently of the
adapter. Layers alternate self-attention (prefix + action keys) and cross-attention (VLM prefix keys only).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")
pytest.importorskip("num2words", reason="SmolVLA's processor needs lerobot[smolvla] (num2words)")

from attnstore import schema as S  # noqa: E402
from attnstore.capture import AttentionRecorder, find_tokenizer, load_policy  # noqa: E402
from attnstore.capture.tiny import MARKER_NAME, make_tiny_policy  # noqa: E402
from attnstore.capture.tiny_smolvla import build_tiny_policy, tiny_config  # noqa: E402
from attnstore.errors import CaptureError  # noqa: E402
from attnstore.schema import EpisodeRecord  # noqa: E402
from attnstore.store.open import open_attention  # noqa: E402
from attnstore.store.writer import AttentionWriter  # noqa: E402
from spies import spy_appends  # noqa: E402

TASKS = ("pick up the alphabet soup and place it in the basket", "put the bowl on the plate")
CAM = "observation.images."
GRID, N_LANG, N_ACT, DEPTH = 8, 48, 50, 4
KINDS = ["self", "cross", "self", "cross"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "smolvla", seed=0, policy_type="smolvla")


@pytest.fixture(scope="module")
def tiny(ckpt):
    return load_policy(ckpt)


@pytest.fixture(scope="module")
def special(ckpt, tiny):
    """A tiny SmolVLA with image start/end tokens and a prefix padded to 300 keys (same tokenizer)."""
    config = tiny_config(add_image_special_tokens=True, prefix_length=300)
    return build_tiny_policy(config, ckpt / "vlm", seed=1), tiny[1]


def observation(batch_size: int, seed: int = 0, tasks=TASKS) -> dict:
    g = torch.Generator().manual_seed(seed)
    obs = {f"{CAM}{c}": torch.randint(0, 256, (batch_size, 3, 256, 256), generator=g).float() / 255
           for c in ("image", "image2")}
    obs["observation.state"] = torch.rand(batch_size, 8, generator=g) * 0.2
    obs["task"] = [tasks[i % len(tasks)] for i in range(batch_size)]
    return obs


class SmolSpy:
    """Every call of ``eager_attention_forward``: a float64 softmax recomputed from its inputs."""

    def __init__(self):
        self.calls: list[dict] = []

    @contextlib.contextmanager
    def installed(self):
        from lerobot.policies.smolvla.smolvlm_with_expert import SmolVLMWithExpertModel

        original = SmolVLMWithExpertModel.eager_attention_forward
        calls = self.calls

        def spy(model, attention_mask, batch_size, head_dim, query_states, key_states, value_states):
            out = original(model, attention_mask, batch_size, head_dim, query_states, key_states, value_states)
            groups = query_states.shape[2] // key_states.shape[2]
            k = key_states.double().repeat_interleave(groups, dim=2)
            scores = torch.einsum("blhd,bshd->bhls", query_states.double(), k) * head_dim**-0.5
            scores = scores.masked_fill(~attention_mask[:, None].bool(), float("-inf"))
            # written out, not torch.softmax: the recorder counts the softmax calls inside this method
            e = (scores - scores.amax(-1, keepdim=True)).exp()
            calls.append({"ref": e / e.sum(-1, keepdim=True), "queries": int(query_states.shape[1])})
            return out

        SmolVLMWithExpertModel.eager_attention_forward = spy
        try:
            yield self
        finally:
            SmolVLMWithExpertModel.eager_attention_forward = original


def layout_of(policy) -> dict:
    """The key layout by hand from the config: (start, end) specials per camera, padding, prefix length."""
    config = policy.config
    start, end = (2, 1) if config.add_image_special_tokens else (0, 0)
    cams = 3 * (start + GRID * GRID + end)  # image, image2, empty_camera_0
    seq = cams + N_LANG + 1
    prefix = max(seq, config.prefix_length)
    return {"start": start, "end": end, "cams": cams, "prefix": prefix, "padding": prefix - seq}


def store_positions(policy, n_lang: int, model_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """(model prefix positions kept, their store positions) for a prompt of ``n_lang`` tokens."""
    lay = layout_of(policy)
    cams = lay["cams"]
    keep = list(range(cams + n_lang)) + [cams + n_lang]  # cameras, language, state
    to = list(range(cams + n_lang)) + [cams + N_LANG]
    seq = cams + n_lang + 1
    pads = min(model_prefix - seq, lay["padding"])
    keep += list(range(seq, seq + pads))
    to += list(range(cams + N_LANG + 1, cams + N_LANG + 1 + pads))
    return np.asarray(keep), np.asarray(to)


def to_store(policy, ref: torch.Tensor, n_lang: int, kind: str) -> np.ndarray:
    """A reference (B, H, 50, K_model) in the store's key order (zeros where the layer has no key)."""
    lay = layout_of(policy)
    model_prefix = ref.shape[-1] - (N_ACT if kind == "self" else 0)
    keep, to = store_positions(policy, n_lang, model_prefix)
    out = np.zeros((*ref.shape[:-1], lay["prefix"] + N_ACT))
    r = ref.numpy()
    out[..., to] = r[..., keep]
    if kind == "self":
        out[..., lay["prefix"]:] = r[..., model_prefix:]
    return out


def expected_regions(policy) -> list[str]:
    lay = layout_of(policy)
    out = []
    for cam in ("image", "image2", "empty_camera_0"):
        out += ["special"] * lay["start"] + [cam] * GRID * GRID + ["special"] * lay["end"]
    return out + ["language"] * N_LANG + ["state"] + ["padding"] * lay["padding"] + ["action"] * N_ACT


def expected_valid(policy, lang_mask: np.ndarray) -> np.ndarray:
    lay = layout_of(policy)
    regions = np.asarray(expected_regions(policy))
    valid = np.broadcast_to((regions != "empty_camera_0") & (regions != "padding"), (len(lang_mask), len(regions)))
    valid = valid.copy()
    lang = np.flatnonzero(regions == "language")
    valid[:, lang] = False
    valid[:, lang[: lang_mask.shape[1]]] = lang_mask
    assert valid.shape[1] == lay["prefix"] + N_ACT
    return valid


@pytest.mark.parametrize("variant", ["default", "special+padding"])
def test_matches_independent_softmax_layout_and_masks(tiny, special, variant, tmp_path):
    policy, pre = (tiny[0], tiny[1]) if variant == "default" else special
    obs = observation(2, seed=1)
    batch = pre(obs)
    n_lang = int(batch["observation.language.tokens"].shape[1])
    lang_mask = batch["observation.language.attention_mask"].numpy().astype(bool)
    assert n_lang < N_LANG and not lang_mask[1].all()  # "longest" padding: the second prompt is shorter
    store = tmp_path / "attention.zarr"
    spy = SmolSpy()
    with AttentionWriter(store) as writer:
        seen = spy_appends(writer)
        with spy.installed(), AttentionRecorder(
            policy, writer, layers="all", prefix=[0, 1], tokenizer=find_tokenizer(pre), encoding="float32"
        ):
            policy.reset()
            policy.select_action(batch)
    calls = spy.calls
    assert len(calls) == DEPTH + 10 * DEPTH  # prefix pass (every VLM layer), then 10 steps x 4 expert layers
    captured = seen[0]["attention"].double().numpy()  # (B, D, L, H, Q, K)
    lay = layout_of(policy)
    assert captured.shape == (2, 10, DEPTH, 4, N_ACT, lay["prefix"] + N_ACT)
    for i, call in enumerate(calls[DEPTH:]):
        d, layer = divmod(i, DEPTH)
        assert call["queries"] == N_ACT
        want = to_store(policy, call["ref"], n_lang, KINDS[layer])
        assert np.abs(captured[:, d, layer] - want).max() <= 1e-5, (d, layer)
    # prefix pass: VLM layers 0 and 1 over the whole prefix; rows of real (unmasked) tokens only
    model_prefix = calls[0]["queries"]
    keep, to = store_positions(policy, n_lang, model_prefix)
    valid = expected_valid(policy, lang_mask)
    for slot in (0, 1):
        ref = calls[slot]["ref"].numpy()[:, :, keep][:, :, :, keep]
        got = seen[0]["prefix"].double().numpy()[:, slot][:, :, to][:, :, :, to]
        for b in range(2):
            rows = valid[b, to]
            assert np.abs(got[b][:, rows] - ref[b][:, rows]).max() <= 1e-5

    ds = open_attention(store)
    assert ds["layer_kind"].values.tolist() == KINDS and "layer_kind" in ds[S.ATTENTION].coords
    assert ds[S.KEY_REGION].values.tolist() == expected_regions(policy)
    np.testing.assert_array_equal(ds[S.KEY_VALID].values, valid)
    att = ds[S.ATTENTION].values.astype(np.float64)
    v = np.broadcast_to(valid[:, None, None, None, None], att.shape)
    np.testing.assert_allclose(np.where(v, att, 0).sum(-1), 1.0, atol=1e-5)  # rows sum to 1
    assert (att[~v] == 0).all()  # masked keys exactly 0
    action = np.asarray(expected_regions(policy)) == "action"
    assert (att[:, :, 1::2][..., action] == 0).all()  # cross-attention layers never see action keys
    causal = np.tril(np.ones((N_ACT, N_ACT), bool))  # action token i sees action tokens <= i
    self_actions = att[:, :, 0::2][..., action]
    assert (self_actions[..., ~causal] == 0).all() and (self_actions[..., causal] > 0).all()
    ids = batch["observation.language.tokens"].numpy()
    want_ids = np.full((2, N_LANG), -1)
    want_ids[:, :n_lang] = np.where(lang_mask, ids, -1)
    np.testing.assert_array_equal(ds[S.LANGUAGE_TOKEN_ID].values, want_ids)
    assert ds[S.IMAGES].shape[2:] == (512, 512, 3) and list(ds[S.CAMERA].values) == ["image", "image2"]


def _run_actions(policy, batch, steps: int) -> torch.Tensor:
    policy.reset()
    torch.manual_seed(123)
    return torch.stack([policy.select_action(dict(batch)) for _ in range(steps)])


def test_actions_unchanged_and_policy_restored(tiny, tmp_path):
    policy, pre, _ = tiny
    batch = pre(observation(1, seed=7))
    joint = policy.model.vlm_with_expert

    def snapshot():
        hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in policy.named_modules()}
        return hooks, set(policy.__dict__), set(policy.model.__dict__), set(joint.__dict__)

    before = snapshot()
    plain = _run_actions(policy, batch, 2)
    with AttentionWriter(tmp_path / "a.zarr") as writer, AttentionRecorder(policy, writer, layers="all", prefix=True):
        recorded = _run_actions(policy, batch, 2)
    assert torch.equal(plain, recorded)  # bit-identical with and without the recorder
    assert snapshot() == before
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionWriter(tmp_path / "b.zarr") as writer, AttentionRecorder(policy, writer):
            policy.reset()
            policy.select_action(dict(batch))
            raise RuntimeError("boom")
    assert snapshot() == before
    assert torch.equal(_run_actions(policy, batch, 2), plain)


def test_two_envs_are_two_episodes_each_with_its_own_attention(tiny, tmp_path):
    """B=2 (prompts of different lengths, padded to the longest): row b equals env b run alone."""
    policy, pre, _ = tiny
    both = pre(observation(2, seed=11))
    noise = torch.randn(2, N_ACT, policy.config.max_action_dim, generator=torch.Generator().manual_seed(3))
    runs = []
    for b in (None, 0, 1):
        tasks = TASKS if b is None else (TASKS[b],)
        batch = both if b is None else pre(
            {k: (v[b : b + 1] if hasattr(v, "shape") else v) for k, v in observation(2, seed=11).items()}
            | {"task": list(tasks)})
        store = tmp_path / f"run{b}.zarr"
        with AttentionWriter(store) as writer, AttentionRecorder(policy, writer, layers="all", encoding="float32"):
            policy.reset()
            policy.predict_action_chunk(dict(batch), noise=noise if b is None else noise[b : b + 1])
        runs.append(open_attention(store))
    assert runs[0][S.EPISODE].values.tolist() == [0, 1]
    att = runs[0][S.ATTENTION].values
    assert not np.allclose(att[0], att[1])
    for b in (0, 1):
        np.testing.assert_allclose(att[b], runs[1 + b][S.ATTENTION].values[0], atol=1e-5)
        np.testing.assert_array_equal(runs[0][S.KEY_VALID].values[b], runs[1 + b][S.KEY_VALID].values[0])


def test_prompts_of_any_length_share_one_store(tiny, tmp_path):
    """Tasks with prompts of different lengths (SmolVLA pads to the longest) go into one store."""
    policy, pre, _ = tiny
    store = tmp_path / "attention.zarr"
    lengths = []
    with AttentionWriter(store) as writer, AttentionRecorder(policy, writer, layers="last:1", denoise_steps="final"):
        for task in ("open the drawer", TASKS[0]):
            policy.reset()
            batch = pre(observation(1, seed=2, tasks=(task,)))
            lengths.append(int(batch["observation.language.tokens"].shape[1]))
            policy.select_action(batch)
    assert lengths[0] < lengths[1]
    ds = open_attention(store)
    assert ds.sizes[S.LANGUAGE_TOKEN] == N_LANG
    valid = ds[S.KEY_VALID].values
    lang = ds[S.KEY_REGION].values == "language"
    assert valid[:, lang].sum(1).tolist() == lengths
    att = ds[S.ATTENTION].values
    assert (att[~np.broadcast_to(valid[:, None, None, None, None], att.shape)] == 0).all()


def test_checks_fail_in_one_line(ckpt, tiny, tmp_path):
    from attnstore.capture.checkpoint import check_weights_loaded, require_supported, resolve
    from attnstore.capture.tiny_smolvla import TinySmolDims, write_tiny_vlm

    policy, _, _ = tiny
    for ok in (policy, policy.config, "smolvla", {"type": "smolvla"}):
        require_supported(ok)
    assert resolve(ckpt).depths(policy.config) == (DEPTH, DEPTH)
    assert resolve(ckpt).num_denoise_steps(policy.config) == 10
    other = build_tiny_policy(tiny_config(), write_tiny_vlm(tmp_path / "vlm48", TinySmolDims(width=48)))
    with pytest.raises(CaptureError, match=r"does not match its config: .* shape mismatches") as err:
        check_weights_loaded(other, ckpt)
    assert "\n" not in str(err.value)
    writer = AttentionWriter(tmp_path / "x.zarr")
    policy.config.use_cache = False
    try:
        with pytest.raises(CaptureError, match="use_cache=false"):
            AttentionRecorder(policy, writer)
    finally:
        policy.config.use_cache = True
    with pytest.raises(CaptureError, match=r"out of range: this model has 4 \(valid 0\.\.3"):
        AttentionRecorder(policy, writer, layers="7")
    writer.close()


def test_cli_make_tiny_policy_type(tmp_path):
    from attnstore.cli import main

    out = tmp_path / "cli_smolvla"
    assert main(["make-tiny-policy", str(out), "--type", "smolvla"]) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["policy_type"] == "smolvla" and marker["tokenizer_dir"] == "vlm"
    assert json.loads((out / "config.json").read_text())["type"] == "smolvla"
    assert (out / "vlm" / "config.json").is_file() and (out / "vlm" / "tokenizer.json").is_file()
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    tok = next(s for s in pre["steps"] if s["registry_name"] == "tokenizer_processor")
    assert tok["config"]["tokenizer_name"] == str((out / "vlm").resolve())


def test_readers_work_on_a_smolvla_store(special, tmp_path):
    from test_capture_pi0 import check_readers

    policy, pre = special
    store = tmp_path / "attention.zarr"
    with AttentionWriter(store) as writer:
        with AttentionRecorder(policy, writer, layers="all", denoise_steps="0,-1", tokenizer=find_tokenizer(pre)):
            policy.reset()
            batch = pre(observation(1, seed=21))
            for _ in range(2 * policy.config.n_action_steps):  # two model runs
                policy.select_action(dict(batch))
        writer.end_episode(EpisodeRecord(episode=0, task_group="libero_object", task_id=0, task=TASKS[0],
                                         success=False, num_env_steps=20))
    check_readers(store, tmp_path)
    from attnstore.readers import region_shares

    shares = region_shares(open_attention(store)).compute()
    assert {"special", "state", "padding"} <= set(shares["region"].values.tolist())
