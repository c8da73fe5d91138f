"""BitFit (distrib_ft/methods/bitfit.py): what trains, step 0 equals the base exactly, refusals.

The tiny test model (like SmolLM2) has no biases: ``add_bias: false`` is tested on a tiny Llama built here with
``attention_bias`` and ``mlp_bias`` (tests/conftest.py ``biased_model_dir``); the loop runs on it in
tests/integration/test_bitfit.py and tests/distributed/test_bitfit_gloo.py.
"""

import pytest
import torch
from pydantic import ValidationError

from distrib_ft.config import config_from_dict
from distrib_ft.job import resolve
from distrib_ft.methods.bitfit import BitFit, BitFitConfig
from distrib_ft.model import adaptable_modules, load_model
from distrib_ft.schema import ConfigError
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64], [3, 1, 4, 1, 5, 9, 2, 6]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HIDDEN, MLP, LAYERS = 32, 64, 2


def applied(model_dir, **section):
    method = BitFit(BitFitConfig(**section))
    return method, method.apply(load_model(str(model_dir))).eval()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_existing_biases_train_and_nothing_else(biased_model_dir):
    method, model = applied(biased_model_dir)
    assert trainable(model) == {f"model.layers.{i}.{b}.{m}.bias" for i in range(LAYERS)
                                for b, ms in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for m in ms}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LAYERS * (5 * HIDDEN + 2 * MLP)
    assert method.artifact == "model" and method.new_parameters is False and BitFit.mergeable is True
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, load_model(str(biased_model_dir)).eval()(
            input_ids=IDS).logits, rtol=0, atol=0)


def test_target_modules_choose_the_biases(biased_model_dir):
    _, model = applied(biased_model_dir, target_modules=["v_proj", "model.layers.1.mlp.down_proj"])
    assert trainable(model) == {"model.layers.0.self_attn.v_proj.bias", "model.layers.1.self_attn.v_proj.bias",
                                "model.layers.1.mlp.down_proj.bias"}


def test_add_bias_adds_zero_biases_through_peft_beft(tiny_model_dir):
    method, model = applied(tiny_model_dir, add_bias=True)
    names = trainable(model)
    assert names == {f"base_model.model.model.layers.{i}.{b}.{m}.beft_bias.default" for i in range(LAYERS)
                     for b, ms in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for m in ms}
    params = dict(model.named_parameters())
    assert params["base_model.model.model.layers.0.mlp.up_proj.beft_bias.default"].shape == (1, MLP)
    assert all(not params[n].any() for n in names)  # zero at the start
    assert method.artifact == "adapter" and method.new_parameters is True
    with torch.no_grad():
        base = load_model(str(tiny_model_dir)).eval()(input_ids=IDS).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)
        params["base_model.model.model.layers.1.mlp.down_proj.beft_bias.default"].fill_(0.5)
        assert not torch.allclose(model(input_ids=IDS).logits, base)  # the bias reaches the output


def test_a_model_without_biases_is_refused_at_start_up_pointing_to_add_bias(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2)
    raw["method"] = {"type": "bitfit"}
    with pytest.raises(ConfigError, match=r"method\.add_bias: LlamaForCausalLM has no bias .* set method\.add_bias: "
                                          r"true"):
        resolve(config_from_dict(raw))
    raw["method"]["add_bias"] = True
    assert resolve(config_from_dict(raw)).zero_stage == 2
    with pytest.raises(ValueError, match=r"^method\.add_bias: .* set method\.add_bias: true"):
        applied(tiny_model_dir)  # apply() says the same without a job


def test_other_refusals(tmp_path, tiny_model_dir, biased_model_dir):
    names = adaptable_modules(str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"^method\.target_modules: 'qkv_proj' matches no module of the model; "
                                         r"linear modules of its decoder layers are down_proj, gate_proj"):
        BitFit(BitFitConfig(add_bias=True, target_modules=["qkv_proj"])).check(zero_stage=3, module_names=names)
    raw = job_dict(tmp_path, biased_model_dir, zero=3)
    raw["method"] = {"type": "bitfit"}
    assert resolve(config_from_dict(raw)).zero_stage == 3
    for bad in ({"target_modules": []}, {"add_bias": "maybe"}, {"r": 4}):
        with pytest.raises(ValidationError):
            BitFitConfig(**bad)
