"""Parse which layers and denoise steps to capture (pure helpers, no torch).

Layers: ``"last:N"``, ``"all"``, ``"16,17"``, ``"-1"``, an int or a sequence of ints (negative
indices count from the end). Denoise steps: ``"all"``, ``"final"``, ``"last:N"`` or indices the same
way. Results are sorted, distinct, non-negative tuples, as the store's spec wants them.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnstore.errors import CaptureError

Selection = str | int | Sequence[int]


def parse_layers(selection: Selection, num_layers: int, *, what: str = "action-expert layer") -> tuple[int, ...]:
    """Layer indices selected from a model with ``num_layers`` layers.

    >>> parse_layers("last:2", 18)
    (16, 17)
    >>> parse_layers("all", 3), parse_layers("0,-1", 18), parse_layers([-2, 3], 18), parse_layers(5, 18)
    ((0, 1, 2), (0, 17), (3, 16), (5,))
    >>> parse_layers("18", 18)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: action-expert layer 18 is out of range: this model has 18 (valid 0..17, or -18..-1)
    """
    return _parse(selection, num_layers, what=what, final_name=None)


def parse_denoise_steps(selection: Selection, num_steps: int) -> tuple[int, ...]:
    """Denoise step indices (0 = t 1.0, ``num_steps - 1`` = the final step) from a selection.

    >>> parse_denoise_steps("all", 10)
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    >>> parse_denoise_steps("final", 10), parse_denoise_steps("last:3", 10), parse_denoise_steps("0,-1", 10)
    ((9,), (7, 8, 9), (0, 9))
    >>> parse_denoise_steps("first", 10)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: denoise step selection 'first' not understood: use 'all', 'final', 'last:N' or indices like '0,9' or '-1'
    """
    return _parse(selection, num_steps, what="denoise step", final_name="final")


def _parse(selection: Selection, count: int, *, what: str, final_name: str | None) -> tuple[int, ...]:
    if count < 1:
        raise CaptureError(f"cannot select a {what}: the model has none")
    indices = _raw_indices(selection, count, what=what, final_name=final_name)
    if not indices:
        raise CaptureError(f"{what} selection {selection!r} selects nothing; select at least one")
    out = set()
    for i in indices:
        if not -count <= i < count:
            raise CaptureError(
                f"{what} {i} is out of range: this model has {count} (valid 0..{count - 1}, or -{count}..-1)"
            )
        out.add(i % count)
    return tuple(sorted(out))


def _raw_indices(selection: Selection, count: int, *, what: str, final_name: str | None) -> list[int]:
    usage = (
        f"use 'all', {repr(final_name) + ', ' if final_name else ''}'last:N' or indices like "
        f"{'0,9' if final_name else '16,17'!r} or '-1'"
    )
    if isinstance(selection, bool):
        raise CaptureError(f"{what} selection {selection!r} not understood: {usage}")
    if isinstance(selection, int):
        return [selection]
    if isinstance(selection, str):
        text = selection.strip().lower()
        if text == "all":
            return list(range(count))
        if final_name and text == final_name:
            return [count - 1]
        if text.startswith("last:"):
            try:
                n = int(text[len("last:") :])
            except ValueError:
                raise CaptureError(f"{what} selection {selection!r} not understood: {usage}") from None
            if not 1 <= n <= count:
                raise CaptureError(f"{what} selection {selection!r}: N must be in 1..{count}")
            return list(range(count - n, count))
        try:
            return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
        except ValueError:
            raise CaptureError(f"{what} selection {selection!r} not understood: {usage}") from None
    try:
        return [int(v) for v in selection]
    except (TypeError, ValueError):
        raise CaptureError(f"{what} selection {selection!r} not understood: {usage}") from None
