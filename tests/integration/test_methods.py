"""The methods contract matrix: one row per registered fine-tuning method (distrib_ft/methods/).

Each row runs 4 steps of the real loop on the tiny model: frozen parameters bit-equal, the trainable count
the method declares, the checkpoint holds what the method says, resume bit-identical, final/ loads back with
the trained logits. Adding a method = one row here (tests/unit/test_methods.py checks every registered
method has one, and its config).
"""

import json

import pytest
import torch

from distrib_ft.methods import METHODS, build_method, checkpoint_trainable_only
from tests.contract import assert_common, run_contract
from tests.jobs import job_dict

# Tiny model: 2 layers, hidden 32, MLP 64, vocab 384 (distrib_ft/tiny.py).
HIDDEN, MLP, LAYERS, VOCAB = 32, 64, 2, 384
LAYER = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN  # q, k, v, o; gate, up, down; two norms
HEAD = VOCAB * HIDDEN + HIDDEN  # lm_head and the final norm


def lora_count(r: int) -> int:
    """r * (in + out) for q, k, v, o (H->H) and gate, up (H->I), down (I->H), per layer."""
    return LAYERS * r * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + MLP) + (MLP + HIDDEN))


ROWS = {
    # method: (method section, expected trainable parameters (None: all), what final/ holds)
    "adapter": ({"type": "adapter", "reduction_factor": 4}, LAYERS * (34 * HIDDEN + 16), "adapter_model.safetensors"),
    "bitfit": ({"type": "bitfit", "add_bias": True}, LAYERS * (5 * HIDDEN + 2 * MLP), "adapter_model.safetensors"),
    "full": ({"type": "full"}, None, "model.safetensors"),
    "lora": ({"type": "lora", "r": 4, "lora_alpha": 8}, lora_count(4), "adapter_model.safetensors"),
    "qlora": ({"type": "qlora", "r": 4, "lora_alpha": 8}, lora_count(4), "adapter_model.safetensors"),
    "partial": ({"type": "partial", "top_k_layers": 1, "layerwise_lr_decay": 0.5}, LAYER + HEAD, "model.safetensors"),
    "prompt_tuning": ({"type": "prompt_tuning", "num_virtual_tokens": 4}, 4 * HIDDEN, "adapter_model.safetensors"),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_method_contract(tmp_path, tiny_model_dir, name):
    section, expected, final_file = ROWS[name]
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, learning_rate=1e-2)
    raw["method"] = json.loads(json.dumps(section))
    c = run_contract(tmp_path, raw)
    assert_common(c)
    assert c.trainable == (c.total if expected is None else expected)
    assert {k.split(":")[0] for k in c.final_files} == {final_file}
    method = build_method(METHODS[name].config_class.model_validate(section))
    if checkpoint_trainable_only(method):  # an adapter's checkpoints leave the frozen base out
        assert c.checkpoint_keys == c.trainable_names
    else:
        assert c.trainable_names <= c.checkpoint_keys
    assert c.summary["method"] == name and c.summary["artifact"] == method.artifact
    assert torch.isfinite(c.trained_logits).all()


@pytest.mark.parametrize("section", [{"type": "partial", "top_k_layers": 1, "freeze_embeddings": False},
                                     {"type": "full"}])
def test_layerwise_learning_rates_reach_the_optimizer(tmp_path, tiny_model_dir, section):
    """lr * d^(L-1-l) per decoder layer, lr for the head, lr * d^L for the embeddings: read back from the DeepSpeed
    engine's optimizer groups at step 0 and after 2 of 3 steps of a cosine schedule (the ratios stay)."""
    from distrib_ft.config import config_from_dict
    from distrib_ft.runtime.loop import run_steps, setup
    from distrib_ft.runtime.worker import start_worker

    raw = job_dict(tmp_path, tiny_model_dir, zero=2, learning_rate=1e-3, max_steps=3, save_steps=0,
                   lr_scheduler_type="cosine")
    raw["method"] = {**section, "layerwise_lr_decay": 0.5}
    run = setup(start_worker(config_from_dict(raw)), resume=False)
    named = {p: n for n, p in run.engine.module.named_parameters()}

    def lrs():  # ZeRO-1/2 optimizers hold flat fp32 partitions: bit16_groups[i] are group i's module parameters
        opt = run.engine.optimizer
        params = getattr(opt, "bit16_groups", None) or [g["params"] for g in opt.param_groups]
        return {named[p]: g["lr"] for g, ps in zip(opt.param_groups, params) for p in ps}

    def expected(name):
        if "embed_tokens" in name:
            return 0.25
        return 0.5 ** (1 - int(name.split(".layers.")[1].split(".")[0])) if ".layers." in name else 1.0

    start = lrs()
    assert set(start) == {n for n, p in run.engine.module.named_parameters() if p.requires_grad}
    for name, lr in start.items():
        assert lr == pytest.approx(1e-3 * expected(name), rel=1e-12), name
    run.max_steps = 2  # 2 of the schedule's 3 steps: cosine factor 0.25
    run_steps(run)
    factor = lrs()["lm_head.weight"] / 1e-3
    assert factor == pytest.approx(0.25)
    for name, lr in lrs().items():
        assert lr == pytest.approx(1e-3 * factor * expected(name), rel=1e-9), name
