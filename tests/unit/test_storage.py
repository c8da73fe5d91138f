"""distrib_ft/runtime/storage.py against a real S3 API (moto's server, tests/s3.py) and a local folder.

Checkpoint listing by COMPLETE markers, the skipped-incomplete line, staging folders and their URL, upload and
download of a folder, the verdict on a URL, and the shared-output_dir probe's message.
"""

import json
import uuid

import pytest

from distrib_ft.runtime import checkpoint as ckpt
from distrib_ft.runtime import storage
from distrib_ft.runtime import verdict as vd
from tests.s3 import list_keys, make_bucket, s3_env

BUCKET = "storage-unit"


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """The AWS variables of the session's moto server, a bucket, and a fresh prefix; staging under tmp_path."""
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DISTRIB_FT_STAGING", str(tmp_path / "staging"))
    if BUCKET not in _made:
        make_bucket(s3_endpoint, BUCKET)
        _made.add(BUCKET)
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    return s3_endpoint, f"s3://{BUCKET}/{prefix}", prefix


_made: set[str] = set()


def test_as_path_kinds(tmp_path):
    assert storage.as_path(f"file://{tmp_path}") == tmp_path
    assert storage.as_path(str(tmp_path)) == tmp_path
    u = storage.as_path("s3://b/run/")
    assert isinstance(u, storage.UrlPath) and str(u) == "s3://b/run"
    assert str(u / "checkpoints" / "step-2") == "s3://b/run/checkpoints/step-2"
    assert (u / "x").parent == u and (u / "final").name == "final"
    assert not storage.is_url(f"file://{tmp_path}") and storage.is_url("gs://b/x") and storage.is_url("hdfs://h:1/x")


def test_urlpath_on_s3(s3):
    endpoint, url, prefix = s3
    u = storage.UrlPath(url)
    assert not u.exists() and not u.is_dir()
    (u / "a" / "b.txt").write_text("hello")
    assert (u / "a" / "b.txt").is_file() and (u / "a").is_dir() and u.is_dir()
    assert (u / "a" / "b.txt").read_text() == "hello"
    assert [p.name for p in u.iterdir()] == ["a"]
    assert u.files() == {"a/b.txt": 5}
    (u / "a" / storage.COMPLETE).write_text("1\n")
    (u / "a").rmtree()
    assert not (u / "a").exists()
    assert [k for k in list_keys(endpoint, BUCKET, prefix) if not k.endswith("/")] == []  # pyarrow keeps "run/"
    with pytest.raises(FileNotFoundError, match="no such object"):
        (u / "missing.txt").read_text()


def test_upload_then_download_only_what_differs(s3, tmp_path):
    endpoint, url, prefix = s3
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "r.txt").write_text("rank")
    (src / storage.COMPLETE).write_text("1\n")  # never uploaded by upload_tree: rank 0 writes it last
    (src / ".tmp.part").write_text("temp")
    assert storage.upload_tree(src, storage.UrlPath(url)) == 2
    assert sorted(list_keys(endpoint, BUCKET, prefix)) == [f"{prefix}/sub/r.txt", f"{prefix}/w.bin"]
    dst = tmp_path / "dst"
    assert storage.download_tree(storage.UrlPath(url), dst) == 2
    assert (dst / "w.bin").read_bytes() == b"x" * 1000 and (dst / "sub" / "r.txt").read_text() == "rank"
    (dst / "w.bin").write_bytes(b"short")  # a file cut short is downloaded again; the others are kept
    assert storage.download_tree(storage.UrlPath(url), dst) == 1
    assert (dst / "w.bin").read_bytes() == b"x" * 1000


def test_checkpoints_on_a_url_count_only_with_their_marker(s3):
    _, url, _ = s3
    u = storage.UrlPath(url)
    for step in (2, 4, 6):
        (u / "checkpoints" / f"step-{step}" / "mp_rank_00_model_states.pt").write_text("w")
    for step in (2, 4):
        (u / "checkpoints" / f"step-{step}" / ckpt.COMPLETE).write_text(f"{step}\n")
    assert [p.name for p in ckpt.complete_checkpoints(url)] == ["step-2", "step-4"]
    said = []
    latest = ckpt.latest_checkpoint(url, say=said.append)
    assert latest == u / "checkpoints" / "step-4"
    assert said == ["checkpoints/step-6 has no COMPLETE marker (an interrupted upload); resuming from step-4"]
    # the staging folder names its URL: the same answers from it
    staging = storage.local(url)
    assert storage.remote(staging) == u and storage.root(staging) == u
    assert [p.name for p in ckpt.complete_checkpoints(staging)] == ["step-2", "step-4"]
    assert storage.public(staging / "final") == f"{url}/final"
    # fetch: a checkpoint on the URL lands in the staging folder
    local = storage.fetch(latest)
    assert local == staging / "checkpoints" / "step-4"
    assert (local / "mp_rank_00_model_states.pt").read_text() == "w"


def test_local_incomplete_checkpoint_is_named(tmp_path):
    for step, complete in ((3, True), (5, False)):
        d = tmp_path / "checkpoints" / f"step-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / ckpt.COMPLETE).write_text("3\n")
    said = []
    assert ckpt.latest_checkpoint(tmp_path, say=said.append).name == "step-3"
    assert said == ["checkpoints/step-5 has no COMPLETE marker (an interrupted save); resuming from step-3"]
    assert storage.remote(tmp_path) is None and storage.local(tmp_path) == tmp_path
    assert storage.fetch(tmp_path / "checkpoints" / "step-3") == tmp_path / "checkpoints" / "step-3"


def test_publish_all_uploads_final_marker_and_summary(s3):
    endpoint, url, prefix = s3
    staging = storage.local(url)
    (staging / "final").mkdir()
    (staging / "final" / "adapter_model.safetensors").write_bytes(b"w")
    (staging / "metrics.jsonl").write_text('{"step": 1}\n')
    (staging / "summary.json").write_text("{}\n")
    (staging / "checkpoints" / "step-1").mkdir(parents=True)
    (staging / "checkpoints" / "step-1" / "x").write_text("not uploaded here")
    storage.publish_all(staging)
    keys = sorted(k.removeprefix(prefix + "/") for k in list_keys(endpoint, BUCKET, prefix))
    assert keys == ["final/COMPLETE", "final/adapter_model.safetensors", "metrics.jsonl", "summary.json"]
    assert storage.artifact_exists(f"{url}/final") and not storage.artifact_exists(f"{url}/rejected")


def test_verdict_on_a_url(s3):
    _, url, _ = s3
    v = {"version": 1, "exit_code": 3, "decision": "rejected", "final": None, "rejected": f"{url}/rejected"}
    path = vd.write(url, v)
    assert str(path) == f"{url}/{vd.VERDICT}"
    assert vd.read(url) == v
    assert json.loads(storage.UrlPath(url + "/" + vd.VERDICT).read_text())["exit_code"] == 3
    assert vd.read(url + "/nothing") is None


def test_staging_folders_differ_by_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTRIB_FT_STAGING", str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    a = storage.staging_dir("s3://b/run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    b = storage.staging_dir("s3://b/run")
    assert a != b and (a / storage.STAGING_MARK).read_text().strip() == "s3://b/run"


def test_data_files_and_a_replay_buffer_on_s3(s3, tmp_path, monkeypatch, tiny_tokenizer):
    """A data file on a URL: checked where it is (the driver), downloaded once into the cache (the workers); a
    replay buffer built on, and read back from, the URL (pyarrow's S3 through fsspec's ArrowFSWrapper)."""
    from distrib_ft.data import replay_buffer as rb
    from distrib_ft.data.check import check_files
    from distrib_ft.data.formats import build_dataset
    from tests.jobs import toy_alpaca

    _, url, _ = s3
    monkeypatch.setenv("DISTRIB_FT_CACHE", str(tmp_path / "cache"))
    local = toy_alpaca(tmp_path / "train.jsonl", n=16)
    storage.UrlPath(f"{url}/data/train.jsonl").write_bytes(local.read_bytes())
    check_files([f"{url}/data/train.jsonl"], "alpaca", key="data.train_files", tokenizer=tiny_tokenizer,
                max_seq_length=64, need_targets=True)
    cached = storage.local_input(f"{url}/data/train.jsonl")
    assert cached.startswith(str(tmp_path / "cache" / "inputs")) and open(cached, "rb").read() == local.read_bytes()
    assert storage.local_input(f"{url}/data/train.jsonl") == cached  # once
    ds, stats = build_dataset([f"{url}/data/train.jsonl"], "alpaca", tiny_tokenizer, max_seq_length=64)
    assert len(ds) == 16
    assert storage.local_input(f"{url}/data/missing.jsonl") == f"{url}/data/missing.jsonl"

    m = rb.build(f"{url}/replay", [str(local)], budget=8)
    assert m["version"] == 1 and rb.read_manifest(f"{url}/replay")["records"] == 8
    assert rb.list_versions(f"{url}/replay") == [1]


def test_a_url_that_cannot_be_written_is_one_line(s3):
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable("s3://no-such-bucket-here/run")
    line = str(e.value)
    assert "\n" not in line and line.startswith("training.output_dir: s3://no-such-bucket-here/run cannot be written (")
    assert "bucket does not exist" in line
    storage.check_writable(s3[1])  # the fixture's bucket: fine, and the probe is gone
    assert storage.UrlPath(s3[1]).files() == {}  # (pyarrow may leave an empty "folder" object)


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path, mask):
    """mkstemp's 0600 and safetensors' 0600 do not survive the rename: 0644 under umask 0022, private under 0077."""
    import os
    import stat
    import tempfile

    import torch
    from safetensors.torch import save_file

    from distrib_ft.preservation.fisher import save_fisher

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(mask)
    try:
        assert storage.umask() == mask
        storage.atomic_write_text(tmp_path / "verdict.json", "{}\n")
        storage.atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG")
        (tmp_path / "plain.txt").write_text("x")  # the reference: what open() gives
        save_fisher(tmp_path / "fisher.safetensors", {"w": torch.ones(2)}, {"estimator": "empirical"})
        ckpt.save_rng_state(tmp_path / "rng.safetensors")
        folder = tempfile.mkdtemp(dir=tmp_path)  # 0700, as export_final's temp folder
        save_file({"w": torch.ones(2)}, os.path.join(folder, "model.safetensors"))  # 0600
        os.makedirs(os.path.join(folder, "sub"), mode=0o700)
        storage.plain_modes(folder, tree=True)
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    assert mode(tmp_path / "plain.txt") == file_mode == (0o644 if mask == 0o022 else 0o600)
    for name in ("verdict.json", "plot.png", "fisher.safetensors", "rng.safetensors"):
        assert mode(tmp_path / name) == file_mode, name
    assert mode(folder) == mode(os.path.join(folder, "sub")) == dir_mode == (0o755 if mask == 0o022 else 0o700)
    assert mode(os.path.join(folder, "model.safetensors")) == file_mode
