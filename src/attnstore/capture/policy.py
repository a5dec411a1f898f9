"""load_policy: a Pi0.5 policy and its processors, ready for ``select_action``.

``"tiny"`` builds (once, cached) and loads the tiny random-weight model fully offline; a local
directory loads it (tiny checkpoints rebuilt tiny); anything else is a hub id handed to lerobot
unchanged (hub/offline settings are the user's).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from attnstore.capture import tiny
from attnstore.errors import CaptureError

TINY = "tiny"
CACHE_ENV = "ATTNSTORE_CACHE"
_REQUIRED_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")


def tiny_cache_dir() -> Path:
    """Where ``load_policy("tiny")`` keeps its checkpoint: ``$ATTNSTORE_CACHE/tiny_pi05`` or
    ``~/.cache/attnstore/tiny_pi05``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnstore"
    return Path(root).expanduser() / "tiny_pi05"


def ensure_tiny_checkpoint() -> Path:
    """The cached tiny checkpoint, built on first use (seed 0)."""
    path = tiny_cache_dir()
    if _complete(path):
        return path
    # build next to the cache and rename into place, so a crash never leaves half a checkpoint
    import shutil

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.make_tiny_policy(tmp, seed=0)
    _repoint_tokenizer(tmp, path)
    if path.exists() and not _complete(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        if not _complete(path):  # another process won the race with a good checkpoint, else fail
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _complete(path: Path) -> bool:
    return tiny.is_tiny_checkpoint(path) and all((path / f).is_file() for f in _REQUIRED_FILES)


def _repoint_tokenizer(built: Path, final: Path) -> None:
    """Point the saved preprocessor of a checkpoint built at ``built`` at its tokenizer's final place."""
    cfg_file = built / "policy_preprocessor.json"
    cfg = json.loads(cfg_file.read_text())
    for step in cfg.get("steps", []):
        if step.get("registry_name") == "tokenizer_processor":
            step["config"]["tokenizer_name"] = str(final / tiny.TOKENIZER_DIRNAME)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def resolve_checkpoint(path_or_id: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(what to pass to lerobot, is_local_dir)``; fails in one line on a bad local directory.

    A string that looks like a path (exists, starts with ``.``/``/``/``~``, or has more than one
    ``/``) is a local directory; ``owner/name`` that does not exist locally is a hub id.
    """
    text = str(path_or_id)
    if text == TINY:
        return str(ensure_tiny_checkpoint()), True
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if not looks_local:
        return text, False
    if not path.is_dir():
        raise CaptureError(f"policy path {text} does not exist; pass a Pi0.5 checkpoint directory, a hub id or 'tiny'")
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CaptureError(f"{text} is not a lerobot policy checkpoint (missing {', '.join(missing)})")
    try:
        policy_type = json.loads((path / "config.json").read_text()).get("type")
    except ValueError as exc:
        raise CaptureError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    if policy_type != "pi05":
        raise CaptureError(f"{text} is a '{policy_type}' policy; attnstore captures Pi0.5 ('pi05') policies only")
    return str(path.resolve()), True


def load_policy(path_or_id: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(policy, preprocessor, postprocessor)`` for a Pi0.5 checkpoint, in eval mode on ``device``.

    ``"tiny"``: the cached tiny model, offline. Local tiny checkpoints are rebuilt tiny; every local
    checkpoint's weights are checked against its model (:func:`tiny.check_weights_loaded`).
    """
    source, local = resolve_checkpoint(path_or_id)
    is_tiny = local and tiny.is_tiny_checkpoint(source)
    offline = _hub_offline() if is_tiny else contextlib.nullcontext()
    with offline:
        return _load(source, local, is_tiny, device, str(path_or_id))


def _load(source: str, local: bool, is_tiny: bool, device: str, name: str) -> tuple[Any, Any, Any]:
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    config = PreTrainedConfig.from_pretrained(source)
    if config.type != "pi05":
        raise CaptureError(f"{name} is a '{config.type}' policy; attnstore captures Pi0.5 ('pi05') policies only")
    config.device = device
    config.pretrained_path = Path(source) if local else source
    patches = tiny.tiny_model_patches(source) if is_tiny else contextlib.nullcontext()
    with patches, contextlib.redirect_stdout(_NullWriter()):  # from_pretrained prints a banner
        policy = PI05Policy.from_pretrained(source, config=config)
    tiny.check_weights_loaded(policy, source)  # from_pretrained only warns on a mismatch
    policy.eval()

    overrides: dict[str, Any] = {"device_processor": {"device": device}}
    if is_tiny:
        overrides["tokenizer_processor"] = {"tokenizer_name": str(Path(source) / tiny.TOKENIZER_DIRNAME)}
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=config, pretrained_path=source, preprocessor_overrides=overrides
    )
    return policy, preprocessor, postprocessor


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 while a tiny checkpoint loads (it never needs the hub); restored after."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def find_tokenizer(preprocessor) -> Any | None:
    """The tokenizer inside a lerobot preprocessor pipeline (its tokenizer step), or None."""
    for step in getattr(preprocessor, "steps", ()):
        tok = getattr(step, "input_tokenizer", None)
        if tok is not None:
            return tok
    return None


class _NullWriter:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
