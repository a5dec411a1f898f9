"""``--attention.*``: what ``attnstore eval`` captures, as one typed dataclass (lerobot style).

Values arrive as draccus strings (``--attention.layers=[16,17]``) and are normalised once in
``__post_init__`` into what :class:`attnstore.capture.recorder.AttentionRecorder` takes, with the
one selection grammar of :mod:`attnstore.selection` (the recorder parses with it too). Ranges that
depend on the model (layer 17 of an 18-layer expert) are checked by the runner with the same
module's :func:`~attnstore.selection.parse_layers`, still before any simulation runs.
"""

from __future__ import annotations

import re

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attnstore import selection as sel
from attnstore.errors import EvalConfigError
from attnstore.schema import ENCODINGS
from attnstore.store.priority import check_nice

PREFIX = "--attention."
Selection = sel.Normalised  # a keyword ("all", "final", "last:2") or explicit indices
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0", "none", "null", "")


@dataclass
class AttentionConfig:
    """Capture settings of one evaluation (``--attention.<field>``).

    The selection fields keep the text the user gave; ``__post_init__`` validates it and the
    ``*_selection`` properties give the normalised form the recorder takes.

    >>> cfg = AttentionConfig(layers="[16, 17]", denoise_steps="final", prefix="false")
    >>> cfg.layer_selection, cfg.denoise_selection, cfg.prefix_selection
    ((16, 17), 'final', False)
    >>> AttentionConfig(prefix="last:1").prefix_selection
    'last:1'
    """

    layers: str = "last:2"  # last:N | all | final | [16,17] (negative indices count from the end)
    denoise_steps: str = "all"  # all | final | last:N | [0,9]
    # episode indices to record (lerobot's numbering): [0,3] | 0,3 | all; None = all. A list after parsing
    episodes: str | list[int] | None = None
    prefix: str = "false"  # VLM prefix self-attention: false | true (same layers) | last:N | all | [0,1]
    images: bool = True  # store the images the policy saw
    actions: bool = True  # store the predicted action chunks
    encoding: str = "portable"  # portable | compact | analysis | float32 (schema/encoding.py); uint16 = portable
    summary: bool = True  # per-layer summaries of every layer (capture/summary.py), whatever ``layers`` keeps
    # nice value (0..19) of the writer's encoding threads, so they yield the CPU to the policy (Linux;
    # store/priority.py says why it is not the default); None = the process's own
    writer_nice: int | None = None
    overwrite: bool = False  # replace an existing attention store at the same path
    store: Path | None = None  # default: <output_dir>/attention.zarr

    def __post_init__(self) -> None:
        self.layer_selection  # noqa: B018 -- parse now so a typo fails before anything runs
        self.denoise_selection  # noqa: B018
        self.prefix_selection  # noqa: B018
        if self.encoding not in ENCODINGS:
            raise EvalConfigError(
                f"--attention.encoding={self.encoding}: choose one of {', '.join(ENCODINGS)}"
            )
        try:
            check_nice(self.writer_nice)
        except ValueError as exc:
            raise EvalConfigError(f"--attention.writer_nice={self.writer_nice}: {exc}") from None
        self.episodes = sel.parse_episodes(
            self.episodes, error=EvalConfigError, label=f"--attention.episodes={self.episodes}"
        )
        if self.store is not None:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(self.store)) and not str(self.store).startswith("file://"):
                raise EvalConfigError(
                    f"--attention.store={self.store}: an evaluation writes to a local or shared filesystem path "
                    f"(object stores have no atomic rename or lock, which keep every committed inference readable "
                    f"after a kill); write locally, then upload with 'attnstore pack STORE {self.store}'"
                )
            self.store = Path(str(self.store).removeprefix("file://"))
            if self.store.suffix != ".zarr":
                raise EvalConfigError(
                    f"--attention.store={self.store}: name the store folder '*.zarr' (e.g. out/attention.zarr)"
                )

    @property
    def layer_selection(self) -> Selection:
        return parse_selection(self.layers, "layers")

    @property
    def denoise_selection(self) -> Selection:
        return parse_selection(self.denoise_steps, "denoise_steps")

    @property
    def prefix_selection(self) -> bool | Selection:
        return parse_prefix(self.prefix)

    def store_path(self, output_dir: str | Path) -> Path:
        """Where the store goes: ``--attention.store`` or ``<output_dir>/attention.zarr``."""
        return self.store if self.store is not None else Path(output_dir) / "attention.zarr"

    def records(self, episode: int) -> bool:
        """Whether ``episode`` (lerobot's episode index) is recorded.

        >>> AttentionConfig(episodes=[0, 3]).records(3), AttentionConfig(episodes=[0, 3]).records(1)
        (True, False)
        """
        return self.episodes is None or episode in self.episodes


def parse_selection(value: sel.Selection, name: str) -> Selection:
    """``--attention.<name>``'s selection in the normalised form of :func:`attnstore.selection.normalise`.

    >>> parse_selection("[16,17]", "layers"), parse_selection("16,17", "layers"), parse_selection("-1", "layers")
    ((16, 17), (16, 17), (-1,))
    >>> parse_selection(" Last:2 ", "layers"), parse_selection("final", "denoise_steps")
    ('last:2', 'final')
    >>> parse_selection("first", "denoise_steps")
    Traceback (most recent call last):
    ...
    attnstore.errors.EvalConfigError: --attention.denoise_steps=first: use all, last:N, final or indices like [0,9] or -1 (negative counts from the end)
    """
    example = "[0,9]" if name == "denoise_steps" else "[16,17]"
    return sel.normalise(value, example=example, error=EvalConfigError, label=f"{PREFIX}{name}={value}")


def parse_prefix(value: str | bool | Sequence[int]) -> bool | Selection:
    """``--attention.prefix``: false, true (the same layers as ``--attention.layers``) or VLM layers.

    ``1``/``0`` read as true/false (yaml's booleans); a single VLM layer 0 or 1 is ``[0]``/``[1]``.

    >>> parse_prefix("true"), parse_prefix("False"), parse_prefix("[0, 1]"), parse_prefix("all"), parse_prefix("[1]")
    (True, False, (0, 1), 'all', (1,))
    """
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        return value.strip().lower() in _TRUE
    return parse_selection(value, "prefix")


def split_attention_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--attention.*`` arguments from the ones for lerobot-eval (order kept).

    >>> split_attention_args(["--env.type=libero", "--attention.layers=all", "--attention.images", "false"])
    (['--attention.layers=all', '--attention.images=false'], ['--env.type=libero'])
    """
    ours: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(PREFIX):
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                arg = f"{arg}={args[i + 1]}"  # "--attention.x value" form
                i += 1
            ours.append(arg)
        else:
            rest.append(arg)
        i += 1
    return ours, rest


def parse_attention_args(args: Sequence[str]) -> AttentionConfig:
    """Build the config from ``--attention.key=value`` arguments with draccus (as lerobot parses its own).

    >>> parse_attention_args(["--attention.layers=[16,17]", "--attention.overwrite=true"]).layer_selection
    (16, 17)
    >>> parse_attention_args(["--attention.colour=red"])
    Traceback (most recent call last):
    ...
    attnstore.errors.EvalConfigError: --attention.*: unrecognized arguments: --attention.colour=red (see attnstore eval --help)
    """
    import draccus

    try:
        return draccus.parse(_Args, args=list(args), exit_on_error=False).attention
    except draccus.utils.DraccusException as exc:
        cause = exc
        while cause is not None and not isinstance(cause, EvalConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        message = " ".join(str(exc).split())
        raise EvalConfigError(f"--attention.*: {message} (see attnstore eval --help)") from None


@dataclass
class _Args:
    """The draccus root: ``--attention.<field>`` maps to ``_Args.attention.<field>``."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
