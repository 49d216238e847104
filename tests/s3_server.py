"""An S3-compatible server for tests: moto in server mode on 127.0.0.1, reached through s3fs.

The server runs in its own process (a real HTTP S3 protocol, nothing patched in the client), on a
port the OS picks. Clients find it only through fsspec's own configuration — `fsspec.config.conf`
in this process and `FSSPEC_S3_*` variables for subprocesses — with dummy credentials.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import fsspec
import pytest

_SERVER = """
import sys, time
import logging
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test session closes our stdin
"""
BUCKET = "catalog-tests"


@pytest.fixture(scope="session")
def s3_endpoint():
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    line = server.stdout.readline()
    if not line.strip().isdigit():
        server.kill()
        pytest.fail(f"moto server did not start (printed {line!r}); is moto[server] installed?")
    yield f"http://127.0.0.1:{int(line)}"
    server.stdin.close()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture()
def s3_root(s3_endpoint, monkeypatch) -> str:
    """A fresh, empty `s3://` catalog root on the test server."""
    settings = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    monkeypatch.setitem(fsspec.config.conf, "s3", settings)
    for key, value in settings.items():
        monkeypatch.setenv(f"FSSPEC_S3_{key.upper()}", value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = fsspec.filesystem("s3")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"
