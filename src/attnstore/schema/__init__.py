"""The store's schema: the single source of truth for dims, variables, coords, attrs and encoding.

Writer, readers, export/import and the CLI all take names, shapes and codecs from here; nothing else
spells a dimension name or a codec. ``from attnstore import schema as S`` gives every name below:

* :mod:`~attnstore.schema.names`: dimension, variable and coordinate names, fill values;
* :mod:`~attnstore.schema.variables`: the variable table (:data:`VARIABLES`) that create, validate,
  write, open and inspect loop over;
* :mod:`~attnstore.schema.layout` (:class:`TokenLayout`), :mod:`~attnstore.schema.spec`
  (:class:`StoreSpec`, :class:`EpisodeRecord`, root attrs), :mod:`~attnstore.schema.run` (the run attrs),
  :mod:`~attnstore.schema.encoding` (codecs).

An attention store is one Zarr v3 group (``<output_dir>/attention.zarr``) holding

* a flat, appendable ``inference`` axis: one row per (episode, policy inference). Index coordinates
  ``episode``, ``rollout`` (inference number within its episode) and ``env_step`` (the env step, i.e.
  the video frame, at which the policy ran) live on it. ``episode`` is written last for every row and
  is the commit marker: rows whose ``episode`` is still the fill value (-1) were never committed.
* ``attention`` (inference, denoise, layer, head, query, key): the action tokens' attention
  probabilities, one chunk per inference row so that nothing is ever rewritten.
* the token layout of the ``key`` axis as coordinates (``key_kind``, ``key_region``, ``patch_row``,
  ``patch_col``) and, per inference, ``key_valid`` (False for language padding and missing cameras).
* optional per-inference ``images`` (what the policy saw, after its processors), ``actions`` (the
  predicted chunk), ``state`` (the robot state it saw), ``language_token_id``/``language_token_text``
  and ``prefix_attention``.
* a per-episode table on the ``episode_index`` axis (task, success, number of env steps), one row
  per finished episode; an episode with inference rows but no table row did not finish.

Root attrs hold ``{"attnstore": {"schema_version", "format", "spec", "status", "run"}}``.
"""

from attnstore.schema.encoding import (
    DEFAULT_ENCODING,
    ENCODINGS,
    MAX_ABS_ERROR,
    UINT16_SCALE,
    Encoding,
    attention_codecs,
    default_compressors,
)
from attnstore.schema.layout import TokenLayout
from attnstore.schema.names import *  # noqa: F403 - the names are the schema's vocabulary
from attnstore.schema.spec import EpisodeRecord, StoreSpec, denoise_time, read_root_attrs, root_attrs
from attnstore.schema.variables import (
    COMMIT_MARKER,
    VARIABLE,
    VARIABLES,
    Variable,
    batch_variables,
    row_variables,
    stored_variables,
)
from attnstore.schema.run import RunInfo, TaskPlan
