"""The one grammar for choosing layers, denoise steps and episodes (pure: no torch, no numpy).

Capture (the recorder), ``attnstore eval``'s ``--attention.*`` config and the readers'
``--layer``/``--denoise`` all parse with this module, so a selection means the same everywhere:

* ``all``: every index; ``final``: the last one (= ``last:1``); ``last:N``: the last N;
* explicit indices: ``16,17``, ``[16,17]``, ``[16, 17]``, ``(16, 17)``, ``17``, an int or a
  sequence of ints; negative indices count from the end (``-1`` = the last).

Two steps: :func:`normalise` checks the syntax alone (no count needed: a config is read before any
model exists) and :func:`resolve` turns a selection into sorted, distinct, non-negative indices once
the count is known (a model's depth, its number of denoise steps). Errors are one line saying what is
valid; every function takes the error class to raise (default :class:`~attnstore.errors.CaptureError`)
and an optional ``label`` that starts the message (``--attention.layers=first: ...``), so each caller
keeps its own kind of error without catching and rewording.

>>> normalise("[16, 17]"), normalise(" Last:02 "), normalise([-1, 3]), normalise(5)
((16, 17), 'last:2', (-1, 3), (5,))
>>> resolve("[16,17]", 18) == resolve("16,17", 18) == resolve([16, 17], 18) == resolve("last:2", 18)
True
>>> resolve("all", 3), resolve("final", 10), resolve("-1,0", 18)
((0, 1, 2), (9,), (0, 17))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Integral

from attnstore.errors import AttnStoreError, CaptureError

Selection = str | int | Sequence[int]  # what a user or caller may pass
Normalised = str | tuple[int, ...]  # "all" | "final" | "last:N" | explicit indices (may be negative)
KEYWORDS = ("all", "final")
USAGE = "use all, last:N, final or indices like {example} or -1 (negative counts from the end)"

_INT = re.compile(r"[+-]?[0-9]+")
_BRACKETS = {"[": "]", "(": ")"}


class _Invalid(Exception):
    """Why a selection is invalid (the caller adds what was selected and raises its own error)."""


def normalise(
    selection: Selection,
    *,
    what: str = "index",
    example: str = "[16,17]",
    error: type[AttnStoreError] = CaptureError,
    label: str | None = None,
) -> Normalised:
    """Check ``selection``'s syntax; return ``"all"``, ``"final"``, ``"last:N"`` or a tuple of ints.

    Explicit indices keep their order, duplicates and signs (their range is checked by :func:`resolve`).
    ``label`` replaces the message's ``<what> selection '<value>'`` start (e.g. ``--attention.layers=x``).

    >>> normalise("all"), normalise("FINAL"), normalise("16,17"), normalise("(0, -1)")
    ('all', 'final', (16, 17), (0, -1))
    >>> normalise("first", what="denoise step", example="[0,9]")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: denoise step selection 'first': use all, last:N, final or indices like [0,9] or -1 (negative counts from the end)
    >>> normalise("last:0")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: index selection 'last:0': last:N needs a whole number N >= 1, e.g. last:2
    """
    try:
        return _syntax(selection, example=example)
    except _Invalid as exc:
        raise error(f"{label or _default_label(selection, what)}: {exc}") from None


def resolve(
    selection: Selection,
    count: int | None,
    *,
    what: str = "index",
    example: str = "[16,17]",
    error: type[AttnStoreError] = CaptureError,
    label: str | None = None,
) -> tuple[int, ...]:
    """Sorted, distinct, non-negative indices into ``range(count)`` that ``selection`` picks.

    ``count`` None (unknown) still resolves non-negative explicit indices; anything that needs the
    count (keywords, ``last:N``, negatives) is then an error.

    >>> resolve("last:3", 10), resolve(" 3, 1 ,3", 18), resolve((17, 0), 18), resolve([4], None)
    ((7, 8, 9), (1, 3), (0, 17), (4,))
    >>> resolve("18", 18, what="layer")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: layer 18 is out of range: this model has 18 (valid 0..17, or -18..-1)
    >>> resolve("last:19", 18, what="layer")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: layer selection 'last:19': last:N needs N in 1..18 (this model has 18)
    """
    form = normalise(selection, what=what, example=example, error=error, label=label)
    prefix = f"{label}: " if label else ""
    if count is not None and count < 1:
        raise error(f"{prefix}cannot select a {what}: the model has none")
    try:
        indices = _indices(form, count, what=what)
    except _Invalid as exc:
        raise error(f"{label or _default_label(selection, what)}: {exc}") from None
    out = set()
    for i in indices:
        if count is not None and not -count <= i < count:
            raise error(
                f"{prefix}{what} {i} is out of range: this model has {count} (valid 0..{count - 1}, or -{count}..-1)"
            )
        out.add(i % count if count is not None else i)
    return tuple(sorted(out))


def parse_layers(
    selection: Selection,
    num_layers: int,
    *,
    what: str = "action-expert layer",
    error: type[AttnStoreError] = CaptureError,
    label: str | None = None,
) -> tuple[int, ...]:
    """Layer indices selected from a model with ``num_layers`` layers.

    >>> parse_layers("last:2", 18), parse_layers("[16,17]", 18), parse_layers("final", 18)
    ((16, 17), (16, 17), (17,))
    >>> parse_layers("all", 3), parse_layers("0,-1", 18), parse_layers([-2, 3], 18), parse_layers(5, 18)
    ((0, 1, 2), (0, 17), (3, 16), (5,))
    >>> parse_layers("18", 18)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: action-expert layer 18 is out of range: this model has 18 (valid 0..17, or -18..-1)
    """
    return resolve(selection, num_layers, what=what, error=error, label=label)


def parse_denoise_steps(
    selection: Selection, num_steps: int, *, error: type[AttnStoreError] = CaptureError, label: str | None = None
) -> tuple[int, ...]:
    """Denoise step indices (0 = t 1.0, ``num_steps - 1`` = the final step) from a selection.

    >>> parse_denoise_steps("all", 10)
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    >>> parse_denoise_steps("final", 10), parse_denoise_steps("last:3", 10), parse_denoise_steps("[0,-1]", 10)
    ((9,), (7, 8, 9), (0, 9))
    >>> parse_denoise_steps("first", 10)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: denoise step selection 'first': use all, last:N, final or indices like [0,9] or -1 (negative counts from the end)
    """
    return resolve(selection, num_steps, what="denoise step", example="[0,9]", error=error, label=label)


def parse_episodes(
    selection: Selection | None, *, error: type[AttnStoreError] = CaptureError, label: str | None = None
) -> list[int] | None:
    """Episode indices to record (lerobot's numbering, sorted, distinct), or None for ``all``.

    Episodes have no count known in advance, so only ``all`` and explicit non-negative indices fit.

    >>> parse_episodes("[3,0,3]"), parse_episodes("0,2"), parse_episodes([1])
    ([0, 3], [0, 2], [1])
    >>> parse_episodes("all"), parse_episodes(None)
    (None, None)
    >>> parse_episodes("last:2")
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: episode selection 'last:2': use all or episode indices like [0,3] (the number of episodes is not known in advance)
    """
    if selection is None or (isinstance(selection, str) and selection.strip().lower() in ("none", "null")):
        return None
    start = label or _default_label(selection, "episode")
    usage = "use all or episode indices like [0,3] (the number of episodes is not known in advance)"
    try:
        form = _syntax(selection, example="[0,3]")
    except _Invalid as exc:
        raise error(f"{start}: {exc if str(exc).startswith('selects nothing') else usage}") from None
    if form == "all":
        return None
    if isinstance(form, str):
        raise error(f"{start}: {usage}")
    if any(e < 0 for e in form):
        raise error(f"{start}: episode indices start at 0 (lerobot's numbering)")
    return sorted(set(form))


def _syntax(selection: Selection, *, example: str) -> Normalised:
    usage = USAGE.format(example=example)
    if isinstance(selection, bool) or selection is None:
        raise _Invalid(usage)
    if isinstance(selection, Integral):
        return (int(selection),)
    if isinstance(selection, str):
        text = selection.strip().lower()
        if text in KEYWORDS:
            return text
        if text.startswith("last:"):
            n = text.removeprefix("last:").strip()
            if not re.fullmatch(r"[0-9]+", n) or int(n) < 1:
                raise _Invalid("last:N needs a whole number N >= 1, e.g. last:2")
            return f"last:{int(n)}"
        if text[:1] in _BRACKETS:
            if not text.endswith(_BRACKETS[text[0]]):
                raise _Invalid(usage)
            text = text[1:-1]
        parts = [p.strip() for p in text.split(",")]
        if parts == [""]:
            raise _Invalid("selects nothing; select at least one")
        if not all(_INT.fullmatch(p) for p in parts):
            raise _Invalid(usage)
        return tuple(int(p) for p in parts)
    try:
        items = list(selection)
    except TypeError:
        raise _Invalid(usage) from None
    if not items:
        raise _Invalid("selects nothing; select at least one")
    out = []
    for item in items:
        if isinstance(item, Integral) and not isinstance(item, bool):
            out.append(int(item))
        elif isinstance(item, str) and _INT.fullmatch(item.strip()):
            out.append(int(item))
        else:
            raise _Invalid(usage)
    return tuple(out)


def _indices(form: Normalised, count: int | None, *, what: str) -> list[int]:
    if isinstance(form, tuple):
        if count is None and any(i < 0 for i in form):
            raise _Invalid(f"negative indices need the number of {what}s, which is not known here")
        return list(form)
    if count is None:
        raise _Invalid(f"'{form}' needs the number of {what}s, which is not known here; give indices")
    if form == "all":
        return list(range(count))
    n = 1 if form == "final" else int(form.removeprefix("last:"))
    if n > count:
        raise _Invalid(f"last:N needs N in 1..{count} (this model has {count})")
    return list(range(count - n, count))


def _default_label(selection: object, what: str) -> str:
    shown = repr(selection.strip()) if isinstance(selection, str) else repr(selection)
    return f"{what} selection {shown}"
