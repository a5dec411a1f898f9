"""store/: the Zarr v3 attention store: create, write (the commit protocol), open, check, inspect, pack, study. Never imports readers, capture, evaluation, legacy or torch."""
