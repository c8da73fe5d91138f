"""Replay: old examples from a versioned buffer (distrib_ft/data/replay_buffer.py) mixed into every global batch.

At step ``s`` the global batch holds exactly ``r_s`` replay sequences (distrib_ft/data/batches.py: the
running ratio is exact), dealt to the ranks in turn; each rank streams them from its own shards of
the buffer, tokenized on the fly with the job's tokenizer and template and prefetched in a background
thread. The replay position -- how many replay examples the job has trained on -- is a function of
the step, saved in every checkpoint with the buffer version and checked on resume, so a resumed job
neither repeats nor skips a replay example (with the same number of workers).

Also here: generative replay (``replay.generate``, distrib_ft/preservation/generative_replay.py)
fills the buffer before training when no old data exists, and ``replay.update_after`` carries the
buffer forward to the next round with a sample of the data just learned.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import torch

from distrib_ft.runtime import dist
from distrib_ft.data import replay_buffer as rb
from distrib_ft.data.batches import rank_replay_before, replay_before, replay_counts
from distrib_ft.data.formats import encode_record
from distrib_ft.preservation import Hooks


class Replay(Hooks):
    name = "replay"

    def __init__(self, buffer: str, *, ratio: float, per_rank: int, encode, version: int | None = None,
                 seed: int = 0, prefetch: int = 256, generate=None, tokenizer=None, update_files=(),
                 update_budget: int | None = None, model_name: str = ""):
        self.buffer, self.ratio, self.per_rank, self.encode, self.version = buffer, ratio, per_rank, encode, version
        self.seed, self.prefetch, self.generate, self.tokenizer = seed, prefetch, generate, tokenizer
        self.update_files, self.update_budget, self.model_name = list(update_files), update_budget, model_name
        self.manifest: dict | None = None
        self.stream: rb.ReplayStream | None = None
        self.replayed = 0  # replay examples in the global batches trained so far
        self._resumed_state: dict | None = None

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "Replay":
        r, d, t = cfg.replay, cfg.data, cfg.training

        def encode(record: dict, fmt: str, where: str) -> dict:
            return encode_record(record, fmt, where, tokenizer=tokenizer, max_seq_length=d.max_seq_length,
                                 prompt_template=d.prompt_template, text_field=d.text_field)

        return cls(r.buffer, ratio=r.ratio, per_rank=t.per_device_train_batch_size * t.gradient_accumulation_steps,
                   encode=encode, version=r.version, seed=t.seed, prefetch=r.prefetch, generate=r.generate,
                   tokenizer=tokenizer, update_files=d.train_files if r.update_after else (),
                   update_budget=r.update_budget, model_name=cfg.model.name_or_path)

    def load_state_dict(self, state: dict) -> None:
        self._resumed_state = state or None

    def on_task_start(self, model: torch.nn.Module, *, output_dir: Path, resumed: bool) -> None:
        if self.generate is not None:
            from distrib_ft.preservation.generative_replay import ensure_generated

            ensure_generated(model, self.tokenizer, self.buffer, self.generate, seed=self.seed,
                             model_name=self.model_name)
        if self.ratio == 0:
            return
        self.manifest = rb.read_manifest(self.buffer, self.version)
        if self.version is None:
            self.version = self.manifest["version"]
        saved = self._resumed_state
        if saved and saved.get("version") != self.version:
            raise ValueError(f"replay.version: the checkpoint was trained on version {saved.get('version')} of "
                             f"{self.buffer}, this run reads version {self.version}; set replay.version: "
                             f"{saved.get('version')} to resume exactly")
        sizes = [sum(len(range(part, sh["records"], parts)) for sh, part, parts in
                     rb.assign_shards(self.manifest["shards"], k, dist.world_size())) for k in range(dist.world_size())]
        if max(sizes) > 1.25 * min(sizes):
            dist.print0(f"replay: warning: the workers hold unequal parts of the buffer ({min(sizes)}..{max(sizes)} "
                        "records), so records in smaller parts are replayed more often; rebuild with a --shard-size "
                        "that gives a multiple of the worker count in shards")
        sources = ", ".join(f"{s['name']} {s['selected']:,}" for s in self.manifest["sources"])
        dist.print0(f"replay: {self.ratio:.1%} of every global batch from {self.buffer} version {self.version} "
                    f"({self.manifest['records']:,} records in {len(self.manifest['shards'])} shard(s): {sources})")

    def mix(self, step: int, examples: list[dict]) -> list[dict]:
        if self.ratio == 0:
            return examples
        rank, world = dist.rank(), dist.world_size()
        gb = self.per_rank * world
        if self.stream is None:
            if self._resumed_state is not None and self._resumed_state["replayed"] != replay_before(step, self.ratio, gb):
                raise ValueError(f"replay: the checkpoint's replay position ({self._resumed_state['replayed']}) does "
                                 f"not match step {step} (replay.ratio or the global batch changed since it was saved)")
            self.stream = rb.ReplayStream(self.buffer, self.manifest, rank=rank, world=world, seed=self.seed,
                                          encode=self.encode, prefetch=self.prefetch,
                                          start=rank_replay_before(step, self.ratio, gb, rank, world))
        self.replayed = replay_before(step + 1, self.ratio, gb)
        return examples + self.stream.take(replay_counts(step, self.ratio, gb, world)[rank])

    def metrics(self) -> dict:
        """``replay_wait_seconds``: time rank 0's loop waited for replay examples since the last line (0 =
        the prefetch kept up)."""
        if self.stream is None:
            return {}
        waited, self.stream.waited = self.stream.waited, 0.0
        return {"replay_wait_seconds": waited}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "version": self.version, "replayed": self.replayed}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def on_task_end(self, model: torch.nn.Module, *, final_dir: Path, train_examples) -> list[Path]:
        if not self.update_files:
            return []
        if dist.is_main():
            n = sum(1 for f in self.update_files for _ in rb.iter_records(f))
            budget = self.update_budget or max(1, math.ceil(0.1 * n))
            prev = rb.read_manifest(self.buffer) if rb.list_versions(self.buffer) else None
            names = [PurePosixPath(f).name for f in self.update_files]
            quotas = _even_quotas(names, budget, prev)
            m = rb.update(self.buffer, self.update_files, quotas=quotas, budget=sum(quotas.values()),
                          seed=self.seed, create=prev is None)
            added = sum(src["selected"] for src in m["sources"] if src.get("added_in") == m["version"])
            dist.print0(f"replay: added {added:,} records of the new data to {self.buffer} -> version {m['version']}")
        dist.barrier()
        return []


def _even_quotas(names: list[str], budget: int, prev: dict | None) -> dict[str, int]:
    """``budget`` records split evenly over the new files (keyed by the source names update will give
    them), and every old source keeps what it has."""
    taken = {s["name"] for s in prev["sources"]} if prev else set()
    quotas = {s["name"]: s["selected"] for s in prev["sources"]} if prev else {}
    keys = []
    for n in names:
        key = rb.source_name(n, taken)
        taken.add(key)
        keys.append(key)
    for i, key in enumerate(keys):
        quotas[key] = budget // len(keys) + (i < budget % len(keys))
    return quotas
