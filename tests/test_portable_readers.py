"""The default (``portable``) store is read by every Zarr v3 reader without attnstore or extra packages.

Each reader reads the attention of a store written by attnstore's real writer and must agree with
``open_attention`` within 1e-6 (they decode the same uint16 k as k / 65535):

* zarr-python 3.1.x + xarray on Python 3.11 (the newest zarr that Python gets), in a venv cached under
  ``build/py311-readers`` (made on first use from the package registry; skipped when that is impossible);
* zarr-python 3.4 (this venv) with ``cast_value_rs`` made unimportable, through plain ``xr.open_zarr``;
* tensorstore (``zarr3`` driver) and the ``zarrs`` codec pipeline (strict: no fallback to Python codecs).

Stores: a real capture of the tiny random-weight Pi0.5 by the real recorder (``lerobot`` marker), and a
synthetic one (tests/synthetic.py) for machines without lerobot. The ``compact`` store's reader matrix is
checked too: zarr-python with ``attnstore/store/codecs.py`` loaded (also 3.1 on Python 3.11), and neither
tensorstore nor zarrs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attnstore import open_attention
from attnstore import schema as S
from synthetic import make_spec, write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
PY311_VENV = Path(os.environ.get("ATTNSTORE_PY311_READERS", ROOT / "build" / "py311-readers"))
PY311_ZARR = "zarr>=3.1,<3.2"
CODECS_PY = ROOT / "src" / "attnstore" / "store" / "codecs.py"
TOLERANCE = 1e-6

# A reader script: prints the attention as a .npy file. Loads attnstore's codec module by path when asked
# (the compact encoding), never attnstore itself.
READ_WITH_XARRAY = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np, xarray as xr, zarr
    store, out, codecs = sys.argv[1], sys.argv[2], sys.argv[3]
    if codecs != "-":
        spec = importlib.util.spec_from_file_location("attnstore_codecs", codecs)
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    ds = xr.open_zarr(store)
    att = ds["attention"]
    assert "attnstore" in ds.attrs, sorted(ds.attrs)
    np.save(out, att.values)
    print(zarr.__version__, att.dtype)
    """
)

BLOCK_CAST_VALUE_RS = textwrap.dedent(
    """
    import sys
    class _Block:  # as if cast-value-rs were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "cast_value_rs" or name.startswith("cast_value_rs."):
                raise ModuleNotFoundError("No module named 'cast_value_rs' (blocked)", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import cast_value_rs  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("cast_value_rs still importable")
    """
)


# ---- stores ------------------------------------------------------------------------------------------
def _tiny_capture(path: Path, encoding: str, inferences: int = 3) -> Path:
    """A store written by the real recorder from the tiny random-weight Pi0.5 (one episode per inference)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("lerobot")
    from attnstore.capture import AttentionRecorder, find_tokenizer, load_policy, make_tiny_policy
    from attnstore.capture.tiny import example_model_batch
    from attnstore.store.writer import AttentionWriter

    ckpt = path.parent / "tiny_pi05"
    if not ckpt.exists():
        make_tiny_policy(ckpt, seed=0)
    policy, pre, _ = load_policy(ckpt)
    with AttentionWriter(path) as writer, AttentionRecorder(
        policy, writer, layers="last:2", tokenizer=find_tokenizer(pre), encoding=encoding
    ):
        for i in range(inferences):
            policy.reset()
            torch.manual_seed(i)
            with torch.no_grad():
                policy.select_action(example_model_batch(1, seed=i))
    return path


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("portable") / "attention.zarr"
    spec = make_spec(num_language=24, num_action=10, grid=8, num_heads=2, image_size=32, prefix_layers=(1,))
    write_synthetic_store(path, spec, {0: 3, 1: 2})
    return path


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return _tiny_capture(tmp_path_factory.mktemp("tiny") / "attention.zarr", "portable")


@pytest.fixture(params=["synthetic", pytest.param("tiny", marks=pytest.mark.lerobot)])
def store(request) -> Path:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="module")
def compact_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compact") / "attention.zarr"
    spec = make_spec(encoding="compact", num_language=24, num_action=10, grid=8, num_heads=2, image_size=32)
    write_synthetic_store(path, spec, {0: 2})
    return path


def expected(path: Path) -> np.ndarray:
    return open_attention(path)[S.ATTENTION].values


# ---- the Python 3.11 venv ----------------------------------------------------------------------------
def _python311() -> str | None:
    for name in ("python3.11", "python3"):
        exe = shutil.which(name)
        if exe and subprocess.run([exe, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 11))"]).returncode == 0:
            return exe
    return None


@pytest.fixture(scope="session")
def py311() -> Path:
    """python of a Python 3.11 venv with zarr 3.1.x + xarray (made once, reused)."""
    python = PY311_VENV / "bin" / "python"
    check = [str(python), "-c", "import zarr, xarray; assert zarr.__version__.startswith('3.1.'), zarr.__version__"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    base = _python311()
    if base is None:
        pytest.skip("no Python 3.11 on this machine for the zarr 3.1 reader")
    shutil.rmtree(PY311_VENV, ignore_errors=True)
    PY311_VENV.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([base, "-m", "venv", str(PY311_VENV)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([str(python), "-m", "pip", "install", "-q", PY311_ZARR, "xarray"],
                              capture_output=True, text=True, timeout=600)
    if made.returncode != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        shutil.rmtree(PY311_VENV, ignore_errors=True)
        pytest.skip(f"cannot build the Python 3.11 reader venv: {made.stderr.strip()[-300:]}")
    return python


def _run_reader(python: Path | str, store: Path, tmp_path: Path, *, codecs: Path | None = None,
                prelude: str = "") -> np.ndarray:
    script = tmp_path / "read.py"
    script.write_text(prelude + READ_WITH_XARRAY)
    out = tmp_path / "attention.npy"
    done = subprocess.run([str(python), str(script), str(store), str(out), str(codecs or "-")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out)


# ---- the readers -------------------------------------------------------------------------------------
def test_zarr_3_1_on_python_3_11_reads_the_default_store(store, py311, tmp_path):
    got = _run_reader(py311, store, tmp_path)
    want = expected(store)
    assert got.dtype == np.float64  # xarray's CF decoding (the JSON scale_factor is a float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_zarr_3_4_without_cast_value_rs_reads_the_default_store(store, tmp_path):
    got = _run_reader(sys.executable, store, tmp_path, prelude=BLOCK_CAST_VALUE_RS)
    np.testing.assert_allclose(got, expected(store), rtol=0, atol=TOLERANCE)


def test_tensorstore_reads_the_default_store(store):
    ts = pytest.importorskip("tensorstore")
    meta = json.loads((store / S.ATTENTION / "zarr.json").read_text())
    scale = meta["attributes"]["scale_factor"]
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / S.ATTENTION)}}).result()
    raw = arr.read().result()
    assert raw.dtype == np.uint16
    np.testing.assert_allclose(raw * scale, expected(store), rtol=0, atol=TOLERANCE)


def test_zarrs_pipeline_reads_the_default_store(store):
    pytest.importorskip("zarrs")
    import zarr

    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        arr = zarr.open_array(str(store / S.ATTENTION), mode="r")
        assert type(arr.async_array.codec_pipeline).__module__.startswith("zarrs")
        raw = arr[...]
    scale = arr.attrs["scale_factor"]
    np.testing.assert_allclose(raw * scale, expected(store), rtol=0, atol=TOLERANCE)


def test_default_store_metadata_is_plain_zarr_v3(synthetic_store):
    meta = json.loads((synthetic_store / S.ATTENTION / "zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["fill_value"] == 0
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]  # all in the v3 spec
    assert meta["attributes"]["scale_factor"] == 1 / 65535 and meta["attributes"]["add_offset"] == 0
    assert "_FillValue" not in meta["attributes"]  # xarray would mask real zeros (masked keys) as NaN
    root = json.loads((synthetic_store / "zarr.json").read_text())
    assert root["attributes"][S.ROOT_ATTR]["schema_version"] == S.SCHEMA_VERSION == 2


# ---- the compact encoding's reader matrix -------------------------------------------------------------
def test_compact_store_needs_attnstores_codec(compact_store, py311, tmp_path):
    """zarr-python reads it once codecs.py is loaded (3.1 on Python 3.11 too); tensorstore and zarrs cannot."""
    want = expected(compact_store)
    np.testing.assert_allclose(_run_reader(py311, compact_store, tmp_path, codecs=CODECS_PY), want,
                               rtol=0, atol=TOLERANCE)
    ts = pytest.importorskip("tensorstore")
    with pytest.raises(ValueError, match="attnstore.denoise_predict"):
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(compact_store / S.ATTENTION)}}).result()
    pytest.importorskip("zarrs")
    import zarr

    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        with pytest.raises(Exception):
            zarr.open_array(str(compact_store / S.ATTENTION), mode="r")[...]
