"""One place for checkpoint handling: from what a user names to a verified Pi0.5, Pi0 or SmolVLA checkpoint.

Both :func:`attnstore.capture.policy.load_policy` and ``attnstore eval``
(:mod:`attnstore.evaluation.runner`, around lerobot's own ``make_policy``) go through here:

* :func:`resolve`: ``"tiny"`` (the cached tiny model, built on first use), a local directory (checked
  for the files of a lerobot checkpoint and its policy type) or a hub id (handed to lerobot as is;
  hub and offline settings are the user's) -> a :class:`Checkpoint`;
* :func:`require_supported` (alias ``require_pi05``): the one policy-type check, for a policy, a config, a
  ``config.json`` dict or a type name, with a one-line error listing the supported types
  (:data:`attnstore.capture.policies.SUPPORTED_TYPES`);
* :class:`Checkpoint`: whether it is tiny, the patches that rebuild a tiny model tiny, the
  tokenizer override of a tiny checkpoint, its config, its model depths and
* :func:`check_weights_loaded`: lerobot's ``from_pretrained`` only warns when a checkpoint does not fit
  its model (and keeps random weights); this turns that into a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from attnstore.capture import tiny
from attnstore.capture.policies import SUPPORTED_TYPES, adapter_class, policy_type_of, supported_labels
from attnstore.capture.tokenizer import repoint_saved_tokenizer, tokenizer_override
from attnstore.errors import CaptureError

TINY = "tiny"
CACHE_ENV = "ATTNSTORE_CACHE"
REQUIRED_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")


# ---- the policy type ----------------------------------------------------------------------------
def require_supported(policy_or_config: Any, *, what: str = "the policy") -> None:
    """Fail in one line unless ``policy_or_config`` is a supported policy (Pi0.5, Pi0, SmolVLA), its
    config or its type.

    Takes a policy (must be lerobot's ``PI05Policy``, ``PI0Policy`` or ``SmolVLAPolicy``), a lerobot
    config (its ``type``), a ``config.json`` dict or a type name; ``what`` names it in the message.

    >>> require_supported("pi05"), require_supported({"type": "pi0"}), require_supported("smolvla")
    (None, None, None)
    >>> require_supported({"type": "act"}, what="ckpt/act")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: ckpt/act is a 'act' policy; attnstore records lerobot's Pi0.5, Pi0 and SmolVLA policies only (supported types: pi05, pi0, smolvla)
    >>> require_supported(3.5, what="AttentionRecorder's policy")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: AttentionRecorder's policy is a float, not a lerobot policy; attnstore records lerobot's Pi0.5, Pi0 and SmolVLA policies only (supported types: pi05, pi0, smolvla)
    """
    obj = policy_or_config
    if isinstance(obj, str):
        kind: Any = obj
    elif isinstance(obj, Mapping):
        kind = obj.get("type")
    elif obj is None:
        _refuse(what, "not a policy (none was configured)")
    elif callable(getattr(obj, "select_action", None)) and hasattr(obj, "config"):  # a policy
        try:
            import lerobot.policies  # noqa: F401
        except ImportError as exc:  # pragma: no cover - the capture extra is missing
            raise CaptureError(f"capturing needs lerobot[pi]==0.6.1 ({exc}); run 'make setup'") from exc
        if policy_type_of(obj) is not None:
            return
        kind = getattr(obj.config, "type", None) or getattr(obj, "name", None) or type(obj).__name__
        _refuse(what, f"a '{kind}' policy ({type(obj).__name__})")
    elif isinstance(getattr(obj, "type", None), str):  # a lerobot PreTrainedConfig
        kind = obj.type
    else:
        _refuse(what, f"a {type(obj).__name__}, not a lerobot policy")
    if kind not in SUPPORTED_TYPES:
        _refuse(what, f"a '{kind}' policy")


require_pi05 = require_supported  # the name before Pi0 and SmolVLA were supported


def _refuse(what: str, desc: str) -> NoReturn:
    supported = ", ".join(SUPPORTED_TYPES)
    raise CaptureError(
        f"{what} is {desc}; attnstore records lerobot's {supported_labels()} policies only "
        f"(supported types: {supported})"
    )


# ---- resolving ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: what lerobot is given (``source``) and how it must be loaded."""

    source: str  # an absolute local directory, or a hub id
    local: bool
    tiny: bool = False
    name: str = ""  # as the user gave it, for messages

    @property
    def path(self) -> Path | None:
        """The local directory (None for a hub id)."""
        return Path(self.source) if self.local else None

    def model_patches(self) -> contextlib.AbstractContextManager[Any]:
        """While open, lerobot's own building code builds this checkpoint's model (tiny: tiny)."""
        return tiny.tiny_model_patches(self.source) if self.tiny else contextlib.nullcontext()

    def hub_context(self) -> contextlib.AbstractContextManager[Any]:
        """``HF_HUB_OFFLINE=1`` while a tiny checkpoint loads (it never needs the hub); else nothing."""
        return _hub_offline() if self.tiny else contextlib.nullcontext()

    def processor_overrides(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``preprocessor_overrides`` plus, for a tiny checkpoint, its own tokenizer (wherever it lives now).

        >>> Checkpoint("/ckpt", local=True, tiny=True).processor_overrides({"device_processor": {"device": "cpu"}})
        {'device_processor': {'device': 'cpu'}, 'tokenizer_processor': {'tokenizer_name': '/ckpt/tokenizer'}}
        >>> Checkpoint("lerobot/pi05_libero", local=False).processor_overrides()
        {}
        """
        out = dict(overrides or {})
        if self.tiny:
            out.update(tokenizer_override(tiny.tokenizer_dir(self.source)))
        return out

    def read_config(self, device: str | None = None):
        """lerobot's ``PreTrainedConfig`` of the checkpoint, checked to be supported, ready to build from."""
        from lerobot.configs import PreTrainedConfig

        config = PreTrainedConfig.from_pretrained(self.source)
        require_supported(config, what=self.name or self.source)
        if device is not None:
            config.device = device
        config.pretrained_path = Path(self.source) if self.local else self.source
        return config

    def depths(self, config: Any) -> tuple[int, int]:
        """(action-expert depth, VLM depth) of the model ``config`` (this checkpoint's) describes."""
        if self.tiny:
            return tiny.tiny_depths(self.source)
        require_supported(config, what=self.name or self.source)
        return adapter_class(config.type).config_depths(config)

    def num_denoise_steps(self, config: Any) -> int:
        """Denoise steps per model run of ``config`` (Pi0.5/Pi0 ``num_inference_steps``, SmolVLA ``num_steps``)."""
        require_supported(config, what=self.name or self.source)
        return adapter_class(config.type).config_denoise_steps(config)

    def check_weights(self, policy: Any) -> None:
        """:func:`check_weights_loaded` against this checkpoint."""
        check_weights_loaded(policy, self.source)


def resolve(path_or_id: str | os.PathLike[str]) -> Checkpoint:
    """The :class:`Checkpoint` a user named; fails in one line on a bad local directory.

    A string that looks like a path (exists, starts with ``.``/``/``/``~``, or has other than one
    ``/``) is a local directory; ``owner/name`` that does not exist locally is a hub id.

    >>> resolve("lerobot/pi05_libero")
    Checkpoint(source='lerobot/pi05_libero', local=False, tiny=False, name='lerobot/pi05_libero')
    >>> resolve("/no/such/checkpoint")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: policy path /no/such/checkpoint does not exist; pass a policy checkpoint directory, a hub id or 'tiny'
    """
    text = str(path_or_id)
    if text == TINY:
        source = ensure_tiny_checkpoint()
        return Checkpoint(str(source), local=True, tiny=True, name=text)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if not looks_local:
        return Checkpoint(text, local=False, tiny=False, name=text)
    if not path.is_dir():
        raise CaptureError(f"policy path {text} does not exist; pass a policy checkpoint directory, a hub id or 'tiny'")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CaptureError(f"{text} is not a lerobot policy checkpoint (missing {', '.join(missing)})")
    check_safetensors(path / "model.safetensors")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise CaptureError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    require_supported(config if isinstance(config, Mapping) else {}, what=text)
    source = path.resolve()
    return Checkpoint(str(source), local=True, tiny=tiny.is_tiny_checkpoint(source), name=text)


# ---- the cached tiny checkpoint ("tiny") ------------------------------------------------------------
def tiny_cache_dir() -> Path:
    """Where ``"tiny"`` is kept: ``$ATTNSTORE_CACHE/tiny_pi05`` or ``~/.cache/attnstore/tiny_pi05``."""
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
    repoint_saved_tokenizer(tmp, path / tiny.TOKENIZER_DIRNAME)
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
    return tiny.is_tiny_checkpoint(path) and all((path / f).is_file() for f in REQUIRED_FILES)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


# ---- weight check ---------------------------------------------------------------------------------
def check_weights_loaded(policy, checkpoint: str | os.PathLike[str]) -> None:
    """Fail (one line) unless ``checkpoint``'s weights match ``policy``'s parameters key for key.

    ``PI05Policy.from_pretrained`` only prints a warning when a checkpoint does not fit its model
    and hands back random weights; this compares the safetensors' keys and shapes (after lerobot's
    own key fixes) with the model's state_dict. Tied weights stored once count as present.
    """
    import logging

    import torch
    from safetensors import safe_open

    file = _resolve_safetensors(checkpoint)
    with safe_open(str(file), framework="pt") as handle:
        stored = {k: torch.empty(tuple(handle.get_slice(k).get_shape()), device="meta") for k in handle.keys()}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # lerobot's key fixer warns about keys it keeps unchanged
    try:
        fix = getattr(policy, "_fix_pytorch_state_dict_keys", None)  # Pi0.5 / Pi0 remap old key names
        fixed = fix(stored, policy.config) if fix is not None else stored
    finally:
        logging.disable(previous)
    stored_shapes = {(k if k.startswith("model.") else f"model.{k}"): tuple(v.shape) for k, v in fixed.items()}
    state = policy.state_dict(keep_vars=True)
    model_shapes = {k: tuple(v.shape) for k, v in state.items()}

    missing = [k for k in model_shapes if k not in stored_shapes and not _tied_to_stored(k, state, stored_shapes)]
    unexpected = [k for k in stored_shapes if k not in model_shapes]
    mismatched = [
        f"{k} {stored_shapes[k]} vs model {model_shapes[k]}"
        for k in stored_shapes
        if k in model_shapes and stored_shapes[k] != model_shapes[k]
    ]
    if missing or unexpected or mismatched:
        examples = (mismatched or missing or unexpected)[:1]
        hint = (
            " (a tiny checkpoint loaded full-size? load it with attnstore's load_policy)"
            if len(mismatched) > len(model_shapes) // 4
            else ""
        )
        raise CaptureError(
            f"checkpoint {checkpoint} does not match its config: {len(missing)} missing, "
            f"{len(mismatched)} shape mismatches, {len(unexpected)} unexpected (e.g. {examples[0]}){hint}"
        )


def _tied_to_stored(key: str, state: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """True when parameter ``key`` shares storage with a parameter the checkpoint holds."""
    tensor = state[key]
    ptr = tensor.data_ptr() if tensor.numel() else None
    if ptr is None:
        return False
    return any(k in stored and k != key and v.data_ptr() == ptr for k, v in state.items())


def _resolve_safetensors(checkpoint: str | os.PathLike[str]) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        file = path / "model.safetensors"
        if not file.is_file():
            raise CaptureError(f"{path} has no model.safetensors; is it a lerobot policy checkpoint?")
        return check_safetensors(file)
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(str(checkpoint), "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
        raise CaptureError(f"cannot find model.safetensors for {checkpoint}: {type(exc).__name__}") from exc
    return check_safetensors(file)


def check_safetensors(file: Path) -> Path:
    """``file``, or a one-line error naming it when it is not a whole safetensors file (truncated copy,
    interrupted download): its header and the end of its last tensor are checked against the file's
    size, without reading any weights. lerobot would otherwise fail deep in ``from_pretrained`` with a
    ``SafetensorError`` traceback, after the simulation was built.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     bad = Path(tmp) / "model.safetensors"
    ...     _ = bad.write_bytes((100).to_bytes(8, "little") + b'{"w": {')
    ...     check_safetensors(bad)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: .../model.safetensors is truncated or damaged (its header needs 108 bytes, the file has 15): copy or download the checkpoint again
    """
    fix = "copy or download the checkpoint again"
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CaptureError(f"{file} is truncated or damaged (only {size} bytes): {fix}")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CaptureError(
                    f"{file} is truncated or damaged (its header needs {n + 8} bytes, the file has {size}): {fix}"
                )
            header = json.loads(handle.read(n))
    except OSError as exc:
        raise CaptureError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CaptureError(f"{file} is truncated or damaged (its header is not valid JSON): {fix}") from exc
    if not isinstance(header, dict):
        raise CaptureError(f"{file} is truncated or damaged (its header is not a table of tensors): {fix}")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CaptureError(f"{file} is truncated or damaged (its header is not a table of tensors): {fix}") from exc
    if 8 + n + end > size:
        raise CaptureError(
            f"{file} is truncated or damaged (its tensors need {8 + n + end} bytes, the file has {size}): {fix}"
        )
    return file
