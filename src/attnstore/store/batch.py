"""InferenceBatch: what the caller hands the writer per inference, checked against the store's spec.

:func:`validate_batch` runs on the caller's thread (a mistake fails where it was made); the rest turns
a batch's arrays into the rows the writer stores, on the writer thread: numpy views of numpy arrays or
CPU torch tensors (torch is never imported here), the non-finite check and the uint16 quantisation of
the quantised encodings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import SchemaError
from attnstore.schema import StoreSpec
from attnstore.schema.encoding import QUANTISED, canonical_encoding, quantise


class InferenceBatch(Mapping):
    """One policy inference for B batch elements (each element is its own episode).

    A mapping from the schema's per-inference variable names (``attention``, ``key_valid``, ``images``,
    ``actions``, ``state``, ...; see :data:`attnstore.schema.VARIABLES`) to arrays with B rows, checked
    against the store's spec by the writer. Arrays may be numpy arrays or (CPU) torch tensors. Besides the
    variables: ``episodes`` (B,) and ``env_steps`` (B,) ints, ``times`` (D,) the flow-matching t actually
    used (checked against the spec), ``keep`` (B,) bool rows to store (None = all; finished envs are
    dropped) and ``ready``, called on the writer thread before reading (e.g. a CUDA event sync).

    >>> batch = InferenceBatch(episodes=[0], env_steps=[0], attention=np.zeros((1, 2)), key_valid=None)
    >>> sorted(batch), batch.batch_size, batch.images is None
    (['attention'], 1, True)
    """

    def __init__(self, episodes: Any, env_steps: Any, *, times: Any = None, keep: Any = None,
                 ready: Callable[[], None] | None = None, **variables: Any) -> None:
        unknown = sorted(set(variables) - set(S.VARIABLE))
        if unknown:
            raise SchemaError(f"InferenceBatch: unknown variables {unknown}; the schema has {sorted(S.VARIABLE)}")
        self.episodes, self.env_steps, self.times, self.keep, self.ready = episodes, env_steps, times, keep, ready
        self._data = {k: v for k, v in variables.items() if v is not None}

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:  # batch.images: the variable, None when not given
        if name.startswith("_") or name not in S.VARIABLE:
            raise AttributeError(name)
        return self._data.get(name)

    def __setattr__(self, name: str, value: Any) -> None:  # batch.images = ...: sets the variable
        if name in S.VARIABLE:
            self[name] = value
        else:
            object.__setattr__(self, name, value)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in S.VARIABLE:
            raise SchemaError(f"InferenceBatch: unknown variable {name!r}; the schema has {sorted(S.VARIABLE)}")
        if value is None:
            self._data.pop(name, None)
        else:
            self._data[name] = value

    @property
    def batch_size(self) -> int:
        return len(self.episodes)


def validate_batch(batch: InferenceBatch, spec: StoreSpec) -> None:
    """Checks against the variable table on the caller's thread, so a mistake fails where it was made."""
    b = batch.batch_size
    if len(batch.env_steps) != b:
        raise SchemaError(f"InferenceBatch.env_steps: expected {b} values, got {len(batch.env_steps)}")
    if batch.keep is not None and len(batch.keep) != b:
        raise SchemaError(f"InferenceBatch.keep: expected {b} flags, got {len(batch.keep)}")
    if batch.times is not None:
        times = as_numpy(batch.times, np.float64).reshape(-1)
        if times.shape != (len(spec.times),) or not np.allclose(times, spec.times, atol=1e-5):
            raise SchemaError(f"InferenceBatch.times {times.tolist()} differ from the store's {list(spec.times)}")
    wanted = S.batch_variables(spec)
    extra = sorted(set(batch) - {v.name for v in wanted})
    if extra:
        raise SchemaError(f"InferenceBatch carries {extra}, which this store's spec does not store")
    for var in wanted:
        if var.name not in batch:
            raise SchemaError(f"InferenceBatch.{var.name} is required by this store's spec")
        shape, got = (b, *var.row_shape(spec)), tuple(np.shape(batch[var.name]))
        if got != shape:
            raise SchemaError(f"InferenceBatch.{var.name}: expected shape {shape}, got {got}")
        if var.attention_codec and is_uint16(batch[var.name]) and spec.encoding not in QUANTISED:
            raise SchemaError(
                f"InferenceBatch.{var.name} is already quantised (uint16), but this store keeps exact "
                f"{spec.encoding}: hand over the probabilities"
            )


_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


def as_numpy(value: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of a numpy array or a CPU torch tensor (bf16/fp16 widened to float32).

    >>> as_numpy([1, 2], np.float32)
    array([1., 2.], dtype=float32)
    """
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach()
        if dtype is not None and np.dtype(dtype).kind == "f" and str(value.dtype) not in _NUMPY_FLOATS:
            value = value.float()  # bfloat16 (no numpy dtype): widened
        value = value.cpu().numpy()
    arr = np.asarray(value)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def is_uint16(value: Any) -> bool:
    """Whether ``value`` (numpy array or torch tensor) holds uint16: attention quantised on the device.

    >>> is_uint16(np.zeros(2, np.uint16)), is_uint16(np.zeros(2, np.float32)), is_uint16([1])
    (True, False, False)
    """
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("uint16", "torch.uint16")


def take_rows(values: np.ndarray, take: np.ndarray | None) -> np.ndarray:
    """``values[take]``, or ``values`` itself when every row is kept (``take`` None: no copy)."""
    return values if take is None else values[take]


def quantise_attention(values: np.ndarray, spec: StoreSpec, *, quantised: bool = False) -> np.ndarray:
    """uint16 round(p * 65535) of float32 rows the writer owns (overwritten), or ``values`` as they are when
    already ``quantised`` (uint16 from the device); ``analysis`` re-quantises each attention row within its
    checked bounds. (Version-1 stores, float32 arrays, are never passed.)"""
    stored = values if quantised else quantise(values)
    if canonical_encoding(spec.encoding) == "analysis":
        from attnstore.store.analysis_grade import analysis_quantise

        stored = analysis_quantise(stored, spec.layout)
    return stored


def check_finite(name: str, values: np.ndarray, episodes: np.ndarray, env_steps: np.ndarray) -> None:
    """uint16 has no NaN: refuse non-finite probabilities (an fp16 overflow) rather than store garbage."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(nonfinite_message(name, int(env_steps[i]), int(episodes[i])))


def nonfinite_message(name: str, env_step: int, episode: int) -> str:
    """The one line for a non-finite row (here, and for the flags of the device path in capture/buffers.py).

    >>> nonfinite_message("attention", 40, 2)[:75]
    'attention of the inference at env step 40 of episode 2 has non-finite value'
    """
    return (f"{name} of the inference at env step {env_step} of episode {episode} has non-finite values "
            f"(NaN/inf), which the uint16 encoding cannot store: run the policy in float32/bfloat16 instead of "
            f"float16, or capture with encoding float32 to keep them")
