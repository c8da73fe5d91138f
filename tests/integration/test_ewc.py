"""EWC in the training loop: lambda 0 is plain training, a huge lambda holds the weights, EWC-LoRA's ZeRO-3
refusal, LoRA rounds chaining the Fisher."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.preservation.fisher import load_fisher
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in, toy_alpaca


def ewc_job(tmp_path, tiny_model_dir, lam, method="full", **training):
    raw = job_dict(tmp_path, tiny_model_dir, zero=0, **{"max_steps": 10, "learning_rate": 3e-3, **training})
    set_in(raw, "method.type", method)
    old = toy_alpaca(tmp_path / "old.jsonl", n=16, seed=11)
    set_in(raw, "ewc", {"lambda": lam, "fisher_data_files": [str(old)], "fisher_max_sequences": 16})
    return raw


def test_lambda_zero_is_plain_training(tmp_path, tiny_model_dir):
    plain = job_dict(tmp_path / "plain", tiny_model_dir, zero=0, max_steps=5, learning_rate=3e-3)
    set_in(plain, "method.type", "full")
    train(config_from_dict(plain))
    raw = ewc_job(tmp_path / "ewc", tiny_model_dir, 0.0, max_steps=5)
    raw["ewc"]["update_after"] = True  # EWC on, lambda 0
    train(config_from_dict(raw))
    a = load_file(tmp_path / "plain" / "out" / "final" / "model.safetensors")
    b = load_file(tmp_path / "ewc" / "out" / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "ewc" / "out" / "final" / "fisher.safetensors").exists()


def test_huge_lambda_keeps_the_weights_at_the_anchors(tmp_path, tiny_model_dir):
    """Measured by the Fisher-weighted distance sum F (theta - theta*)^2, the quantity EWC constrains:
    AdamW still moves every weight by ~lr around its anchor, and weights with F = 0 are free."""
    drift, fisher = {}, None
    for lam in (1e6, 0.0):
        d = tmp_path / f"lam{lam:g}"
        raw = ewc_job(d, tiny_model_dir, lam)
        train(config_from_dict(raw))
        fisher = fisher or load_fisher(d / "out" / "ewc_state.safetensors")[0]
        base = load_file(tiny_model_dir / "model.safetensors")
        final = load_file(d / "out" / "final" / "model.safetensors")
        drift[lam] = sum(float((fisher[k] * (final[k] - base[k]).pow(2)).sum()) for k in base)
        if lam:
            rows = [r for r in read_metrics(d / "out" / "metrics.jsonl") if "loss" in r]
            assert all("ewc_penalty" in r for r in rows) and rows[-1]["ewc_penalty"] > 0
            state = load_fisher(d / "out" / "ewc_state.safetensors")
            assert state[2]["sequences"] == 16
    assert drift[1e6] < 0.05 * drift[0.0], drift


def test_lora_merged_ewc_under_zero3_needs_whole_lora_matrices(tmp_path, tiny_model_dir):
    """Full-parameter EWC under ZeRO-3 is sharded (tests/distributed/test_ewc_zero3_gloo.py); EWC-LoRA reads the
    LoRA matrices whole, so partitioned ones are refused before the Fisher pass."""
    raw = ewc_job(tmp_path, tiny_model_dir, 1.0, method="lora")
    set_in(raw, "ewc.target", "lora_merged")
    set_in(raw, "ewc.fisher_max_sequences", 2)
    ds = json.loads(open(raw["distributed"]["deepspeed"].replace("zero0", "zero3")).read())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # nothing stays whole
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    set_in(raw, "distributed.deepspeed", str(tmp_path / "z3.json"))
    with pytest.raises(ValueError, match="ewc.target: lora_merged under ZeRO-3 needs the LoRA matrices whole"):
        train(config_from_dict(raw))


def test_lora_rounds_chain_the_fisher_of_the_merged_update(tmp_path, tiny_model_dir):
    """Round 1 learns a skill and writes F over the dense weights its adapter updates; round 2 merges
    round 1's adapter into the base, trains a fresh adapter, and is penalised on its merged update."""
    r1 = job_dict(tmp_path / "r1", tiny_model_dir, zero=2, max_steps=4)
    set_in(r1, "ewc", {"target": "lora_merged", "update_after": True, "fisher_max_sequences": 8})
    train(config_from_dict(r1))
    f1_path = tmp_path / "r1" / "out" / "final" / "fisher.safetensors"
    f1, anchors, info = load_fisher(f1_path)
    assert info["target"] == "lora_merged" and not anchors
    assert all(n.endswith(".base_layer.weight") for n in f1)

    r2 = job_dict(tmp_path / "r2", tiny_model_dir, zero=2, max_steps=4)
    set_in(r2, "method.merge_adapters", [str(tmp_path / "r1" / "out" / "final")])
    set_in(r2, "ewc", {"target": "lora_merged", "lambda": 10.0, "fisher_path": str(f1_path),
                       "update_after": True, "gamma": 0.5, "fisher_max_sequences": 8})
    train(config_from_dict(r2))
    rows = [r for r in read_metrics(tmp_path / "r2" / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["ewc_penalty"] == 0.0 and rows[-1]["ewc_penalty"] > 0  # fresh adapter: dW = 0 at first
    f2, _, info2 = load_fisher(tmp_path / "r2" / "out" / "final" / "fisher.safetensors")
    assert info2["rounds"] == 2 and f2.keys() == f1.keys()
    assert all(bool((f2[n] >= 0.5 * f1[n] - 1e-12).all()) for n in f1)  # gamma * F_old + F_new
