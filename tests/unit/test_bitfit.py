"""BitFit (distrib_ft/methods/bitfit.py): what trains, step 0 equals the base exactly, refusals.

The tiny test model (like SmolLM2) has no biases: ``add_bias: false`` is tested on a tiny Llama built here with
``attention_bias`` and ``mlp_bias``. One test, marked integration, runs the methods contract on it (the loop).
"""

import pytest
import torch
from pydantic import ValidationError

from distrib_ft.config import config_from_dict
from distrib_ft.job import resolve
from distrib_ft.methods.bitfit import BitFit, BitFitConfig
from distrib_ft.model import adaptable_modules, load_model
from distrib_ft.schema import ConfigError
from tests.contract import assert_common, run_contract
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64], [3, 1, 4, 1, 5, 9, 2, 6]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HIDDEN, MLP, LAYERS = 32, 64, 2


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory):
    """The tiny Llama of distrib_ft/tiny.py with biases in every attention and MLP projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distrib_ft.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-biased")
    tok = build_tokenizer(384)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False, attention_dropout=0.0, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # nonzero biases, so that the test sees the right ones train
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


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


@pytest.mark.integration
def test_contract_on_a_model_with_biases(tmp_path, biased_model_dir):
    """The methods contract (tests/contract.py) for add_bias: false: 4 steps, resume, final/ is a whole model."""
    raw = job_dict(tmp_path, biased_model_dir, zero=2, learning_rate=1e-2)
    raw["method"] = {"type": "bitfit"}
    c = run_contract(tmp_path, raw)
    assert_common(c)
    assert c.trainable == LAYERS * (5 * HIDDEN + 2 * MLP)
    assert c.checkpoint_keys == c.trainable_names and all(n.endswith(".bias") for n in c.trainable_names)
    assert {k.split(":")[0] for k in c.final_files} == {"model.safetensors"}
    assert c.summary["artifact"] == "model"
    base = load_model(str(biased_model_dir)).state_dict()
    moved = {k.split(":")[1] for k, v in c.final_files.items() if not torch.equal(v, base[k.split(":")[1]])}
    assert moved == c.trainable_names  # final/ differs from the base in the biases, and only there


@pytest.mark.distributed
def test_existing_biases_two_ranks_zero3_match_one_rank(tmp_path, biased_model_dir):
    """add_bias: false under ZeRO-3 (the biases of partitioned Linear modules train): 2 ranks x 2 sequences write
    the same final/ and losses as 1 rank x 4 under ZeRO-2."""
    from safetensors.torch import load_file

    from distrib_ft.runtime.metrics import read_metrics
    from tests.jobs import run_ranks

    out = {}
    for world, micro, zero in ((1, 4, 2), (2, 2, 3)):
        d = tmp_path / f"w{world}"
        raw = job_dict(d, biased_model_dir, zero=zero, per_device_train_batch_size=micro, learning_rate=1e-2,
                       max_steps=3)
        raw["method"] = {"type": "bitfit"}
        run_ranks(raw, world, d)
        out[world] = (load_file(d / "out" / "final" / "model.safetensors"),
                      [r["loss"] for r in read_metrics(d / "out" / "metrics.jsonl") if "loss" in r])
    (one, loss1), (two, loss2) = out[1], out[2]
    base = load_model(str(biased_model_dir)).state_dict()
    assert one.keys() == two.keys() == base.keys() and len(loss1) == 3
    assert max(float((one[k] - base[k]).abs().max()) for k in one if k.endswith(".bias")) > 1e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        if not k.endswith(".bias"):
            torch.testing.assert_close(one[k], base[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=1e-6)
