"""The defences contract matrix: one row per registered defence (distrib_ft/preservation/).

Each row enables one defence on a LoRA job and runs 4 steps of the real loop on the tiny model: its numbers
reach metrics.jsonl, its state in the checkpoint is JSON and brings an exact resume (final weights and every
logged line bit-identical), frozen parameters stay bit-equal, final/ loads back with the trained logits.
Adding a defence = one row here (tests/unit/test_strategies.py checks every registered defence has one, and
its config section).
"""

import json

import pytest

from distrib_ft.data import replay_buffer as rb
from tests.contract import assert_common, run_contract
from tests.jobs import job_dict, toy_join


def token_masking(tmp_path, raw):
    return {"token_masking": {"mode": "stm", "threshold": 300.0}}


def ewc(tmp_path, raw):
    return {"ewc": {"lambda": 100.0, "fisher_data_files": [str(toy_join(tmp_path / "old.jsonl", n=8))],
                    "fisher_max_sequences": 8}}


def generative_replay(tmp_path, raw):
    return {"generative_replay": {"buffer": str(tmp_path / "buffer"),
                                  "prompts_files": [str(toy_join(tmp_path / "p.jsonl", n=4))],
                                  "num_examples": 3, "max_new_tokens": 4, "keep_unfinished": True,
                                  "min_response_chars": 1}}


def replay(tmp_path, raw):
    rb.build(str(tmp_path / "buffer"), [str(toy_join(tmp_path / "old.jsonl", n=12))], shard_size=4)
    return {"replay": {"buffer": str(tmp_path / "buffer"), "ratio": 0.25, "prefetch": 4}}


# defence: (sections that enable it, keys its numbers have in metrics.jsonl)
ROWS = {
    "token_masking": (token_masking, {"masked_fraction", "masked_tokens"}),
    "ewc": (ewc, {"ewc_penalty"}),
    "l2_sp": (lambda tmp_path, raw: {"l2_sp": {"alpha": 10.0}}, {"l2_sp_penalty"}),
    "generative_replay": (generative_replay, set()),
    "ema": (lambda tmp_path, raw: {"ema": {"decay": 0.5}}, set()),
    "replay": (replay, {"loss_new", "loss_replay", "new_sequences", "replay_sequences", "replay_wait_seconds"}),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_defence_contract(tmp_path, tiny_model_dir, name):
    sections, metric_keys = ROWS[name]
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, learning_rate=1e-2)
    raw.update(sections(tmp_path, raw))
    c = run_contract(tmp_path, raw)
    assert_common(c)
    logged = set().union(*(r.keys() for r in c.lines))
    assert metric_keys <= logged, metric_keys - logged
    state = c.client_state["strategies"].get(name, {})
    assert json.loads(json.dumps(state)) == state
    if name == "generative_replay":  # generated once: the resumed run found its pseudo-examples in the buffer
        m = rb.read_manifest(str(tmp_path / "buffer"))
        assert m["version"] == 1 and [s["selected"] for s in m["sources"]] == [3]
