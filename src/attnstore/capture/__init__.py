"""capture/: hooks on an unmodified lerobot Pi0.5 that stream attention to a writer. Never reads back.

recorder.py (the hooks), layout.py (keys/images from the policy's inputs), policy.py (load_policy),
checkpoint.py (resolving, type check, tiny patches, tokenizer override, weight check), tiny.py (the
tiny Pi0.5 builder), tokenizer.py (offline tokenizer, tokenizer step). The selection grammar is
:mod:`attnstore.selection`. Importing this package is cheap; torch and lerobot load when needed.
"""

from attnstore.capture.checkpoint import check_weights_loaded, require_pi05
from attnstore.capture.policy import load_policy
from attnstore.capture.recorder import AttentionRecorder
from attnstore.capture.tiny import TinyDims, is_tiny_checkpoint, make_tiny_policy, tiny_model_patches
from attnstore.capture.tokenizer import find_tokenizer

__all__ = [
    "AttentionRecorder",
    "TinyDims",
    "check_weights_loaded",
    "find_tokenizer",
    "is_tiny_checkpoint",
    "load_policy",
    "make_tiny_policy",
    "require_pi05",
    "tiny_model_patches",
]
