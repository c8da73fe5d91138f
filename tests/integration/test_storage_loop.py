"""The training loop with ``training.output_dir: s3://...`` (moto's server), in this process.

EWC's state file (written where the defence keeps its state) reaches the bucket with the checkpoints, and a resume
on a node with an empty staging folder takes it back instead of computing the Fisher again at the resumed weights;
the Fisher's data file itself is on the bucket. Nothing lands in a local folder named ``s3:``.
"""

import shutil
import uuid

import torch

from distrib_ft.config import config_from_dict
from distrib_ft.preservation.fisher import load_fisher
from distrib_ft.runtime import storage
from distrib_ft.runtime.loop import train
from tests.jobs import job_dict, set_in, toy_join
from tests.s3 import list_keys, make_bucket, s3_env

BUCKET = "loop-storage"


def test_ewc_state_and_checkpoints_on_s3_survive_a_new_node(tmp_path, tiny_model_dir, s3_endpoint, monkeypatch,
                                                              capsys):
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DISTRIB_FT_STAGING", str(tmp_path / "staging"))
    monkeypatch.chdir(tmp_path)
    make_bucket(s3_endpoint, BUCKET)
    prefix = uuid.uuid4().hex[:8]
    url = f"s3://{BUCKET}/{prefix}/run"
    old = toy_join(tmp_path / "old.jsonl", n=16)
    storage.UrlPath(f"s3://{BUCKET}/{prefix}/old.jsonl").write_bytes(old.read_bytes())
    raw = job_dict(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    set_in(raw, "training.output_dir", url)
    set_in(raw, "ewc", {"lambda": 1.0, "fisher_data_files": [f"s3://{BUCKET}/{prefix}/old.jsonl"],
                        "fisher_max_sequences": 8})
    summary = train(config_from_dict(raw))
    assert (summary["output_dir"], summary["final"]) == (url, f"{url}/final")
    keys = {k.removeprefix(f"{prefix}/run/") for k in list_keys(s3_endpoint, BUCKET, f"{prefix}/run/")}
    assert {"ewc_state.safetensors", "checkpoints/step-2/COMPLETE", "checkpoints/step-4/COMPLETE",
            "final/COMPLETE", "metrics.jsonl", "summary.json"} <= keys, sorted(keys)
    first = tmp_path / "first_state.safetensors"
    first.write_bytes(storage.UrlPath(f"{url}/ewc_state.safetensors").read_bytes())
    assert not (tmp_path / "s3:").exists()

    # a new node: no staging folder; step-4's marker lost (an interrupted upload) and final/ not there yet
    shutil.rmtree(tmp_path / "staging")
    storage.UrlPath(f"{url}/checkpoints/step-4/{storage.COMPLETE}").unlink()
    storage.UrlPath(f"{url}/final").rmtree()
    capsys.readouterr()
    summary = train(config_from_dict(set_in(raw, "training.max_steps", 6)), resume=True)
    err = capsys.readouterr()
    said = err.out + err.err
    assert "checkpoints/step-4 has no COMPLETE marker (an interrupted upload); resuming from step-2" in said
    assert f"resumed from {url}/checkpoints/step-2 at step 2" in said
    assert "computing the Fisher" not in said  # the state came back from the bucket
    assert summary["steps"] == 6
    (f1, a1, _), (f2, a2, _) = load_fisher(first), load_fisher(storage.local(url) / "ewc_state.safetensors")
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)  # the first start's Fisher
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not (tmp_path / "s3:").exists()
