"""The training loop in-process (a world of one): learning, exact resume, and the final export."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.runtime import storage
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, set_in


def run(raw, resume=False):
    return train(config_from_dict(raw), resume=resume)


def test_loss_falls_on_a_learnable_task(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=0, max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant")
    set_in(raw, "method.type", "full")
    run(raw)
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    rec = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    assert rec["step"] == 1 and rec["learning_rate"] == pytest.approx(3e-3, rel=1e-12)  # constant, no warmup
    assert rec["loss"] == losses[0] and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0, rec
    assert rec["tokens_per_second"] > 0 and rec["tokens_seen"] > 0, rec


@pytest.mark.parametrize("method", ["lora", "lora+tied", "full", "full+ewc"])
def test_resume_gives_the_same_weights(tmp_path, tiny_model_dir, method):
    """Interrupt after the step-4 checkpoint (drop what came after), resume, compare with the full run.
    With EWC the resumed run must keep the Fisher and anchors of the original start, not recompute them.
    LoRA on a model with tied embeddings (as SmolLM2): its checkpoints hold no frozen weight under either name."""
    if method.endswith("+tied"):
        from distrib_ft.tiny import build_tiny_model

        tiny_model_dir = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    raw = job_dict(tmp_path / "a", tiny_model_dir, zero=2, max_steps=8, save_steps=4, save_total_limit=3)
    set_in(raw, "method.type", method.removesuffix("+ewc").removesuffix("+tied"))
    if method.endswith("+ewc"):
        set_in(raw, "ewc", {"lambda": 100.0, "fisher_data_files": [raw["data"]["train_files"][0]],
                            "fisher_max_sequences": 8})
    run(raw)
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    if method.startswith("lora"):
        saved = torch.load(a / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]  # the tied lm_head.weight stayed before
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-8")
    (b / "summary.json").unlink()
    raw_b = set_in(dict(raw), "training", {**raw["training"], "output_dir": str(b)})
    summary = run(raw_b, resume=True)
    assert summary["steps"] == 8
    name = "adapter_model.safetensors" if method.startswith("lora") else "model.safetensors"
    assert ("ewc_penalty" in read_metrics(b / "metrics.jsonl")[-1]) == method.endswith("+ewc")
    wa, wb = load_file(a / "final" / name), load_file(b / "final" / name)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    la, lb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_final_model_loads_and_matches_the_trained_weights(tmp_path, tiny_model_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = job_dict(tmp_path, tiny_model_dir, zero=2, max_steps=4, save_steps=4)
    set_in(raw, "method.type", method)
    run(raw)
    out = tmp_path / "out"
    mask = storage.umask()  # final/ as a plain mkdir / open() makes it, not mkdtemp's 0700 and safetensors' 0600
    assert {oct(f.stat().st_mode & 0o777) for f in [out / "final", *(out / "final").rglob("*")] if f.is_dir()} == {
        oct(0o777 & ~mask)}
    assert {oct(f.stat().st_mode & 0o777) for f in (out / "final").rglob("*") if f.is_file()} == {oct(0o666 & ~mask)}
    # The trained model: DeepSpeed's own checkpoint of the module at the last step.
    trained = torch.load(out / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method == "lora":
        loaded = PeftModel.from_pretrained(base, out / "final")
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out / "final")
        reference = base
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, reference.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)


def test_tensorboard_and_mlflow_get_the_same_metrics(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = job_dict(tmp_path, tiny_model_dir, zero=0, max_steps=3, report_to=["tensorboard", "mlflow"])
    set_in(raw, "data.eval_files", [raw["data"]["train_files"][0]])
    run(raw)
    out = tmp_path / "out"
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    events = EventAccumulator(str(out / "runs")).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    assert "eval_loss" in events.Tags()["scalars"]
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_ = client.search_runs([client.get_experiment_by_name("distrib-ft").experiment_id])[0]
    history = client.get_metric_history(run_.info.run_id, "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["loss"] for r in logged])
    assert run_.data.params["training.max_steps"] == "3"
