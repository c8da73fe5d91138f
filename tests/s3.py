"""A real S3 API for tests: moto's server process (``python -m moto.server``) on 127.0.0.1 at a free port.

``with moto_s3() as endpoint:`` starts the server in its own process group, waits until it answers, yields its
endpoint URL ("http://127.0.0.1:PORT") and ends it by its PID on exit. It sets nothing global: a test passes
``s3_env(endpoint)`` to the processes it starts (or sets it with ``monkeypatch``), which are the standard AWS
variables pyarrow.fs.S3FileSystem and boto3 read (https://docs.getmoto.org/en/latest/docs/server_mode.html).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

# moto accepts any keys; these are the standard variables, so pyarrow, boto3 and Ray all read the same ones.
TEST_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment variables that point S3 clients (pyarrow, boto3) at ``endpoint`` with moto's test keys."""
    return {**TEST_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_s3(host: str = "127.0.0.1", timeout: float = 60.0) -> Iterator[str]:
    """Run moto's S3 server on ``host`` at a free port; yield its endpoint URL; end it by PID afterwards."""
    port = _free_port(host)
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(TEST_KEYS)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto's server exited with {proc.returncode}; see {log.name}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not answer on {endpoint} in {timeout:.0f}s; "
                                       f"see {log.name}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the server at ``endpoint`` (boto3, moto's test keys)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_KEYS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                 region_name=TEST_KEYS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key in ``bucket`` under ``prefix`` (boto3, paginated)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                          region_name=TEST_KEYS["AWS_DEFAULT_REGION"])
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
