"""Two real Ray nodes (issue #11, must-have 4): a head and a second node started with `ray start`, each in its own
network namespace (tests/netns.py: 198.51.100.1 and .2 on one veth pair), no shared folder for the job's output
(each node its own Ray temp dir, staging folder and datasets cache; the output is s3:// on moto's S3 server run
inside the head's namespace). A 2-worker job (1 CPU per node: one worker per node) driven from the head's namespace
must run its ranks on the two node IPs, each rank's collectives on its own node's interface (GLOO_SOCKET_IFNAME
chosen per worker, distrib_ft/runtime/netif.py), and end with the weights of the same job run on one node.

Skips, with the reason, where namespaces cannot be made (not root, no `ip`, no permission). Every process the test
started is ended by PID (those in its namespaces, then a check that none of its Ray temp dirs' are left); the
namespaces and the veth pair are deleted.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests import netns
from tests.e2e.test_cli import clean_env, live_ray_processes, write_job
from tests.jobs import ROOT, job_dict, set_in
from tests.s3 import TEST_KEYS, moto_s3, s3_env

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # inside the head's namespace: its own port space
BUCKET = "runs"
ADAPTER = "final/adapter_model.safetensors"


def _node_env(endpoint: str, node_dir: Path) -> dict:
    """A node's environment: the S3 variables a node of a real cluster has, and its own caches (no shared folder)."""
    return clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled",
                     RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                     DISTRIB_FT_CACHE=str(node_dir / "cache"), HF_DATASETS_CACHE=str(node_dir / "datasets"),
                     **s3_env(endpoint))


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                        region_name=TEST_KEYS["AWS_DEFAULT_REGION"])


def _ray_start(ns: netns.Namespace, args: list[str], env: dict) -> None:
    r = subprocess.run(ns.exec([str(BIN / "ray"), "start", f"--node-ip-address={ns.ip}", "--num-cpus=1",
                                "--disable-usage-stats", *args]),
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


@pytest.fixture
def two_nodes(tmp_path):
    """Yields (head, worker, S3 endpoint): a 2-node Ray cluster, 1 CPU each, in two namespaces; moto in the head's."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    temp_dirs = [tempfile.mkdtemp(prefix=f"dft-mn-{n}-", dir="/tmp") for n in "hw"]  # short: Ray's socket paths
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [shutil.rmtree(d, ignore_errors=True) for d in temp_dirs])
        head, worker = stack.enter_context(netns.two_namespaces())
        moto = moto_s3(host=head.ip)
        endpoint = head.call(moto.__enter__)  # its server process starts in the head's namespace
        stack.push(moto.__exit__)
        head.call(lambda: _s3_client(endpoint).create_bucket(Bucket=BUCKET))
        _ray_start(head, ["--head", f"--port={GCS_PORT}", f"--dashboard-host={head.ip}",
                          f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={temp_dirs[0]}"],
                   _node_env(endpoint, tmp_path / "head"))
        _ray_start(worker, [f"--address={head.ip}:{GCS_PORT}", f"--temp-dir={temp_dirs[1]}"],
                   _node_env(endpoint, tmp_path / "worker"))
        yield head, worker, endpoint
    # the namespaces' processes were ended by PID on the way out; nothing of this test's Ray may be left
    assert not [p for d in temp_dirs for p in live_ray_processes(d)]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert head.name not in listed and worker.name not in listed


def test_two_nodes_one_worker_each_equal_one_node(tmp_path, tiny_model_dir, two_nodes):
    head, worker, endpoint = two_nodes
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=4, save_steps=2, per_device_train_batch_size=2)
    set_in(raw, "distributed.num_workers", 2)

    # The same job on one node, meanwhile: an embedded Ray in this (the root) namespace, 2 workers, a local folder.
    (tmp_path / "one").mkdir()
    set_in(raw, "training.output_dir", str(tmp_path / "one" / "out"))
    one_node_log = open(tmp_path / "one" / "log", "w+")
    one_node = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", str(write_job(tmp_path / "one", raw))],
                                stdout=one_node_log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    try:
        # Two nodes: the driver on the head node, `distrib-ft train --address` to the head's GCS, output on S3.
        set_in(raw, "training.output_dir", f"s3://{BUCKET}/two-nodes")
        driver_env = {k: v for k, v in _node_env(endpoint, tmp_path / "head").items() if k != "DISTRIB_FT_CACHE"}
        r = subprocess.run(head.exec([sys.executable, "-m", "launcher.cli", "train", str(write_job(tmp_path, raw)),
                                      "--address", f"{head.ip}:{GCS_PORT}"]),
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=driver_env)
        assert r.returncode == 0, r.stderr[-4000:]
        one_node.wait(600)
    finally:
        if one_node.poll() is None:
            one_node.kill()
            one_node.wait()
    one_node_log.seek(0)
    assert one_node.returncode == 0, one_node_log.read()[-4000:]
    one_node_log.close()

    def fetch(key: str) -> bytes:
        return head.call(lambda: _s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"two-nodes/{key}")["Body"].read())

    summary = json.loads(fetch("summary.json"))
    assert summary["world_size"] == 2
    workers = summary["workers"]
    assert {w["node_ip"] for w in workers} == {head.ip, worker.ip}, workers  # one rank on each node
    # each rank's gloo bound to its own node's interface (the two are named differently)
    by_ip = {w["node_ip"]: w for w in workers}
    assert by_ip[head.ip]["gloo_socket_ifname"] == head.ifname and by_ip[worker.ip]["gloo_socket_ifname"] == \
        worker.ifname, workers
    # every rank's part of each checkpoint reached the bucket from its own node, and only from there: the worker
    # node's rank wrote its part into that node's staging folder, which the head node never sees
    keys = head.call(lambda: [o["Key"] for o in _s3_client(endpoint).list_objects_v2(
        Bucket=BUCKET, Prefix="two-nodes/checkpoints/")["Contents"]])
    worker_rank = next(r for r, w in enumerate(workers) if w["node_ip"] == worker.ip)
    for step in (2, 4):
        for rank in (0, 1):
            assert f"two-nodes/checkpoints/step-{step}/rng_rank{rank}.safetensors" in keys, keys
    assert list((tmp_path / "worker").rglob(f"rng_rank{worker_rank}.safetensors"))
    assert not list((tmp_path / "head").rglob(f"rng_rank{worker_rank}.safetensors"))
    (tmp_path / "two.safetensors").write_bytes(fetch(ADAPTER))

    one_summary = json.loads((tmp_path / "one" / "out" / "summary.json").read_text())
    assert one_summary["world_size"] == 2 and len({w["node_ip"] for w in one_summary["workers"]}) == 1
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one" / "out" / ADAPTER)
    assert two.keys() == one.keys() and two
    diff = max(float((two[k].float() - one[k].float()).abs().max()) for k in two)
    assert diff <= 1e-5, diff
    assert any(float(v.abs().max()) > 0 for k, v in two.items() if "lora_B" in k)  # it trained (B starts at 0)
