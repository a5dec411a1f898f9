"""The example notebook runs headless (nbclient, the venv's own kernel) on a store this test writes.

The notebook checks its own plain-xarray grid against attnstore's ``action_to_visual`` and that the
region shares sum to 1, so an error in either path fails the run.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from synthetic import make_spec, write_synthetic_store

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "attention_analysis.ipynb"


def _images(nb) -> list[np.ndarray]:
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))))
    return out


@pytest.mark.parametrize("images", [True, False], ids=["with-images", "no-images"])
def test_notebook_executes_on_a_fresh_store(tmp_path, monkeypatch, images):
    store = tmp_path / "attention.zarr"
    spec = make_spec(num_language=16, num_action=6, num_heads=2, denoise_steps=(0, 9), images=images)
    write_synthetic_store(store, spec, episodes={0: 3, 1: 2})
    monkeypatch.setenv("ATTNSTORE_EXAMPLE_STORE", str(store))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" resolves to this interpreter (jupyter_client swaps a bare "python" for sys.executable)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    texts = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "matches the plain-xarray grid" in texts
    assert "cameras the policy saw: ['image', 'image2']" in texts
    figures = _images(nb)
    assert len(figures) == 3  # grid on image, shares over time, layers
    assert all(f.std() > 5 for f in figures)  # not blank
