"""Legacy ``.pt`` files exactly as the fork-lerobot workflow writes them (IanHuangYH/lerobot, HEAD bf0dac1).

Built from what that code does, not from ``pi05_attention_saving_guide.md`` (which documents another dict):

* ``src/lerobot/policies/pi05/modeling_pi05.py``

  - ``PaliGemmaWithExpertModel.forward``, suffix-only branch (l.463-480): the expert runs with
    ``output_attentions=True`` and returns ``{i: att for i, att in enumerate(suffix_output.attentions)}``:
    every expert layer (18 for gemma_300m), each ``(B, heads, suffix_len, prefix_len + suffix_len)`` in the
    model dtype (transformers' ``eager_attention_forward``: softmax in float32, then ``.to(query.dtype)``;
    the LIBERO checkpoints run in bfloat16, ``precision=config.dtype`` l.601, ``self.to(bfloat16)`` l.395);
  - ``sample_actions`` (l.930-935): ``dt = -1.0 / num_steps``; ``time = 1.0 + step * dt``;
    ``time_tensor = torch.tensor(time, dtype=torch.float32, ...)``; ``denoise_step`` (l.980-1014) stores
    ``{'time': timestep[0].item(), 'attention_weights': ..., 'prefix_len': int, 'suffix_len': int}`` under
    key ``step``: the times are float32 values as Python floats (0.8999999761581421, not 0.9);
  - ``get_attention_maps(last_n_layers=None)`` (l.665-687) returns all layers when called without an
    argument, which is how ``rollout()`` calls it.

* ``src/lerobot/scripts/lerobot_eval.py``

  - ``rollout()`` (l.138-351): after each ``select_action`` that ran the model, appends
    ``{'rollout_step': step, 'attention_maps': deepcopy(step_attention)}`` (l.265-271), ``step`` = env step;
    all envs of the batch step together until the last is done (l.242), so every file of a batch has
    the same entries;
  - at the end, per batch element ``batch_idx`` (l.330-351): ``_extract_batch_sample_from_attention_maps``
    (l.95-135) slices ``weights[batch_idx:batch_idx+1]`` (l.126), a VIEW of the whole batch's tensor, so
    ``torch.save`` writes the whole batch's storage into every episode's file; the tensors are saved
    where they are (``--policy.device=cuda:0``, no ``.cpu()``); the dict saved is
    ``{"episode_index": n_episodes_so_far + batch_idx, "batch_index": batch_idx, "rollout_steps": ...,
    "metadata": {"num_rollout_steps": ..., "num_denoising_steps_per_action": ...}}`` (l.340-350) to
    ``<attention_dir>/<task_group>_<task_id>/episode_{episode_idx:05d}_attention.pt`` (l.334, l.797);
    ``n_episodes_so_far = batch_ix * env.num_envs`` (l.478), so numbering restarts per task.

Saving "from cuda:0" without CUDA: ``torch.save`` records each storage's device as the location string
of its persistent id in ``data.pkl`` (``('storage', <dtype>Storage, key, location, numel)``, from
``torch.serialization.location_tag``, i.e. the registered taggers, lowest priority value first), and
writes a cuda storage's bytes after ``storage.cpu()``; nothing else in the file depends on the device
(``Tensor._reduce_ex_internal`` passes storage, offset, size, stride, requires_grad, hooks). So
:func:`save_as_device` registers a tagger (``torch.serialization.register_package``, priority 0, ahead
of the cpu tagger at 10) that answers ``"cuda:0"`` for CPU storages while it is active and ``None``
(defer to torch's own taggers) otherwise. The file is what torch writes for the same tensors on
``cuda:0``: ``torch.load`` without ``map_location`` fails on a machine without CUDA ("Attempting to
deserialize object on a CUDA device"), with ``map_location="cpu"`` it loads.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORK_NUM_LAYERS = 18  # gemma_300m expert depth: get_attention_maps() returns all of them
FORK_DEVICE = "cuda:0"

_fake_location: list[str] = []  # the location the tagger answers while save_as_device is active


def _fake_tag(storage: Any) -> str | None:
    if _fake_location and storage.device.type == "cpu":
        return _fake_location[-1]
    return None  # not ours: torch's own taggers decide


def _no_deserialize(storage: Any, location: str) -> None:
    return None  # loading is torch's business (map_location decides)


torch.serialization.register_package(0, _fake_tag, _no_deserialize)


@contextlib.contextmanager
def saving_as_device(device: str = FORK_DEVICE):
    """While active, ``torch.save`` records CPU storages as on ``device`` (see the module docstring)."""
    _fake_location.append(device)
    try:
        yield
    finally:
        _fake_location.pop()


def save_as_device(obj: Any, path: str | Path, device: str = FORK_DEVICE) -> None:
    """``torch.save(obj, path)`` as if ``obj``'s tensors lived on ``device``."""
    with saving_as_device(device):
        torch.save(obj, path)


@dataclass(frozen=True)
class KeyLayout:
    """The key axis of the expert's attention: camera patches | language | action tokens (LIBERO Pi0.5 default).

    ``valid_language``: the prompt's real tokens (the rest is right padding, masked like missing cameras).
    """

    patches: int = 256
    cameras_present: tuple[bool, ...] = (True, True, False)
    num_language: int = 200
    valid_language: int = 30
    suffix_len: int = 50

    @property
    def prefix_len(self) -> int:
        return self.patches * len(self.cameras_present) + self.num_language

    @property
    def num_keys(self) -> int:
        return self.prefix_len + self.suffix_len

    def valid(self) -> torch.Tensor:
        v = torch.zeros(self.num_keys, dtype=torch.bool)
        for c, present in enumerate(self.cameras_present):
            v[c * self.patches : (c + 1) * self.patches] = present
        lang = self.patches * len(self.cameras_present)
        v[lang : lang + self.valid_language] = True
        v[self.prefix_len :] = True
        return v


def fork_times(num_steps: int = 10) -> list[float]:
    """The ``time`` values as ``denoise_step`` stores them (float32 ``.item()``).

    >>> fork_times()[:3], fork_times()[-1]
    ([1.0, 0.8999999761581421, 0.800000011920929], 0.10000000149011612)
    """
    dt = -1.0 / num_steps
    return [torch.tensor(1.0 + step * dt, dtype=torch.float32).expand(1)[0].item() for step in range(num_steps)]


def model_attention(gen: torch.Generator, shape: tuple[int, ...], layout: KeyLayout, dtype: torch.dtype) -> torch.Tensor:
    """Probabilities of ``shape`` (..., suffix_len, keys): masked keys exactly 0, softmax in float32, then ``dtype``."""
    logits = torch.randn(*shape, generator=gen) * 2.0
    logits = logits.masked_fill(~layout.valid(), float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)


def model_attention_maps(
    gen: torch.Generator, batch: int, *, num_layers: int, heads: int, layout: KeyLayout, num_steps: int,
    dtype: torch.dtype, cheap: bool = False,
) -> dict[int, dict[str, Any]]:
    """What ``policy.model.get_attention_maps()`` returns after one model run (``self.attention_maps``).

    Every (step, layer) tensor is ``(batch, heads, suffix_len, keys)`` with its own storage, as the
    model's softmax outputs are. ``cheap``: one random draw per model run, each tensor its rows rolled
    by a different amount (for size and memory tests, where values don't matter); otherwise each
    tensor is its own random draw (drawn together, then copied apart).
    """
    one = (batch, heads, layout.suffix_len, layout.num_keys)
    if cheap:
        base = model_attention(gen, one, layout, torch.float32)
        tensors = [base.roll(k, dims=2).to(dtype) for k in range(num_steps * num_layers)]
    else:
        drawn = model_attention(gen, (num_steps * num_layers, *one), layout, dtype)
        tensors = [t.clone() for t in drawn]  # each its own storage
    return {
        step: {
            "time": time,
            "attention_weights": {i: tensors[step * num_layers + i] for i in range(num_layers)},
            "prefix_len": layout.prefix_len,
            "suffix_len": layout.suffix_len,
        }
        for step, time in enumerate(fork_times(num_steps))
    }


def extract_batch_sample(all_attention_maps: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
    """``_extract_batch_sample_from_attention_maps`` (lerobot_eval.py l.95-135): views ``[b:b+1]``, same keys."""
    out = []
    for rollout_step_data in all_attention_maps:
        step = {"rollout_step": rollout_step_data["rollout_step"], "attention_maps": {}}
        for d, dd in rollout_step_data["attention_maps"].items():
            step["attention_maps"][d] = {
                "time": dd["time"], "prefix_len": dd["prefix_len"], "suffix_len": dd["suffix_len"],
                "attention_weights": {layer: w[batch_idx : batch_idx + 1] for layer, w in dd["attention_weights"].items()},
            }
        out.append(step)
    return out


def write_fork_rollout(
    attention_dir: str | Path,
    rollout_steps: Sequence[int],
    *,
    num_envs: int = 1,
    batch_ix: int = 0,
    num_layers: int = FORK_NUM_LAYERS,
    heads: int = 8,
    layout: KeyLayout = KeyLayout(),
    num_steps: int = 10,
    dtype: torch.dtype = torch.bfloat16,
    device: str = FORK_DEVICE,
    seed: int = 0,
    cheap: bool = False,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """One ``rollout()`` of a batch of ``num_envs`` envs: the model runs at ``rollout_steps``; one file per env.

    ``attention_dir`` is the task's folder (``.../attention/<task_group>_<task_id>``). Returns the
    files (batch element order) and ``all_attention_maps`` (the batch-level entries, the ground truth:
    file ``b`` holds ``[b:b+1]`` views of its tensors). ``cheap``: see :func:`model_attention_maps`.
    """
    gen = torch.Generator().manual_seed(seed)
    all_attention_maps = []
    for step in rollout_steps:
        step_attention = model_attention_maps(gen, num_envs, num_layers=num_layers, heads=heads, layout=layout,
                                              num_steps=num_steps, dtype=dtype, cheap=cheap)
        all_attention_maps.append({"rollout_step": int(step), "attention_maps": _deepcopy(step_attention)})
        del step_attention
    attention_dir = Path(attention_dir)
    attention_dir.mkdir(parents=True, exist_ok=True)
    n_episodes_so_far = batch_ix * num_envs
    paths = []
    for batch_idx in range(num_envs):
        episode_idx = n_episodes_so_far + batch_idx
        path = attention_dir / f"episode_{episode_idx:05d}_attention.pt"
        episode_attention_maps = extract_batch_sample(all_attention_maps, batch_idx)
        save_as_device(
            {
                "episode_index": episode_idx,
                "batch_index": batch_idx,
                "rollout_steps": episode_attention_maps,
                "metadata": {
                    "num_rollout_steps": len(episode_attention_maps),
                    "num_denoising_steps_per_action": len(episode_attention_maps[0]["attention_maps"])
                    if episode_attention_maps else 0,
                },
            },
            path,
            device,
        )
        paths.append(path)
    return paths, all_attention_maps


def _deepcopy(step_attention: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``copy.deepcopy`` as rollout() does (l.270), with each tensor pre-copied by ``clone()`` through the memo.

    Same result (new dicts, new tensors with their own storage: the model's tensors share none),
    without ``Tensor.__deepcopy__``'s slow storage copy (~4 ms per small tensor here).
    """
    memo = {id(t): t.clone() for step in step_attention.values() for t in step["attention_weights"].values()}
    return copy.deepcopy(step_attention, memo)


def storage_locations(path: str | Path) -> set[str]:
    """The device locations recorded in a torch zip file's ``data.pkl`` (read without loading any tensor)."""
    import pickle
    import zipfile

    found: set[str] = set()

    class _Reader(pickle.Unpickler):
        def persistent_load(self, pid):
            found.add(pid[3])  # ('storage', storage_type, key, location, numel)
            return None

        def find_class(self, module, name):
            if module.startswith("torch"):
                return lambda *a, **k: None
            return super().find_class(module, name)

    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        _Reader(zf.open(name)).load()
    return found
