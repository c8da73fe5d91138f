"""distrib_ft/registry.py on a local folder and on a real S3 API (moto's server, tests/s3.py).

Versions with lineage (parent, data sha256, the job, metrics), ``current`` moving only on promote / rollback, a
refused candidate listed but never current, a promote killed by SIGKILL just before its commit leaving the old
pointer, and the lock: a live holder makes a second one wait or fail, a dead holder's lock (pid gone on this host,
or lease expired) is taken over. The artifacts are real: the tiny model's folder, and a peft LoRA adapter of it.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from distrib_ft import registry as rg
from distrib_ft.runtime import storage
from tests.jobs import ROOT, toy_alpaca, toy_join
from tests.s3 import list_keys, make_bucket, s3_env

BUCKET = "registry-unit"
_made: set[str] = set()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A real peft LoRA adapter of the tiny model, saved as a job's final/ would be."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("run") / "final"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A fresh registry root: a local folder, or a prefix in a bucket of the session's moto server."""
    if request.param == "local":
        return str(tmp_path / "registry")
    endpoint = request.getfixturevalue("s3_endpoint")
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    if BUCKET not in _made:
        make_bucket(endpoint, BUCKET)
        _made.add(BUCKET)
    return f"s3://{BUCKET}/reg-{uuid.uuid4().hex[:8]}"


def _reg(root, **kw) -> rg.Registry:
    return rg.Registry(root, settle=0.2, **kw)


def _verdict(loss: float, code: int = 0) -> dict:
    return {"exit_code": code, "decision": "accepted" if code == 0 else "rejected", "chosen_step": 2, "steps": 2,
            "metrics": {"eval_loss_start": 2.5, "eval_loss": loss,
                        "suites": {"old": {"metric": "nll", "baseline": 2.0, "value": 2.1, "within_budget": True}}}}


def test_add_promote_rollback_and_lineage(root, tiny_model_dir, adapter_dir, tmp_path):
    reg = _reg(root)
    with pytest.raises(rg.RegistryError, match="empty registry"):
        reg.show("v1")
    assert reg.list() == [] and reg.current() is None
    d1, d2 = toy_alpaca(tmp_path / "r1.jsonl", n=8), toy_join(tmp_path / "r2.jsonl", n=8)

    v1 = reg.add(adapter_dir, round="r1", data_files=[d1], job_config={"training": {"learning_rate": 1e-3}},
                 verdict=_verdict(1.5))
    assert (v1.version, v1.round, v1.parent, v1.decision, v1.current) == ("v0001", "r1", None, "candidate", False)
    assert reg.current() is None  # adding never moves the pointer
    assert v1.record["data_files"] == [{"path": str(d1), "sha256": hashlib.sha256(d1.read_bytes()).hexdigest()}]
    assert v1.record["artifact"]["kind"] == "adapter" and "adapter_model.safetensors" in v1.record["artifact"]["files"]
    assert "learning_rate: 0.001" in v1.record["job"]
    assert v1.record["metrics"]["eval_loss"] == 1.5 and v1.record["metrics"]["suites"]["old"]["value"] == 2.1
    copied = storage.as_path(v1.model) / "adapter_model.safetensors"
    assert copied.read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()

    assert reg.promote("v1").current and reg.current().version == "v0001"
    v2 = reg.add(tiny_model_dir, round="r2", data_files=[d2], verdict=_verdict(1.2))
    assert v2.parent == "v0001" and v2.record["artifact"]["kind"] == "full"  # parent: the current version
    assert reg.current().version == "v0001"
    assert reg.promote(2).version == "v0002" and reg.current().version == "v0002"
    assert [(v.version, v.decision, v.current) for v in reg.list()] == [("v0001", "promoted", False),
                                                                        ("v0002", "promoted", True)]
    assert reg.rollback().version == "v0001" and reg.current().version == "v0001"
    with pytest.raises(rg.RegistryError, match="no earlier current version"):
        reg.rollback()
    assert reg.rollback(to="v2").version == "v0002"  # back to a version that was current before
    assert [e["action"] for e in reg.pointer()["log"]] == ["promote", "promote", "rollback", "rollback"]

    v3 = reg.add(adapter_dir, round="r3", verdict=_verdict(3.0, code=3))
    assert v3.parent == "v0002"
    refused = reg.refuse("v3", reason="suite old +40% > budget 10%")
    assert refused.decision == "refused" and not refused.current
    with pytest.raises(rg.RegistryError, match="refused .*--force"):
        reg.promote("v3")
    with pytest.raises(rg.RegistryError, match="never current"):
        reg.rollback(to="v3")
    with pytest.raises(rg.RegistryError, match="no version v0009 .*v0001, v0002, v0003"):
        reg.promote("v9")
    assert reg.current().version == "v0002"
    assert [v.decision for v in reg.list()] == ["promoted", "promoted", "refused"]  # refused stays listed
    forced = reg.promote("v3", force=True, note="operator override")
    assert forced.current and reg.pointer()["log"][-1]["forced"] is True
    assert not (storage.as_path(root) / rg.LOCK).exists()  # every operation released its lock

    with pytest.raises(rg.RegistryError, match="not a model artifact"):
        reg.add(tmp_path, round="r4")
    with pytest.raises(rg.RegistryError, match="data file not found"):
        reg.add(adapter_dir, round="r4", data_files=[tmp_path / "missing.jsonl"])


def test_a_version_without_its_marker_is_not_listed(root, adapter_dir):
    reg = _reg(root)
    reg.add(adapter_dir, round="r1")
    partial = storage.as_path(root) / "versions" / "v0002" / "model" / "adapter_config.json"
    partial.parent.mkdir(parents=True, exist_ok=True) if not storage.is_url(root) else None
    partial.write_text("{}")  # an add that died before version.json
    assert [v.version for v in reg.list()] == ["v0001"]
    assert reg.add(adapter_dir, round="r2").version == "v0003"  # its number is not reused


def test_s3_layout_and_a_final_on_s3(s3_endpoint, monkeypatch, adapter_dir, tmp_path):
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    if BUCKET not in _made:
        make_bucket(s3_endpoint, BUCKET)
        _made.add(BUCKET)
    prefix = f"reg-{uuid.uuid4().hex[:8]}"
    reg = _reg(f"s3://{BUCKET}/{prefix}")
    reg.add(adapter_dir, round="r1")
    reg.promote("v1")
    keys = set(list_keys(s3_endpoint, BUCKET, prefix))
    assert {f"{prefix}/current.json", f"{prefix}/versions/v0001/version.json",
            f"{prefix}/versions/v0001/model/adapter_model.safetensors"} <= keys
    assert not any(k.endswith((rg.LOCK, storage.COMPLETE)) for k in keys)

    final = storage.UrlPath(f"s3://{BUCKET}/{prefix}-run/final")  # a job's final/ on S3: used once marked
    storage.upload_tree(adapter_dir, final)
    with pytest.raises(rg.RegistryError, match="no COMPLETE marker"):
        reg.add(final, round="r2")
    (final / storage.COMPLETE).write_text("complete\n")
    data = storage.UrlPath(f"s3://{BUCKET}/{prefix}-run/train.jsonl")
    data.write_text('{"text": "x"}\n')
    for target in (reg, _reg(tmp_path / "local-registry")):
        v = target.add(final, round="r2", data_files=[str(data)])
        assert v.record["data_files"][0]["sha256"] == hashlib.sha256(b'{"text": "x"}\n').hexdigest()
        got = storage.as_path(v.model) / "adapter_model.safetensors"
        assert got.read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
        assert storage.COMPLETE not in v.record["artifact"]["files"]


_KILLED_PROMOTE = """
import os, signal, sys
from distrib_ft.registry import Registry
reg = Registry(sys.argv[1], settle=0.2)
reg.promote(sys.argv[2], before_commit=lambda record: os.kill(os.getpid(), signal.SIGKILL))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_killed_promote_leaves_the_old_current_and_its_lock_is_taken_over(root, adapter_dir):
    reg = _reg(root, wait=5)
    reg.add(adapter_dir, round="r1")
    reg.add(adapter_dir, round="r2")
    reg.promote("v1")
    before = storage.as_path(root) / rg.POINTER
    pointer = before.read_text()
    r = subprocess.run([sys.executable, "-c", _KILLED_PROMOTE, root, "v2"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert before.read_text() == pointer and reg.current().version == "v0001"
    assert reg.show("v2").decision == "candidate"
    lock = json.loads((storage.as_path(root) / rg.LOCK).read_text())  # the dead holder's claim is still there
    assert lock["host"] == socket.gethostname() and lock["purpose"] == "promote v0002"
    start = time.monotonic()
    with reg.lock("after the crash") as lk:  # its pid is gone on this host: taken over at once, lease or not
        assert lk.took_over["pid"] == lock["pid"] and "is gone" in lk.took_over["reason"]
    assert time.monotonic() - start < 4
    assert reg.promote("v2").current


_HOLDER = """
import sys, time
from distrib_ft.registry import Registry
with Registry(sys.argv[1], settle=0.2).lock("holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_live_holder_makes_the_second_wait_or_fail(root, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, root, "3"], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rg.LockTimeout, match=f"held by pid {holder.pid} on {socket.gethostname()} \\(holder"):
            with _reg(root, wait=0.5).lock():
                pass
        start = time.monotonic()
        with _reg(root, wait=60).lock() as lk:  # waits until the holder releases (its sleep ends)
            assert lk.took_over is None  # released, not taken over
        assert time.monotonic() - start > 1
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_lease_from_another_host_blocks_until_it_expires(root):
    path = storage.as_path(root) / rg.LOCK
    claim = {"token": "x", "pid": 1, "host": "some-other-host", "purpose": "pipeline", "acquired": rg.now()}
    path.parent.mkdir(parents=True, exist_ok=True) if not storage.is_url(root) else None
    path.write_text(json.dumps({**claim, "expires": time.time() + 3600}))
    with pytest.raises(rg.LockTimeout, match="some-other-host"):  # pid 1 elsewhere says nothing: the lease counts
        with _reg(root, wait=0.3).lock():
            pass
    path.write_text(json.dumps({**claim, "expires": time.time() - 1}))
    with _reg(root, wait=0.3).lock() as lk:
        assert lk.took_over["host"] == "some-other-host" and "lease expired" in lk.took_over["reason"]
        assert json.loads(path.read_text())["token"] == lk.token
    assert not path.exists()


def test_the_lease_is_renewed_while_held(root):
    with _reg(root, lease=0.9).lock() as lk:
        first = json.loads((storage.as_path(root) / rg.LOCK).read_text())["expires"]
        time.sleep(1.5)
        claim = json.loads((storage.as_path(root) / rg.LOCK).read_text())
        assert claim["token"] == lk.token and claim["expires"] > first and rg.RegistryLock.stale_reason(claim) is None


def test_contenders_never_hold_the_lock_together(root):
    inside, overlaps, errors = [0], [], []
    guard = threading.Lock()

    def work():
        try:
            for _ in range(2):
                with rg.RegistryLock(storage.as_path(root), settle=0.3, wait=60):
                    with guard:
                        inside[0] += 1
                        overlaps.append(inside[0])
                    time.sleep(0.1)
                    with guard:
                        inside[0] -= 1
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    if not storage.is_url(root):
        os.makedirs(root, exist_ok=True)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(overlaps) == 6 and max(overlaps) == 1, (errors, overlaps)


def test_a_changed_data_file_changes_its_hash(tmp_path):
    f = toy_alpaca(tmp_path / "d.jsonl", n=4)
    h = rg.file_sha256(f)
    assert h == hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_text(f.read_text() + "\n")
    assert rg.file_sha256(f) != h
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a").write_text("1")
    assert len(rg.file_sha256(folder)) == 64


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_version_is_readable_as_the_umask_allows(tmp_path, adapter_dir, mask):
    """An owner-only final/ (mkdtemp 0700, safetensors 0600) is copied with the modes of a plain write.

    Under umask 0022 a deploy service or another user can read the production model: model/ 0755, its files, the
    version's version.json and current.json 0644; under 0077 they stay private (0700 / 0600).
    """
    import shutil
    import stat
    import tempfile
    from pathlib import Path

    final = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copytree(adapter_dir, final, dirs_exist_ok=True)
    final.chmod(0o700)
    assert stat.S_IMODE((final / "adapter_model.safetensors").stat().st_mode) == 0o600  # safetensors' own mode
    old = os.umask(mask)
    try:
        reg = _reg(str(tmp_path / "registry"))
        v = reg.promote(reg.add(final, round="r1").version)
    finally:
        os.umask(old)
    model = Path(v.model)
    folders = [model, *(p for p in model.rglob("*") if p.is_dir())]
    files = [p for p in model.rglob("*") if p.is_file()]
    files += [model.parent / rg.VERSION_FILE, tmp_path / "registry" / rg.POINTER]
    assert "adapter_model.safetensors" in {p.name for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o777 & ~mask}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}
