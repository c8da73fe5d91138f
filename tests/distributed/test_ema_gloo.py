"""The EMA of the weights on 2 real gloo ranks: final/ is the EMA the last checkpoint holds (full fine-tuning under
ZeRO-2, where each rank owns half of the fp32 master copy that export reads; a LoRA adapter under ZeRO-3, whose
matrices stay whole on every rank), not the trained weights; trained parameters ZeRO-3 partitions are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import ROOT, job_dict, run_ranks, set_in


def _ema_job(tmp_path, model_dir, zero, method):
    raw = job_dict(tmp_path, model_dir, zero=zero, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
                   save_steps=3)
    if method == "full":
        set_in(raw, "method.type", "full")
        raw["training"]["learning_rate"] = 3e-3
    raw["ema"] = {"decay": 0.5}
    return raw


@pytest.mark.parametrize("zero,method", [(2, "full"), (3, "lora")])
def test_final_is_the_checkpointed_ema(tmp_path, tiny_model_dir, zero, method):
    run_ranks(_ema_job(tmp_path, tiny_model_dir, zero, method), 2, tmp_path)
    out = tmp_path / "out"
    states = sorted((out / "checkpoints" / "step-3").glob("*model_states.pt"))
    state = torch.load(states[0], weights_only=False)
    ema = state["tensors"]["ema"]
    final = load_file(out / "final" / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))
    names = {n: n.replace(".default", "") for n in ema}
    assert {k for k in names.values() if k in final} == set(final)  # every exported tensor is an EMA (tied: once)
    start = load_file(tiny_model_dir / "model.safetensors") if method == "full" else {}
    for n, k in names.items():
        if k not in final:
            continue
        torch.testing.assert_close(final[k], ema[n], rtol=0, atol=0, msg=k)
        if method == "full":  # moved from the start, but less than the trained weights (in the module state)
            trained = state["module"][n].float()
            assert 0 < (ema[n] - start[k]).norm() < (trained - start[k]).norm(), k


def test_partitioned_trained_parameters_under_zero3_are_refused(tmp_path, tiny_model_dir):
    raw = _ema_job(tmp_path, tiny_model_dir, 3, "full")
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())  # the tiny model's tensors all fall below
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the threshold: none stays whole
    (tmp_path / "zero3_partitioned.json").write_text(json.dumps(ds))
    raw["distributed"]["deepspeed"] = str(tmp_path / "zero3_partitioned.json")
    with pytest.raises(AssertionError, match="ema.decay: under ZeRO-3 the EMA needs the trained parameters whole"):
        run_ranks(raw, 2, tmp_path)
