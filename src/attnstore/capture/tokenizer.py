"""The tokenizer side of a checkpoint: the offline tiny tokenizers (PaliGemma-like for Pi0.5 and Pi0,
SmolVLM2-like for SmolVLA), pointing lerobot's tokenizer step at a local tokenizer, and finding the
tokenizer inside a built preprocessor.

lerobot's Pi0.5 processors hard-code ``google/paligemma-3b-pt-224`` (a hub download). A tiny
checkpoint carries its own small tokenizer instead (:func:`write_offline_tokenizer`, in the
checkpoint's ``tokenizer/`` folder); :func:`tokenizer_override` is the ``preprocessor_overrides``
entry that points lerobot's tokenizer step at it wherever the checkpoint lives now.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOKENIZER_STEP = "tokenizer_processor"  # registry name of lerobot's tokenizer step

# Prompts the tiny tokenizer is trained on: LIBERO-like task text plus Pi0.5's state prompt format.
_TOKENIZER_CORPUS = (
    "Task: pick up the alphabet soup and place it in the basket, State: 12 128 255 0 77 3 200 64;\nAction: ",
    "Task: put the bowl on the plate, State: 1 2 3 4 5 6 7 8 9 10 11 100 101 199 250;\nAction: ",
    "Task: open the top drawer of the cabinet and put the bowl inside",
    "Task: turn on the stove and put the moka pot on it",
    "Task: pick up the black bowl between the plate and the ramekin and place it on the plate",
    "Task: put both the cream cheese box and the butter in the basket",
    "Task: push the plate to the front of the stove; pick up the ketchup, tomato sauce, milk, orange juice",
)


def write_offline_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """A small byte-level BPE tokenizer (offline stand-in for PaliGemma's), saved the HF way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    # PaliGemma's tokenizer starts every prompt with <bos>; do the same
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


# SmolVLM2's special tokens (its tokenizer's ``extra_special_tokens``): SmolVLA reads
# ``tokenizer.fake_image_token_id`` / ``global_image_token_id`` for its image start/end tokens
SMOLVLM_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    "video_token": "<video>",
}


def offline_smolvlm_tokenizer():
    """A small byte-level BPE tokenizer with SmolVLM2's special tokens (offline stand-in for SmolVLM2's),
    not saved: :mod:`attnstore.capture.tiny_smolvla` saves it inside the tiny VLM's processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<unk>", *SMOLVLM_SPECIAL_TOKENS.values()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"{line}\n" for line in _TOKENIZER_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        unk_token="<unk>",
        extra_special_tokens=dict(SMOLVLM_SPECIAL_TOKENS),
    )


def tokenizer_override(tokenizer_dir: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The ``preprocessor_overrides`` entry that loads the tokenizer from ``tokenizer_dir``.

    >>> tokenizer_override("/ckpt/tokenizer")
    {'tokenizer_processor': {'tokenizer_name': '/ckpt/tokenizer'}}
    """
    return {TOKENIZER_STEP: {"tokenizer_name": str(tokenizer_dir)}}


@contextlib.contextmanager
def local_tokenizer_step(
    tokenizer_dir: str | os.PathLike[str], module: str = "lerobot.policies.pi05.processor_pi05"
) -> Iterator[None]:
    """While open, a lerobot processor factory builds its tokenizer step from ``tokenizer_dir``.

    Swaps ``TokenizerProcessorStep`` of the processor ``module`` (Pi0.5's by default; Pi0's
    ``lerobot.policies.pi0.processor_pi0``, SmolVLA's ``lerobot.policies.smolvla.processor_smolvla``) for
    the same class with the local path (only for building new pipelines from a config, where no override
    can be passed); restored on exit.
    """
    import importlib

    processor = importlib.import_module(module)
    original = processor.TokenizerProcessorStep

    def step(**kwargs):
        kwargs["tokenizer_name"] = str(tokenizer_dir)
        return original(**kwargs)

    processor.TokenizerProcessorStep = step
    try:
        yield
    finally:
        processor.TokenizerProcessorStep = original


def repoint_saved_tokenizer(checkpoint_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str]) -> None:
    """Rewrite a saved ``policy_preprocessor.json`` so its tokenizer step loads ``tokenizer_dir``."""
    cfg_file = Path(checkpoint_dir) / "policy_preprocessor.json"
    cfg = json.loads(cfg_file.read_text())
    for step in cfg.get("steps", []):
        if step.get("registry_name") == TOKENIZER_STEP:
            step["config"]["tokenizer_name"] = str(tokenizer_dir)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def find_tokenizer(preprocessor) -> Any | None:
    """The tokenizer inside a lerobot preprocessor pipeline (its tokenizer step), or None.

    >>> find_tokenizer(None) is None
    True
    """
    for step in getattr(preprocessor, "steps", ()):
        tok = getattr(step, "input_tokenizer", None)
        if tok is not None:
            return tok
    return None
