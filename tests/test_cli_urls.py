"""Every reading command on a store read from a URL (issue 10): ``export-pt``, ``overlay``, ``plot`` and ``view``
against a real S3-compatible server (moto_server on 127.0.0.1, tests/s3server.py).

The real CLI runs in a subprocess, once with the standard environment (``AWS_ENDPOINT_URL`` and the
``AWS_*`` credentials) and once with ``--storage-option`` alone (no ``AWS_*`` variable set); what it writes
must be what the same command writes for the local copy of the store: the same files, the same pixels,
the same tensors, the same Rerun entities. A bad URL, a missing bucket and wrong credentials are one
``attnstore: error:`` line naming the URL, exit 2, nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from attnstore import open_attention
from attnstore.cli import main
from synthetic import make_spec, write_synthetic_store

CLI = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())"]
KEY = "runs/task0/attention.zarr"
# command -> (arguments after the store, with OUT for the output folder; default output folder name or None)
COMMANDS = {
    "export-pt": (["OUT", "--no-progress"], None),
    "overlay": (["--episode", "0", "--all", "--no-progress", "--out", "OUT"], "overlays"),
    "plot": (["--out", "OUT"], "plots"),
    "view": (["--episode", "1", "--layers", "all", "--save", "OUT"], None),
}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    path = tmp_path_factory.mktemp("urls") / KEY
    spec = make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=28, denoise_steps=(0, 9))
    write_synthetic_store(path, spec, episodes={0: 3, 1: 2, 2: 2}, seed=5)
    return path


@pytest.fixture(scope="module")
def remote(s3, local):
    bucket = s3.make_bucket("attnstore-urls")
    s3.filesystem().put(str(local), f"{bucket}/{KEY}", recursive=True)
    url = f"s3://{bucket}/{KEY}"
    xr.testing.assert_identical(open_attention(url, storage_options=s3.storage_options).load(),
                                open_attention(local).load())  # the upload is the same store
    return url


@pytest.fixture(scope="module")
def expected(local, tmp_path_factory):
    """What each command writes for the local store: relative path -> decoded contents."""
    out = {}
    for command, (args, _) in COMMANDS.items():
        folder = tmp_path_factory.mktemp(f"local-{command}")
        assert main([command, str(local), *argv(args, folder)]) == 0
        out[command] = decoded(folder)
        assert out[command], f"{command} wrote nothing for the local store"
    return out


def argv(args: list[str], out: Path) -> list[str]:
    return [str(out) if a == "OUT" else a for a in args]


def decoded(folder: Path) -> dict[str, object]:
    """Every file under ``folder`` by relative path, decoded: PNG pixels, .pt dicts, .rrd entities."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.suffix == ".png":
            from PIL import Image

            files[name] = np.asarray(Image.open(path))
        elif path.suffix == ".pt":
            import torch

            files[name] = torch.load(path, map_location="cpu", weights_only=False)
        elif path.suffix == ".rrd":
            from test_view import read_rrd

            entities = read_rrd(path)
            entities.pop("/__properties", None)  # recording id and start time: differ between any two runs
            files[name] = entities
        else:
            files[name] = path.read_bytes()
    return files


def assert_same(got, want, where: str = "") -> None:
    """Recursive equality of decoded files (arrays and tensors element for element)."""
    import torch

    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for key in want:
            assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, err_msg=where)
    else:
        assert got == want, where


def env_without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def options_of(s3) -> list[str]:
    return [f"--storage-option=endpoint_url={s3.endpoint}", "--storage-option=key=testing",
            "--storage-option=secret=testing"]


# ---- every command reads the URL and writes what it writes for the local store -------------------------
@pytest.mark.parametrize("how", ["environment", "storage-option"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_url_gives_the_local_output(s3, remote, expected, command, how, tmp_path):
    args, default_folder = COMMANDS[command]
    if how == "environment":
        env, extra = s3.env(), []
        if default_folder:  # and no --out: the default is ./<run>_<folder> in the current folder
            args = args[: args.index("--out")]
    else:
        env, extra = env_without_aws(), options_of(s3)
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([*CLI, command, remote, *argv(args, tmp_path / "out"), *extra], capture_output=True,
                         text=True, env=env, cwd=work, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "out" if "OUT" in args else work / f"task0_{default_folder}"
    assert folder.is_dir(), (sorted(p.name for p in work.iterdir()), out.stdout)
    assert_same(decoded(folder), expected[command], command)
    if folder.parent == work:
        assert str(Path("task0_" + default_folder)) in out.stdout  # the command says where it wrote


def test_help_names_the_url_default(capsys):
    for command, folder in (("overlay", "overlays"), ("plot", "plots")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert f"./<run>_{folder}" in text and "AWS_ENDPOINT_URL" in text and "--storage-option" in text


# ---- bad URLs, a missing bucket, wrong credentials: one line, exit 2 ------------------------------------
@pytest.fixture(scope="module")
def locked():
    """A second server that authenticates every request (unknown keys are refused)."""
    pytest.importorskip("moto")
    from s3server import start_server, stop_server

    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        server = start_server()
    finally:
        os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT")
    yield server
    stop_server(server)


def one_line_error(capsys, argv_: list[str]) -> str:
    assert main(argv_) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnstore: error: "), err
    assert "Traceback" not in captured.err
    return err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_urls_are_one_line_errors(s3, remote, locked, command, tmp_path, capsys):
    args, _ = COMMANDS[command]
    out = tmp_path / "out"
    rest = argv(args, out)
    cases = [  # (url, storage options, words the line must hold)
        ("nosuchfs://bucket/x/attention.zarr", [], ["nosuchfs://bucket/x/attention.zarr", "Protocol not known"]),
        ("s3://", options_of(s3), ["s3://"]),
        ("s3://no-such-bucket-here/x/attention.zarr", options_of(s3),
         ["s3://no-such-bucket-here/x/attention.zarr", "does not exist"]),
        (remote.replace("task0", "task9"), options_of(s3), [remote.replace("task0", "task9"), "does not exist"]),
        (remote, [f"--storage-option=endpoint_url={locked.endpoint}", "--storage-option=key=wrong",
                  "--storage-option=secret=wrong"], [remote, "access denied", "credentials"]),
        (remote, ["--storage-option", "oops"], ["--storage-option 'oops'", "KEY=VALUE"]),
    ]
    for url, options, words in cases:
        err = one_line_error(capsys, [command, url, *rest, *options])
        for word in words:
            assert word in err, (url, err)
    assert not out.exists() or not any(out.rglob("*")), "nothing written"


def test_storage_options_for_a_local_path_are_refused(local, tmp_path, capsys):
    err = one_line_error(capsys, ["plot", str(local), "--out", str(tmp_path), "--storage-option", "anon=true"])
    assert "storage options were given for the local path" in err


def test_file_and_memory_urls(local, expected, tmp_path):
    """``file://`` is the local store (its default output next to it); ``memory://`` is fsspec's in-process store."""
    assert main(["plot", f"file://{local}"]) == 0
    assert_same(decoded(local.parent / "plots"), expected["plot"], "plot file://")
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/cli-urls/task0/attention.zarr", recursive=True)
    try:
        assert main(["overlay", "memory://cli-urls/task0/attention.zarr", *argv(COMMANDS["overlay"][0], tmp_path)]) == 0
    finally:
        fs.rm("/cli-urls", recursive=True)
    assert_same(decoded(tmp_path), expected["overlay"], "overlay memory://")
