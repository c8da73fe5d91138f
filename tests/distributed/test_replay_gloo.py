"""Replay, generative replay and token masking on 2 real gloo ranks."""

from distrib_ft.config import config_from_dict
from distrib_ft.data import replay_buffer as rb
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.metrics import read_metrics
from tests.jobs import job_dict, run_ranks, set_in, toy_join


def test_two_ranks_generate_replay_mix_and_mask(tmp_path, tiny_model_dir):
    """One 2-rank job: the ranks generate pseudo-examples together into a new buffer version, then every
    step replays exactly 2 of 8 sequences; the token masks equal those of a 1-rank run."""
    raw = job_dict(tmp_path / "two", tiny_model_dir, zero=2, max_steps=4)
    buf = tmp_path / "buffer"
    rb.build(str(buf), [str(toy_join(tmp_path / "old.jsonl", n=5))], shard_size=2)  # 3 shards for 2 ranks
    prompts = tmp_path / "old.jsonl"
    set_in(raw, "replay", {"buffer": str(buf), "ratio": 0.25, "prefetch": 2})
    set_in(raw, "generative_replay", {"buffer": str(buf), "prompts_files": [str(prompts)], "num_examples": 6,
                                      "max_new_tokens": 6, "keep_unfinished": True, "min_response_chars": 1,
                                      "temperature": 1.0, "batch_size": 2})
    set_in(raw, "token_masking", {"mode": "stm", "threshold": 300.0})
    set_in(raw, "distributed.num_workers", 2)
    summaries = run_ranks(raw, 2, tmp_path)
    m = rb.read_manifest(str(buf))
    assert m["version"] == 2 and {s["name"][:10]: s["selected"] for s in m["sources"]} == {"old.jsonl": 5,
                                                                                           "generated-": 6}
    lines = [r for r in read_metrics(tmp_path / "two" / "out" / "metrics.jsonl") if "loss" in r]
    assert [r["replay_sequences"] for r in lines] == [2, 2, 2, 2]
    assert all(r["new_sequences"] == 6 for r in lines)

    one = job_dict(tmp_path / "one", tiny_model_dir, zero=2, max_steps=1)
    set_in(one, "token_masking", {"mode": "stm", "threshold": 300.0})
    assert train(config_from_dict(one))["token_masking"] == summaries[0]["token_masking"]
