"""Errors users see as one line (the CLI prints ``attnstore: error: <message>`` and exits 2).

Every message says what is wrong and how to fix it; no traceback reaches a user for these.
"""


class AttnStoreError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class SchemaError(AttnStoreError):
    """A spec, layout or store that does not follow the schema (or another schema version)."""


class StoreError(AttnStoreError):
    """A path that is missing, not a store, or a store that cannot be written as asked."""


class LegacyFormatError(AttnStoreError):
    """A legacy ``.pt`` file that is truncated, garbled or not in the legacy dict layout."""


class CaptureError(AttnStoreError):
    """The policy cannot be captured as asked (wrong policy type, layer out of range, ...)."""


class WriterError(AttnStoreError):
    """The background writer failed (disk full, bad data); raised on the caller's next call."""


class EvalConfigError(AttnStoreError):
    """An ``attnstore eval`` setting that cannot work (bad ``--attention.*`` value, task suite, policy path)."""


class SelectionError(AttnStoreError):
    """A requested slice that is not in the store (episode, env step, layer, denoise step, camera, ...)."""


class StoreDamagedError(StoreError):
    """A chunk of committed rows that is absent, truncated or fails its checksum (the store is damaged)."""
