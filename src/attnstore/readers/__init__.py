"""readers/: lazy xarray views of a store and the analyses on them. Never imports model code."""
