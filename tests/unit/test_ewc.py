"""The EWC penalty and its gradient, the config cross-checks, and the LoRA update it penalises (no training loop;
EWC in the loop: tests/integration/test_ewc.py)."""

import pytest
import torch

from distrib_ft.config import ConfigError, config_from_dict
from distrib_ft.preservation.ewc import EWC, EWCConfig, lora_delta, lora_layers
from tests.jobs import job_dict, set_in


def test_penalty_gradient_is_lambda_f_times_delta():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ewc = EWC(EWCConfig(**{"lambda": 3.0}))
    ewc._params = dict(model.named_parameters())
    ewc.fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    ewc.anchors = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    penalty = ewc.penalty(model)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, 3.0 * ewc.fisher[n] * (p.detach() - ewc.anchors[n]))
    assert ewc.metrics() == {"ewc_penalty": penalty.item()} and ewc.metrics() == {}  # once per logged window
    assert EWC(EWCConfig()).penalty(model) is None


def test_config_cross_checks(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="ewc.lambda: > 0 needs"):
        config_from_dict({**raw, "ewc": {"lambda": 1.0}})
    lora_only = r"ewc.target: lora_merged needs .*\(method.type=lora without use_dora\); this job's is full"
    with pytest.raises(ConfigError, match=lora_only):
        config_from_dict(set_in(job_dict(tmp_path, tiny_model_dir), "method", {"type": "full"}) | {
            "ewc": {"target": "lora_merged", "update_after": True}})
    with pytest.raises(ConfigError, match="anchors of an earlier round do not apply"):
        config_from_dict({**raw, "ewc": {"lambda": 1.0, "fisher_path": "x.safetensors"}})


def test_lora_delta_matches_peft_merge(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    name, layer = lora_layers(model)[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    before = layer.base_layer.weight.detach().clone()
    delta = lora_delta(layer).detach()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.detach() - before, delta, rtol=1e-5, atol=1e-6)
