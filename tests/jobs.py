"""Helpers for tests that run real jobs: toy data, job configs, and N real gloo ranks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toy_alpaca(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable toy task: unit conversion answered in one fixed format."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = rng.randint(1, 9)
            record = {"instruction": f"convert {a} km to m", "input": "", "output": f"{a} km = {a * 1000} m"}
            f.write(json.dumps(record) + "\n")
    return path


def toy_join(path: Path, n: int = 64, seed: int = 5) -> Path:
    """A second toy skill, unlike toy_alpaca: join two words with a hyphen."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.sample(words, 2)
            record = {"instruction": f"join {w[0]} and {w[1]}", "input": "", "output": f"{w[0]}-{w[1]}"}
            f.write(json.dumps(record) + "\n")
    return path


def job_dict(tmp_path: Path, model_dir: Path, zero: int = 2, **training) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = toy_alpaca(tmp_path / "train.jsonl")
    return {
        "model": {"name_or_path": str(model_dir)},
        "method": {"type": "lora", "r": 4, "lora_alpha": 8},
        "data": {"train_files": [str(train)], "max_seq_length": 64},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 1, "bf16": False,
                     "seed": 0, **training},
        "distributed": {"num_workers": 1, "deepspeed": str(ROOT / "ds_configs" / f"zero{zero}.json")},
    }


def set_in(d: dict, dotted: str, value) -> dict:
    """Set ``d[a][b] = value`` for ``dotted="a.b"``. Setting ``method.type`` starts a fresh method section (the
    keys of one method are unknown to another)."""
    if dotted == "method.type":
        d["method"] = {"type": value}
        return d
    node = d
    *parents, last = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return d


def _rank_main(rank: int, world: int, port: int, raw: dict, result_dir: str, entry: str, kwargs: dict) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    out = Path(result_dir) / f"rank{rank}.json"
    try:
        import importlib

        from distrib_ft.config import config_from_dict

        module, name = entry.split(":")
        summary = getattr(importlib.import_module(module), name)(config_from_dict(raw), **kwargs)
        out.write_text(json.dumps({"ok": True, "summary": summary}))
    except BaseException:
        out.write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


def run_ranks(raw: dict, world: int, tmp_path: Path, timeout: float = 300, entry: str = "distrib_ft.runtime.loop:train",
              **kwargs) -> list[dict]:
    """Run ``entry(cfg, **kwargs)`` on ``world`` real processes (gloo); return each rank's result."""
    from distrib_ft.runtime.dist import free_port

    result_dir = tmp_path / f"results-{os.getpid()}-{random.randrange(1 << 30)}"
    result_dir.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, raw, str(result_dir), entry, kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r in range(world):
        f = result_dir / f"rank{r}.json"
        res = json.loads(f.read_text()) if f.exists() else {"ok": False, "error": f"rank {r} left no result"}
        if not res["ok"]:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
        results.append(res["summary"])
    return results
