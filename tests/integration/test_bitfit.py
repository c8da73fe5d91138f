"""BitFit with add_bias: false on a model that has biases: the methods contract (the loop), final/ a whole model."""

import torch

from distrib_ft.model import load_model
from tests.contract import assert_common, run_contract
from tests.jobs import job_dict

HIDDEN, MLP, LAYERS = 32, 64, 2


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
