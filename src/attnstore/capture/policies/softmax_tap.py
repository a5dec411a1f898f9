"""SoftmaxTap: record the softmax outputs computed inside a ``with`` block, on this thread, unchanged.

For models whose attention never returns its probabilities (SmolVLA's ``eager_attention_forward``
returns ``probs @ V`` only): a thread-local :class:`torch.overrides.TorchFunctionMode` keeps a reference
to each softmax result, the very tensor the caller goes on with; nothing is recomputed or changed.
torch is imported when a tap is first entered.
"""

from __future__ import annotations

from typing import Any


class SoftmaxTap:
    """Records the outputs of every softmax called inside ``with`` on this thread (the results are the
    tensors the caller goes on with; nothing is recomputed or changed)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self._mode = None

    def __enter__(self) -> SoftmaxTap:
        self._mode = _tap_mode()(self.outputs)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


_TAP: list[type] = []


def _tap_mode() -> type:
    """The TorchFunctionMode class of :class:`SoftmaxTap` (made once, when torch is loaded)."""
    if not _TAP:
        import torch
        from torch.overrides import TorchFunctionMode

        softmaxes = frozenset(
            {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
        )

        class Tap(TorchFunctionMode):
            def __init__(self, outputs: list[Any]) -> None:
                super().__init__()
                self.outputs = outputs

            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func in softmaxes:
                    self.outputs.append(out)
                return out

        _TAP.append(Tap)
    return _TAP[0]
