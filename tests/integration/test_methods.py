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
HIDDEN, MLP, LAYERS = 32, 64, 2


def lora_count(r: int) -> int:
    """r * (in + out) for q, k, v, o (H->H) and gate, up (H->I), down (I->H), per layer."""
    return LAYERS * r * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + MLP) + (MLP + HIDDEN))


ROWS = {
    # method: (method section, expected trainable parameters (None: all), what final/ holds)
    "full": ({"type": "full"}, None, "model.safetensors"),
    "lora": ({"type": "lora", "r": 4, "lora_alpha": 8}, lora_count(4), "adapter_model.safetensors"),
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
