"""store/: the Zarr v3 attention store: writer, legacy .pt export/import, inspect. Never imports capture."""
