"""The replay buffer on disk: build, versions, sampling, shard assignment, damaged shards."""

import json

import pyarrow.parquet as pq
import pytest

from distrib_ft.data import replay_buffer as rb
from distrib_ft.data.formats import DataError
from tests.jobs import toy_alpaca, toy_join


def _rows(buffer, manifest):
    return [r for s in rb.shards_of(buffer, manifest) for r in rb.read_shard(s).to_pylist()]


def test_build_writes_shards_and_a_manifest_that_round_trips(tmp_path):
    a, b = toy_alpaca(tmp_path / "a.jsonl", n=50), toy_join(tmp_path / "b.jsonl", n=30)
    m = rb.build(str(tmp_path / "buf"), [str(a), str(b)], budget=40, shard_size=16, seed=3)
    assert m == rb.read_manifest(str(tmp_path / "buf")) == rb.read_manifest(str(tmp_path / "buf"), 1)
    assert m["version"] == 1 and m["records"] == 40
    assert [s["records"] for s in m["shards"]] == [16, 16, 8]
    src = {s["name"]: s for s in m["sources"]}
    assert (src["a.jsonl"]["records"], src["a.jsonl"]["selected"]) == (50, 25)  # proportional: 40 * 50/80
    assert (src["b.jsonl"]["records"], src["b.jsonl"]["selected"]) == (30, 15)
    assert src["a.jsonl"]["sha256"] == rb.file_sha256(str(a)) and src["a.jsonl"]["format"] == "alpaca"
    rows = _rows(str(tmp_path / "buf"), m)
    originals = {json.dumps(json.loads(x), sort_keys=True) for x in a.read_text().splitlines()}
    assert all(r["record"] in originals for r in rows if r["source"] == "a.jsonl")
    assert sum(r["source"] == "a.jsonl" for r in rows) == 25


@pytest.mark.parametrize("policy", ["uniform", "reservoir"])
def test_sampling_is_uniform_over_records(tmp_path, policy):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    hits = [0] * 20
    for seed in range(300):
        m = rb.build(str(tmp_path / f"b{policy}{seed}"), [str(path)], budget=5, policy=policy, seed=seed)
        for r in _rows(str(tmp_path / f"b{policy}{seed}"), m):
            hits[int(json.loads(r["record"])["text"].split()[1])] += 1
    assert sum(hits) == 1500 and min(hits) > 45 and max(hits) < 110  # expected 75 each


def test_quotas_weights_and_caps():
    pops = {"a": 100, "b": 10, "c": 50}
    assert rb.allocate(pops, None) == pops
    assert rb.allocate(pops, 16) == {"a": 10, "b": 1, "c": 5}
    assert rb.allocate(pops, 40, quotas={"b": 10}) == {"a": 20, "b": 10, "c": 10}
    assert rb.allocate(pops, 30, weights={"a": 1, "b": 1, "c": 1}) == {"a": 10, "b": 10, "c": 10}
    assert rb.allocate(pops, 90, weights={"a": 1, "b": 1, "c": 1}) == {"a": 40, "b": 10, "c": 40}  # b is capped
    with pytest.raises(DataError, match="unknown source 'x'"):
        rb.allocate(pops, 10, quotas={"x": 1})


def test_update_writes_a_new_version_and_keeps_the_old_one(tmp_path):
    buf = str(tmp_path / "buf")
    a, b = toy_alpaca(tmp_path / "a.jsonl", n=40), toy_join(tmp_path / "b.jsonl", n=40)
    v1 = rb.build(buf, [str(a)], budget=20, shard_size=8)
    v2 = rb.update(buf, [str(b)], budget=20)
    assert (v2["version"], v2["parent"]) == (2, 1) and rb.list_versions(buf) == [1, 2]
    assert rb.read_manifest(buf)["version"] == 2 and rb.read_manifest(buf, 1) == v1
    rows2 = _rows(buf, v2)
    assert {s["name"]: s["selected"] for s in v2["sources"]} == {"a.jsonl": 10, "b.jsonl": 10}
    kept = {r["uid"] for r in rows2 if r["source"] == "a.jsonl"}
    assert kept <= {r["uid"] for r in _rows(buf, v1)}  # old records are a subsample of version 1's
    assert len(_rows(buf, rb.read_manifest(buf, 1))) == 20  # version 1 is still whole
    with pytest.raises(DataError, match="already holds a replay buffer"):
        rb.build(buf, [str(a)])


def test_buffer_on_an_fsspec_url(tmp_path):
    a = toy_alpaca(tmp_path / "a.jsonl", n=12)
    m = rb.build("memory://replay-test/buf", [str(a)], shard_size=5)
    assert rb.read_manifest("memory://replay-test/buf") == m
    assert len(_rows("memory://replay-test/buf", m)) == 12
    m2 = rb.update("memory://replay-test/buf", [str(a)])
    assert m2["version"] == 2 and [s["name"] for s in m2["sources"]] == ["a.jsonl", "a.jsonl#2"]
    with pytest.raises(DataError, match="nosuch://b: .*fsspec backend"):
        rb.read_manifest("nosuch://b")


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_and_complete_across_ranks(world):
    shards = [{"path": f"s{i}", "records": n, "url": f"s{i}"} for i, n in enumerate([7, 7, 7, 3])]
    seen = []
    for rank in range(world):
        for shard, part, parts in rb.assign_shards(shards, rank, world):
            seen += [(shard["path"], j) for j in range(part, shard["records"], parts)]
    assert sorted(seen) == sorted((s["path"], j) for s in shards for j in range(s["records"]))


def test_damaged_or_missing_shards_are_clear_errors(tmp_path):
    buf = str(tmp_path / "buf")
    m = rb.build(buf, [str(toy_alpaca(tmp_path / "a.jsonl", n=10))], shard_size=5)
    shards = rb.shards_of(buf, m)
    (tmp_path / "buf" / m["shards"][0]["path"]).write_text("not parquet")
    with pytest.raises(DataError, match=r"shard-00000.parquet: replay shard is not a readable Parquet file"):
        rb.read_shard(shards[0])
    (tmp_path / "buf" / m["shards"][1]["path"]).unlink()
    with pytest.raises(DataError, match=r"shard-00001.parquet: replay shard listed in the manifest is missing"):
        rb.check_shard(shards[1])
    pq.write_table(rb.pa.Table.from_pylist([], schema=rb._SCHEMA), str(tmp_path / "buf" / m["shards"][1]["path"]))
    with pytest.raises(DataError, match="has 0 rows, the manifest says 5"):
        rb.check_shard(shards[1])
    with pytest.raises(DataError, match="no replay buffer"):
        rb.read_manifest(str(tmp_path / "nothing"))


def test_malformed_source_records_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: field 'output': missing"):
        rb.build(str(tmp_path / "buf"), [str(bad)], policy="reservoir")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="cannot tell the data format.*--format"):
        rb.build(str(tmp_path / "buf2"), [str(odd)])


def test_stream_order_is_a_function_of_the_position(tmp_path):
    buf = str(tmp_path / "buf")
    m = rb.build(buf, [str(toy_alpaca(tmp_path / "a.jsonl", n=10))], shard_size=4)
    enc = lambda rec, fmt, where: {"text": rec["instruction"] + rec["output"]}  # noqa: E731
    full = rb.ReplayStream(buf, m, rank=0, world=1, seed=1, encode=enc, prefetch=3)
    seq = [e["text"] for e in full.take(25)]
    full.close()
    assert sorted(seq[:10]) == sorted(seq[10:20])  # each epoch visits every record once
    later = rb.ReplayStream(buf, m, rank=0, world=1, seed=1, encode=enc, start=13)
    assert [e["text"] for e in later.take(12)] == seq[13:25]
    later.close()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_streams_its_own_records_and_together_all(tmp_path, world):
    buf = str(tmp_path / "buf")
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(11)))
    m = rb.build(buf, [str(src)], shard_size=5)  # 3 shards of 5, 5, 1
    enc = lambda rec, fmt, where: {"text": rec["text"]}  # noqa: E731
    parts = []
    for rank in range(world):
        stream = rb.ReplayStream(buf, m, rank=rank, world=world, seed=0, encode=enc)
        parts.append([e["text"] for e in stream.take(stream.size)])
        stream.close()
    flat = [t for p in parts for t in p]
    assert sorted(flat) == sorted(f"r{i}" for i in range(11)) and len(set(flat)) == 11


def test_parquet_and_saved_dataset_sources_with_an_explicit_format(tmp_path):
    from datasets import Dataset

    recs = [{"body": f"text {i}"} for i in range(6)]
    pq.write_table(rb.pa.Table.from_pylist(recs), str(tmp_path / "old.parquet"))
    with pytest.raises(DataError, match="cannot tell the data format"):
        rb.build(str(tmp_path / "b0"), [str(tmp_path / "old.parquet")])
    recs_text = [{"text": r["body"]} for r in recs]
    pq.write_table(rb.pa.Table.from_pylist(recs_text), str(tmp_path / "t.parquet"))
    Dataset.from_list(recs_text).save_to_disk(str(tmp_path / "saved_text"))
    m = rb.build(str(tmp_path / "b1"), [str(tmp_path / "t.parquet"), str(tmp_path / "saved_text")], fmt="text")
    assert {s["name"]: (s["format"], s["selected"]) for s in m["sources"]} == {"t.parquet": ("text", 6),
                                                                               "saved_text": ("text", 6)}
