"""Bottleneck adapters (distrib_ft/methods/bottleneck.py): no training loop.

Step 0 is the base model exactly; the adapters sit where Houlsby / Pfeiffer put them and compute
h + up(act(down(h))) on the block's output; final/ round-trips through load_bottleneck and load_trained;
layouts, sizes and files that cannot work are refused in one line.
"""

import json

import pytest
import torch
from pydantic import ValidationError

from distrib_ft.config import config_from_dict
from distrib_ft.job import resolve
from distrib_ft.methods import METHODS, load_trained
from distrib_ft.methods.bottleneck import (
    ADAPTER,
    CONFIG_FILE,
    WEIGHTS_FILE,
    Bottleneck,
    BottleneckConfig,
    decoder_layers,
    load_bottleneck,
)
from distrib_ft.model import adaptable_modules, load_model
from distrib_ft.schema import ConfigError
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64], [3, 1, 4, 1, 5, 9, 2, 6]])


def adapted(tiny_model_dir, **section):
    method = Bottleneck(BottleneckConfig(**section))
    return method, method.apply(load_model(str(tiny_model_dir))).eval()


def randomise(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu"])
def test_step_zero_is_the_base_model_exactly(tiny_model_dir, adapter_type, non_linearity):
    with torch.no_grad():
        base = load_model(str(tiny_model_dir)).eval()(input_ids=IDS).logits
        _, model = adapted(tiny_model_dir, adapter_type=adapter_type, non_linearity=non_linearity)
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("adapter_type, blocks", [("houlsby", {"self_attn", "mlp"}), ("pfeiffer", {"mlp"})])
def test_placement_and_what_trains(tiny_model_dir, adapter_type, blocks):
    base_names = {n for n, _ in load_model(str(tiny_model_dir)).named_parameters()}
    _, model = adapted(tiny_model_dir, adapter_type=adapter_type, reduction_factor=4)
    names = {n for n, _ in model.named_parameters()}
    assert base_names <= names  # the base model's parameter names are unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names - base_names
    layers = decoder_layers(model)
    want = {f"model.layers.{i}.{b}.{ADAPTER}.{lin}.{w}" for i in range(len(layers)) for b in blocks
            for lin in ("down", "up") for w in ("weight", "bias")}
    assert trainable == want
    down = layers[0].mlp.bottleneck_adapter.down.weight
    up = layers[0].mlp.bottleneck_adapter.up.weight
    assert down.shape == (8, 32) and up.shape == (32, 8)  # hidden 32 / reduction_factor 4
    assert not up.any() and down.abs().sum() > 0


def test_the_adapter_acts_on_each_block_output(tiny_model_dir):
    _, model = adapted(tiny_model_dir, non_linearity="gelu")
    randomise(model)
    layer = decoder_layers(model)[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        raw = layer.mlp.forward(x)  # forward(): no hooks, the base block alone
        a = layer.mlp.bottleneck_adapter
        want = raw + a.up(torch.nn.functional.gelu(a.down(raw)))
        torch.testing.assert_close(layer.mlp(x), want, rtol=0, atol=0)
        assert not torch.allclose(layer.mlp(x), raw)
        # the attention block returns (hidden, weights): only element 0 goes through its adapter
        pos = model.model.rotary_emb(x, torch.arange(5)[None])
        plain = layer.self_attn.forward(x, position_embeddings=pos, attention_mask=None)
        hooked = layer.self_attn(x, position_embeddings=pos, attention_mask=None)
        assert isinstance(hooked, tuple) and len(hooked) == len(plain)
        b = layer.self_attn.bottleneck_adapter
        torch.testing.assert_close(hooked[0], plain[0] + b.up(torch.nn.functional.gelu(b.down(plain[0]))),
                                   rtol=0, atol=0)


def test_final_round_trips_through_load_bottleneck_and_load_trained(tmp_path, tiny_model_dir):
    method, model = adapted(tiny_model_dir, adapter_type="pfeiffer", non_linearity="silu", reduction_factor=8)
    randomise(model)
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    state = {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
    method.export(model, state, tmp_path / "final")
    meta = json.loads((tmp_path / "final" / CONFIG_FILE).read_text())
    assert meta == {"adapter_type": "pfeiffer", "reduction_factor": 8, "non_linearity": "silu",
                    "base_model_name_or_path": str(tiny_model_dir)}
    assert METHODS["adapter"].owns_final(tmp_path / "final") and not METHODS["adapter"].owns_final(tiny_model_dir)
    with torch.no_grad():
        loaded = load_bottleneck(load_model(str(tiny_model_dir)), tmp_path / "final").eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, trained, rtol=0, atol=0)
        assert not any(p.requires_grad for p in loaded.parameters())
        again = load_trained(str(tiny_model_dir), tmp_path / "final", load_model=load_model).eval()
        torch.testing.assert_close(again(input_ids=IDS).logits, trained, rtol=0, atol=0)


def test_load_refuses_an_adapter_of_another_shape(tmp_path, tiny_model_dir):
    method, model = adapted(tiny_model_dir, reduction_factor=4)
    method.export(model, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, tmp_path / "f")
    meta = json.loads((tmp_path / "f" / CONFIG_FILE).read_text())
    (tmp_path / "f" / CONFIG_FILE).write_text(json.dumps({**meta, "reduction_factor": 8}))
    with pytest.raises(ValueError, match=r"bottleneck_adapter\.\w+\.\w+ is \(8,.* but \(4,"):
        load_bottleneck(load_model(str(tiny_model_dir)), tmp_path / "f")
    (tmp_path / "f" / CONFIG_FILE).write_text(json.dumps({**meta, "adapter_type": "pfeiffer"}))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} does not fit this base model"):
        load_bottleneck(load_model(str(tiny_model_dir)), tmp_path / "f")
    with pytest.raises(ValueError, match=f"has no {CONFIG_FILE}"):
        load_bottleneck(load_model(str(tiny_model_dir)), tiny_model_dir)


def test_refusals(tiny_model_dir):
    gpt2_names = ["transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "lm_head"]
    with pytest.raises(ValueError, match=r"^method\.type: adapter needs a Llama-family layout"):
        Bottleneck(BottleneckConfig()).check(zero_stage=2, module_names=gpt2_names)
    with pytest.raises(ValueError, match="Llama-family layout"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    llama_names = adaptable_modules(str(tiny_model_dir))
    for stage in (0, 1, 2, 3):
        Bottleneck(BottleneckConfig()).check(zero_stage=stage, module_names=llama_names)
    for bad in ({"reduction_factor": 0}, {"adapter_type": "parallel"}, {"non_linearity": "tanh"}, {"r": 4}):
        with pytest.raises(ValidationError):
            BottleneckConfig(**bad)
    assert Bottleneck.mergeable is False and Bottleneck.artifact == "adapter"


def test_job_resolution_refuses_a_bottleneck_wider_than_nothing(tmp_path, tiny_model_dir):
    raw = job_dict(tmp_path, tiny_model_dir, zero=3)
    raw["method"] = {"type": "adapter", "reduction_factor": 32}  # hidden 32: a bottleneck of 1 is fine
    assert resolve(config_from_dict(raw)).zero_stage == 3
    raw["method"]["reduction_factor"] = 33
    with pytest.raises(ConfigError, match=r"method\.reduction_factor: 33 leaves no bottleneck on hidden size 32"):
        resolve(config_from_dict(raw))


def test_gradient_checkpointing_recomputes_through_the_hooks(tiny_model_dir):
    """The adapters' gradients are the same with activation recomputation (the hooks run again in backward)."""
    grads = []
    for checkpointing in (False, True):
        method = Bottleneck(BottleneckConfig(reduction_factor=4))
        model = method.apply(load_model(str(tiny_model_dir), gradient_checkpointing=checkpointing))
        randomise(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
