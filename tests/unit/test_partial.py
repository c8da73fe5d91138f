"""Partial training and layer-wise learning rates (distrib_ft/methods/partial.py, layers.py), without a loop."""

import pytest
import torch

from distrib_ft.config import config_from_dict
from distrib_ft.methods import build_method
from distrib_ft.methods.layers import layer_index, layerwise_lr_scale
from distrib_ft.methods.partial import PartialConfig
from distrib_ft.model import load_model
from distrib_ft.runtime.engine import param_groups
from distrib_ft.tiny import build_tiny_model
from tests.jobs import job_dict

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])


def partial(**kw):
    return build_method(PartialConfig(**kw))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_layer_index_and_scales():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("model.norm.weight") is None and layer_index("lm_head.weight") is None
    emb = {"model.embed_tokens.weight"}
    scale = [layerwise_lr_scale(f"model.layers.{i}.mlp.up_proj.weight", num_layers=4, decay=0.5, embeddings=emb)
             for i in range(4)]
    assert scale == [0.125, 0.25, 0.5, 1.0]  # d^(L-1-l)
    assert layerwise_lr_scale("model.embed_tokens.weight", num_layers=4, decay=0.5, embeddings=emb) == 0.0625
    assert layerwise_lr_scale("lm_head.weight", num_layers=4, decay=0.5, embeddings=emb) == 1.0


@pytest.mark.parametrize("kw, want", [
    ({"top_k_layers": 0}, {"lm_head.weight", "model.norm.weight"}),  # head only
    ({"top_k_layers": 1, "train_head": False}, "layers.1."),
    ({}, "all but embeddings"),
])
def test_what_trains(tiny_model_dir, kw, want):
    model = partial(**kw).apply(load_model(str(tiny_model_dir)))
    names = trainable(model)
    if want == "layers.1.":
        assert names and all(".layers.1." in n for n in names)
        assert sum(".layers.1." in n for n, _ in model.named_parameters()) == len(names)
    elif want == "all but embeddings":
        assert names == {n for n, _ in model.named_parameters()} - {"model.embed_tokens.weight"}
    else:
        assert names == want


def test_tied_head_is_untied_and_step_0_equals_the_base(tmp_path):
    folder = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    base = load_model(str(folder)).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = partial(top_k_layers=0).apply(load_model(str(folder))).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert trainable(model) == {"lm_head.weight", "model.norm.weight"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=0)
        model.lm_head.weight.add_(1.0)  # the head moves alone
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_groups_carry_the_layerwise_learning_rates(tiny_model_dir):
    method = partial(top_k_layers=2, freeze_embeddings=False, layerwise_lr_decay=0.5)
    model = method.apply(load_model(str(tiny_model_dir)))
    groups = param_groups(model, 0.1, 1e-3, method.lr_scale)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["lm_head.weight"])] == 1e-3
    assert lr_of[id(named["model.layers.1.mlp.up_proj.weight"])] == 1e-3 * 0.5 ** 0
    assert lr_of[id(named["model.layers.0.mlp.up_proj.weight"])] == 1e-3 * 0.5 ** 1
    assert lr_of[id(named["model.embed_tokens.weight"])] == 1e-3 * 0.5 ** 2
    assert len(lr_of) == len(trainable(model))  # every trainable parameter once, nothing frozen
    assert [g["lr"] for g in groups] == sorted((g["lr"] for g in groups), reverse=True)


@pytest.mark.parametrize("kw, key", [
    ({"train_head": False, "top_k_layers": 0}, "nothing trains"),
    ({"top_k_layers": 3}, "method.top_k_layers: 3 but the model has 2"),
])
def test_impossible_settings_are_refused(tmp_path, tiny_model_dir, kw, key):
    raw = job_dict(tmp_path, tiny_model_dir)
    raw["method"] = {"type": "partial", **kw}
    with pytest.raises(ValueError, match=key):
        build_method(PartialConfig(**kw)).check(zero_stage=2, config=config_from_dict(raw))


def test_zero3_refuses_untying(tmp_path):
    folder = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    raw = job_dict(tmp_path, folder)
    with pytest.raises(ValueError, match="method.freeze_embeddings: .*tied"):
        partial(top_k_layers=0).check(zero_stage=3, config=config_from_dict(raw))
    partial(top_k_layers=0).check(zero_stage=2, config=config_from_dict(raw))
