"""Replay: old examples from a versioned buffer (distrib_ft/data/replay_buffer.py) mixed into every global batch.

At step ``s`` the global batch holds exactly ``r_s`` replay sequences (distrib_ft/data/batches.py: the
running ratio is exact), dealt to the ranks in turn; each rank streams them from its own shards of
the buffer, tokenized on the fly with the job's tokenizer and template and prefetched in a background
thread. The replay position -- how many replay examples the job has trained on -- is a function of
the step, saved in every checkpoint with the buffer version and checked on resume, so a resumed job
neither repeats nor skips a replay example (with the same number of workers).

``replay.update_after`` carries the buffer forward to the next round with a sample of the data just
learned. Generative replay (distrib_ft/preservation/generative_replay.py) fills a buffer with the base
model's own answers when no old data exists. metrics.jsonl gets the loss split: ``loss_new``,
``loss_replay``, ``new_sequences``, ``replay_sequences``, ``replay_wait_seconds``.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from distrib_ft.data import replay_buffer as rb
from distrib_ft.data.batches import rank_replay_before, replay_before, replay_counts
from distrib_ft.data.formats import DataError, encode_record
from distrib_ft.runtime import dist
from distrib_ft.schema import StorePath, Strict


class ReplayConfig(Strict):
    """``replay:``: old examples streamed beside the new data at an exact ratio of every global batch."""

    resume_checked: ClassVar[tuple[str, ...]] = ("version", "prefetch")  # the checkpoint's state says what fits

    buffer: StorePath | None = Field(None, description=(
        "The replay buffer (distrib-ft replay build): a folder or fsspec URL."))
    version: int | None = Field(None, description="Buffer version to read; default the newest.")
    ratio: float = Field(0.0, ge=0, lt=1, description=(
        "Share of every global batch that is replayed: 0.25 with a global batch of 16 = 4 old sequences per "
        "step. When ratio x global batch is not whole, the count per step alternates so the running ratio is exact."))
    prefetch: int = Field(256, ge=1, description="Replay examples each worker reads and tokenizes ahead.")
    update_after: bool = Field(False, description=(
        "Carry forward: after the job, add a sample of data.train_files to the buffer as a new version."))
    update_budget: int | None = Field(None, ge=1, description=(
        "Records of the new data added by update_after; default 10% of data.train_files' records, at least 1."))

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 or self.update_after

    @model_validator(mode="after")
    def _used(self) -> ReplayConfig:
        if self.buffer and not self.enabled:
            raise ValueError("replay.buffer: is set but replay is off (ratio 0, update_after false); set replay.ratio "
                             "(e.g. 0.25) to replay it, or remove the section")
        return self

    def check_job(self, job) -> None:
        """Cross-checks with the rest of the job (ValueError naming the key)."""
        if (self.ratio > 0 or self.update_after) and not self.buffer:
            raise ValueError("replay.buffer: needed by replay.ratio > 0 and replay.update_after "
                             "(a folder or URL; `distrib-ft replay build` makes one)")


class Replay:
    name: ClassVar[str] = "replay"
    config_class: ClassVar[type[Strict]] = ReplayConfig

    def __init__(self, config: ReplayConfig, ctx):
        d = ctx.data

        def encode(record: dict, fmt: str, where: str) -> dict:
            return encode_record(record, fmt, where, tokenizer=ctx.tokenizer, max_seq_length=d.max_seq_length,
                                 prompt_template=d.prompt_template, text_field=d.text_field)

        self.buffer, self.ratio = config.buffer, config.ratio
        self.version, self.prefetch = config.version, config.prefetch
        self.batch_share = config.ratio
        self.per_rank, self.encode, self.seed = ctx.per_rank, encode, ctx.seed
        self.update_files = list(d.train_files) if config.update_after else []
        self.update_budget = config.update_budget
        self.manifest: dict | None = None
        self.stream: rb.ReplayStream | None = None
        self.replayed = 0  # replay examples in the global batches trained so far
        self._resumed_state: dict | None = None
        # this rank's NLL, targets, replay NLL, replay targets; global replayed; steps
        self._window = [0.0, 0, 0.0, 0, 0, 0]

    @staticmethod
    def preflight(config: ReplayConfig, job, tokenizer) -> None:
        """On the driver: the buffer version to read exists (DataError, exit 2, when not).

        A buffer that generative replay is about to fill (still empty) is checked when the job starts.
        """
        gen = job.generative_replay
        filled_here = gen.enabled and gen.buffer == config.buffer
        if config.ratio > 0 and (rb.list_versions(config.buffer) or not filled_here):
            try:
                rb.read_manifest(config.buffer, config.version)
            except DataError as e:
                raise DataError(f"{job.source}: replay.buffer: {e}") from None

    def load_state_dict(self, state: dict) -> None:
        self._resumed_state = state or None

    def on_task_start(self, model: torch.nn.Module, *, resumed: bool) -> None:
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
            if (self._resumed_state is not None
                    and self._resumed_state["replayed"] != replay_before(step, self.ratio, gb)):
                raise ValueError(f"replay: the checkpoint's replay position ({self._resumed_state['replayed']}) does "
                                 f"not match step {step} (replay.ratio or the global batch changed since it was saved)")
            self.stream = rb.ReplayStream(self.buffer, self.manifest, rank=rank, world=world, seed=self.seed,
                                          encode=self.encode, prefetch=self.prefetch,
                                          start=rank_replay_before(step, self.ratio, gb, rank, world))
        self.replayed = replay_before(step + 1, self.ratio, gb)
        counts = replay_counts(step, self.ratio, gb, world)
        self._window[4] += sum(counts)
        self._window[5] += 1
        return examples + self.stream.take(counts[rank])

    def observe(self, examples: list[dict], nll: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate the loss split of one micro-batch (per-sequence NLL sums and target counts, (B,))."""
        if self.ratio == 0:
            return
        is_replay = torch.tensor([bool(e.get("replay")) for e in examples], device=nll.device)
        w = self._window
        w[0] += float(nll.detach().sum())
        w[1] += int(targets.sum())
        w[2] += float(nll.detach()[is_replay].sum())
        w[3] += int(targets[is_replay].sum())

    def metrics(self) -> dict:
        """The replay metrics since the last line. Collective.

        ``loss_new`` / ``loss_replay`` (token-weighted mean NLL of the new and the replayed sequences, all ranks),
        ``new_sequences`` / ``replay_sequences`` (in the global batches), and ``replay_wait_seconds`` (time rank 0's
        loop waited for replay examples; 0 = the prefetch kept up).
        """
        if self.stream is None:
            return {}
        nll, targets, replay_nll, replay_targets = dist.all_reduce_sum(self._window[:4])
        replayed, steps = self._window[4], self._window[5]
        waited, self.stream.waited = self.stream.waited, 0.0
        self._window = [0.0, 0, 0.0, 0, 0, 0]
        return {"loss_new": (nll - replay_nll) / max(targets - replay_targets, 1),
                "loss_replay": replay_nll / max(replay_targets, 1),
                "new_sequences": steps * self.per_rank * dist.world_size() - replayed,
                "replay_sequences": replayed, "replay_wait_seconds": waited}

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
    """``budget`` records split evenly over the new files, and every old source keeps what it has.

    The new files are keyed by the source names update will give them.
    """
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
