"""Session fixtures shared by test modules (real services only)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto_server on 127.0.0.1), with credentials set for this process."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import CREDENTIALS, start_server, stop_server

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
