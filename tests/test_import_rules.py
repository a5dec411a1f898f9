"""The architecture's import rules, checked on every import statement of the package (also those inside
functions): capture -> store -> readers, with legacy, evaluation and cli on top.

* schema imports nothing of attnstore but errors (and itself);
* store never imports readers, capture, evaluation, legacy, cli, nor torch / lerobot;
* readers never import capture, evaluation, legacy, nor torch / lerobot / transformers (model code);
* capture never reads back: no readers, no store.open.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attnstore

PACKAGE = Path(attnstore.__file__).parent
MODEL_CODE = ("torch", "lerobot", "transformers")

RULES: dict[str, tuple[str, ...]] = {
    "attnstore.schema": ("attnstore.store", "attnstore.readers", "attnstore.capture", "attnstore.evaluation",
                         "attnstore.legacy", "attnstore.cli", *MODEL_CODE),
    "attnstore.store": ("attnstore.readers", "attnstore.capture", "attnstore.evaluation", "attnstore.legacy",
                        "attnstore.cli", *MODEL_CODE),
    "attnstore.readers": ("attnstore.capture", "attnstore.evaluation", "attnstore.legacy", *MODEL_CODE),
    "attnstore.capture": ("attnstore.readers", "attnstore.store.open", "attnstore.legacy", "attnstore.evaluation"),
}


def module_name(path: Path) -> str:
    parts = ["attnstore", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = (name or module_name(path)).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from attnstore import readers`
    return found


def violates(imported: str, forbidden: str) -> bool:
    return imported == forbidden or imported.startswith(forbidden + ".")


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_the_whole_package():
    names = {module_name(p) for p in SOURCES}
    assert {"attnstore.schema.variables", "attnstore.store.writer", "attnstore.readers.regions",
            "attnstore.capture.recorder"} <= names


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_nothing_forbidden(layer):
    bad = []
    for path in SOURCES:
        name = module_name(path)
        if not violates(name, layer):
            continue
        for imported in sorted(imports_of(path)):
            for forbidden in RULES[layer]:
                if violates(imported, forbidden):
                    bad.append(f"{name} imports {imported} (rule: {layer} never imports {forbidden})")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_forbidden_import(tmp_path):
    # the rule check itself can fail: a function-level import inside store/ is found
    fake = tmp_path / "_rule_probe.py"
    fake.write_text("def f():\n    from ..readers import region_shares\n    import torch\n")
    found = imports_of(fake, "attnstore.store._rule_probe")
    assert any(violates(i, "attnstore.readers") for i in found)
    assert any(violates(i, "torch") for i in found)


def test_writing_and_reading_a_store_loads_no_model_code(tmp_path):
    """At run time too: the store and the readers work in a process where torch never gets imported."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import synthetic as syn
from attnstore import open_attention
from attnstore.readers import region_shares, entropy
spec = syn.make_spec(num_language=12, num_action=4, grid=4, num_heads=2, image_size=16)
syn.write_synthetic_store({str(tmp_path / "s.zarr")!r}, spec)
ds = open_attention({str(tmp_path / "s.zarr")!r})
region_shares(ds).compute(); entropy(ds).compute()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {MODEL_CODE!r})
print("LOADED", loaded)
assert not loaded, loaded
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
