"""load_policy, the tiny checkpoint, make-tiny-policy and the mismatched-weights check (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from attnstore.capture import (  # noqa: E402
    check_weights_loaded,
    find_tokenizer,
    is_tiny_checkpoint,
    load_policy,
    tiny_model_patches,
)
from attnstore.capture.tiny import MARKER_NAME, TinyDims, build_tiny_policy, tiny_config  # noqa: E402
from attnstore.cli import main  # noqa: E402
from attnstore.errors import CaptureError  # noqa: E402


@pytest.fixture(scope="module")
def cached_tiny(tmp_path_factory):
    """load_policy("tiny") with an empty cache and the hub switched off: builds, caches and loads."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("ATTNSTORE_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield cache / "tiny_pi05", load_policy("tiny")
    finally:
        mp.undo()


def test_load_tiny_offline_and_select_action(cached_tiny):
    path, (policy, pre, post) = cached_tiny
    assert is_tiny_checkpoint(path)
    # tiny really: 2 expert layers, 8 heads, 256 SigLIP tokens per camera
    assert len(policy.model.paligemma_with_expert.gemma_expert.model.layers) == 2
    assert sum(p.numel() for p in policy.parameters()) < 60e6
    obs = {
        "observation.images.image": torch.rand(1, 3, 256, 256),
        "observation.images.image2": torch.rand(1, 3, 256, 256),
        "observation.state": torch.zeros(1, 8),
        "task": ["put the bowl on the plate"],
    }
    batch = pre(obs)
    assert batch["observation.language.tokens"].shape == (1, 200)
    assert find_tokenizer(pre) is not None
    policy.reset()
    action = post(policy.select_action(batch))
    assert action.shape == (1, 7) and torch.isfinite(action).all()
    # the same model through lerobot's own factory (as lerobot-eval builds it) inside the patches
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    with tiny_model_patches(path):
        again = PI05Policy.from_pretrained(path, config=PreTrainedConfig.from_pretrained(path))
    check_weights_loaded(again, path)
    for (name, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_patches_are_restored_after_exception():
    from lerobot.policies.pi05 import modeling_pi05

    before = (modeling_pi05.get_gemma_config, modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma)
    with pytest.raises(RuntimeError):
        with tiny_model_patches(TinyDims()):
            assert modeling_pi05.get_gemma_config("gemma_300m").width == 32
            raise RuntimeError
    assert (modeling_pi05.get_gemma_config, modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma) == before
    assert modeling_pi05.get_gemma_config("gemma_300m").width == 1024


def test_mismatched_weights_fail_in_one_line(cached_tiny, tmp_path):
    path, _ = cached_tiny
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    other = build_tiny_policy(tiny_config(), dims=TinyDims(vlm_width=48, expert_width=24))
    other.save_pretrained(bad)  # weights of another shape under the original config and marker
    with pytest.raises(CaptureError) as info:
        load_policy(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {bad.resolve()} does not match its config:")
    assert "shape mismatches" in message and "e.g. model." in message

    policy, _, _ = load_policy(path)
    state_file = tmp_path / "partial"
    shutil.copytree(path, state_file)
    from safetensors.torch import load_file, save_file

    weights = load_file(state_file / "model.safetensors")
    weights.pop(next(k for k in weights if "gemma_expert" in k))
    save_file(weights, state_file / "model.safetensors")
    with pytest.raises(CaptureError, match=r"1 missing, 0 shape mismatches"):
        check_weights_loaded(policy, state_file)


def test_bad_paths_fail_in_one_line(tmp_path, cached_tiny):
    path, _ = cached_tiny
    with pytest.raises(CaptureError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="not a lerobot policy checkpoint"):
        load_policy(tmp_path / "empty")
    act = tmp_path / "act"
    shutil.copytree(path, act)
    cfg = json.loads((act / "config.json").read_text())
    cfg["type"] = "act"
    (act / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaptureError, match="'act' policy"):
        load_policy(act)


def test_one_checkpoint_module_checks_types_and_resolves(cached_tiny):
    from lerobot.configs import PreTrainedConfig

    from attnstore.capture.checkpoint import require_pi05, resolve

    path, (policy, _, _) = cached_tiny
    for ok in (policy, policy.config, PreTrainedConfig.from_pretrained(path), {"type": "pi05"}, "pi05"):
        require_pi05(ok)
    for bad in (torch.nn.Linear(2, 2), {"type": "act"}, "act", None):
        with pytest.raises(CaptureError, match=r"records lerobot's Pi0.5, Pi0 and SmolVLA policies only \(supported types: pi05, pi0, smolvla\)$"):
            require_pi05(bad)
    ckpt = resolve(path)
    assert (ckpt.local, ckpt.tiny, ckpt.source) == (True, True, str(path.resolve()))
    assert resolve("tiny").source == ckpt.source  # the cached one
    assert ckpt.processor_overrides()["tokenizer_processor"] == {"tokenizer_name": str(path.resolve() / "tokenizer")}
    assert ckpt.depths(policy.config) == (2, 2)
    hub = resolve("lerobot/pi05_libero")  # a hub id is handed to lerobot unchanged, never read here
    assert (hub.local, hub.tiny, hub.processor_overrides({"a": {}})) == (False, False, {"a": {}})


def test_cli_make_tiny_policy(tmp_path, capsys):
    out = tmp_path / "cli_tiny"
    assert main(["make-tiny-policy", str(out), "--seed", "3", "--cameras", "image"]) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["seed"] == 3 and marker["cameras"] == ["image"]
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg["input_features"]) == {
        "observation.images.image", "observation.images.empty_camera_0", "observation.state",
    }  # fmt: skip
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    tok = next(s for s in pre["steps"] if s["registry_name"] == "tokenizer_processor")
    assert tok["config"]["tokenizer_name"] == str((out / "tokenizer").resolve())
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "data.txt").write_text("keep me")
    assert main(["make-tiny-policy", str(tmp_path / "occupied")]) == 2
    assert "not a tiny attnstore checkpoint" in capsys.readouterr().err
    assert (tmp_path / "occupied" / "data.txt").read_text() == "keep me"
