"""launcher/cli.py when the reader of stdout closes it early (``distrib-ft registry list REG --json | head -3``).

The CLI runs as a real process writing to a real pipe whose reader (``head -c 0``, a process) has exited: it stops
quietly with exit code 141 (128 + SIGPIPE) and nothing on stderr, as the Python docs advise
(https://docs.python.org/3/library/signal.html#note-on-sigpipe). A reader that stays gets the whole output (exit 0),
and a BrokenPipeError that is not stdout's is still reported as a failure.
"""

import json
import os
import subprocess
import sys

import pytest

from distrib_ft import registry as rg
from launcher import cli
from tests.jobs import ROOT


@pytest.fixture(scope="module")
def registry_root(tiny_model_dir, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("reg") / "registry")
    reg = rg.Registry(root)
    for r in ("r1", "r2"):
        reg.add(tiny_model_dir, round=r)
    return root


def _list(root: str, stdout) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", "registry", "list", root, "--json"], cwd=ROOT,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=300)


def test_a_reader_that_closed_the_pipe_stops_the_cli_quietly_with_141(registry_root):
    r, w = os.pipe()
    head = subprocess.run(["head", "-c", "0"], stdin=r, timeout=60)  # a reader that stops before reading
    assert head.returncode == 0
    os.close(r)  # the last read end: the pipe has no reader now
    try:
        done = _list(registry_root, w)
    finally:
        os.close(w)
    assert (done.returncode, done.stderr.decode()) == (cli.EXIT_PIPE, "")


def test_a_reader_that_stays_gets_everything(registry_root):
    done = _list(registry_root, subprocess.PIPE)
    assert (done.returncode, done.stderr.decode()) == (0, "")
    assert [v["version"] for v in json.loads(done.stdout)] == ["v0001", "v0002"]


def test_a_broken_pipe_elsewhere_is_still_a_failure(monkeypatch, capfd, tmp_path):
    def cmd_status(args):  # e.g. a socket to a Ray node that closed: not the reader of stdout
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_status", cmd_status)
    assert cli.main(["status", str(tmp_path)]) == cli.EXIT_FAILED
    assert "distrib-ft: the job failed: BrokenPipeError" in capfd.readouterr().err
