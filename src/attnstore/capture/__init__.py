"""capture/: hooks on an unmodified lerobot Pi0.5 that stream attention to a writer. Never reads back.

Importing this package is cheap; torch and lerobot load when a function needs them.
"""

from attnstore.capture.policy import find_tokenizer, load_policy
from attnstore.capture.recorder import AttentionRecorder
from attnstore.capture.tiny import (
    TinyDims,
    check_weights_loaded,
    is_tiny_checkpoint,
    make_tiny_policy,
    tiny_model_patches,
)

__all__ = [
    "AttentionRecorder",
    "TinyDims",
    "check_weights_loaded",
    "find_tokenizer",
    "is_tiny_checkpoint",
    "load_policy",
    "make_tiny_policy",
    "tiny_model_patches",
]
