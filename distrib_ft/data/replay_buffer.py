"""The replay buffer on disk: versioned Parquet shards of old examples plus a manifest, on any fsspec URL.

Layout of a buffer ``DIR`` (a local folder or an fsspec URL such as ``s3://bucket/replay``)::

    DIR/manifest.json                 the newest version's manifest (replaced atomically by each version)
    DIR/v0001/manifest.json           version 1: sources (hash, records, selected), shards (records)
    DIR/v0001/shard-00000.parquet     rows: source, format, record (the original record as JSON), uid
    DIR/v0002/...                     written by ``replay update``; older versions stay readable

Records are stored as they came (not tokenized), so one buffer serves any model; the training job
tokenizes them on the fly with its own tokenizer and template. Each row keeps its data format, so a
buffer can mix alpaca, chat, text and tokenized sources.

Sampling (``build`` and ``update``): every source gets a number of records -- its ``quota``, or a
share of the ``budget`` proportional to its ``weight`` (default: to its size, i.e. uniform over the
union of the sources) -- and its records are a uniform sample without replacement of that size.
``policy="uniform"`` counts each source first and then reads the chosen records (two passes, memory
for the sample only); ``policy="reservoir"`` reads each source once (Algorithm R with one reservoir
per source of up to ``budget`` records), for streams that are expensive to read twice. Both give a
uniform sample. ``update`` treats the records already in the buffer as a uniform sample of their
original source (whose size the manifest keeps), so the new version is again uniform over everything
ever added unless quotas or weights say otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from queue import Full, Queue

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from distrib_ft.data.formats import FORMATS, DataError, validate_record

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SCHEMA = pa.schema([("source", pa.string()), ("format", pa.string()), ("record", pa.string()), ("uid", pa.string())])


# ----------------------------------------------------------------------------------------------- files


def _fs(url: str):
    """(filesystem, path) of a local path or fsspec URL."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # e.g. s3:// without s3fs installed: pyarrow's own filesystem (S3, GCS, HDFS)
        from distrib_ft.runtime.storage import fsspec_filesystem

        try:
            return fsspec_filesystem(url)
        except (ValueError, ImportError):
            raise DataError(f"{url}: {e} (each URL scheme needs its fsspec backend: s3fs, gcsfs, adlfs, ...)") from None
    except ValueError as e:
        raise DataError(f"{url}: {e} (each URL scheme needs its fsspec backend: s3fs, gcsfs, adlfs, ...)") from None


def _join(base: str, *parts: str) -> str:
    return str(PurePosixPath(base, *parts)) if "://" not in base else base.rstrip("/") + "/" + "/".join(parts)


def _write_atomic(fs, path: str, data: bytes) -> None:
    """Write through a temp name and a move: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def infer_format(record: dict) -> str | None:
    """The data format a record looks like, or None."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "input_ids" in record:
        return "tokenized"
    if "text" in record:
        return "text"
    return None


def iter_records(url: str) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each record of a JSONL / Parquet file or a saved ``datasets`` folder.

    The file may be local or an fsspec URL; ``where`` is ``file: line N`` or ``file: record N (0-based)`` for errors.
    """
    fs, path = _fs(url)
    if not fs.exists(path):
        raise DataError(f"{url}: file not found")
    suffix = PurePosixPath(path).suffix.lower()
    if fs.isdir(path):
        from datasets import load_from_disk

        try:
            ds = load_from_disk(path)
        except FileNotFoundError:  # a folder, but not one save_to_disk wrote
            raise DataError(f"{url}: a folder that is not a saved dataset (save_to_disk writes dataset_info.json "
                            "and state.json); list the data files inside it instead") from None
        ds = ds["train"] if hasattr(ds, "keys") else ds
        for i, rec in enumerate(ds):
            yield f"{url}: record {i} (0-based)", rec
    elif suffix in (".jsonl", ".json"):
        with fs.open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except UnicodeDecodeError as e:
                    raise DataError(f"{url}: line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                    "line): save the file as UTF-8") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{url}: line {lineno}: not a JSON object ({e}); each line must be one "
                                    "JSON object") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{url}: line {lineno}: not a JSON object; each line must be one JSON object")
                yield f"{url}: line {lineno}", rec
    elif suffix == ".parquet":
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except pa.ArrowException as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise DataError(f"{url}: not a readable Parquet file ({type(e).__name__}: {first})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield f"{url}: record {i} (0-based)", rec
    else:
        raise DataError(f"{url}: unsupported file type: use .jsonl, .json (JSON lines), .parquet or a "
                        "save_to_disk folder")


def file_sha256(url: str) -> str:
    """Content hash of a source file (of every file in a folder, in name order)."""
    fs, path = _fs(url)
    h = hashlib.sha256()
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for p in files:
        with fs.open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- sampling


def allocate(populations: dict[str, int], budget: int | None, quotas: dict[str, int] | None = None,
             weights: dict[str, float] | None = None) -> dict[str, int]:
    """Records to keep per source: quotas first, the rest of the budget by weight (default: population).

    The split uses largest remainders, never more than a source holds. No budget and no quota: everything.
    """
    quotas, weights = dict(quotas or {}), dict(weights or {})
    for name in [*quotas, *weights]:
        if name not in populations:
            raise DataError(f"quota/weight for unknown source {name!r}; sources: {', '.join(populations)}")
    out = {s: min(q, populations[s]) for s, q in quotas.items()}
    rest = [s for s in populations if s not in out]
    if budget is None:
        return {**out, **{s: populations[s] for s in rest}}
    left = budget - sum(out.values())
    if left < 0:
        raise DataError(f"--budget {budget} is smaller than the sum of the quotas ({sum(out.values())})")
    while rest and left > 0:
        w = {s: float(weights.get(s, populations[s])) for s in rest}
        total = sum(w.values()) or 1.0
        share = {s: left * w[s] / total for s in rest}
        take = {s: int(share[s]) for s in rest}
        for s in sorted(rest, key=lambda s: share[s] - take[s], reverse=True)[:left - sum(take.values())]:
            take[s] += 1
        capped = [s for s in rest if take[s] >= populations[s]]
        if not capped:
            out.update(take)
            return {s: out.get(s, 0) for s in populations}
        for s in capped:  # full sources take all they have; the others share what is left
            out[s] = populations[s]
            left -= populations[s]
            rest.remove(s)
    out.update({s: 0 for s in rest})
    return {s: out.get(s, 0) for s in populations}


def _checked(where: str, record: dict, fmt: str) -> dict:
    validate_record(record, fmt, where)
    return record


def _sample_source(url: str, fmt: str, policy: str, budget: int | None, rng: random.Random):
    """(population, records): all records (uniform, counted first) or a reservoir of up to ``budget``."""
    if policy == "uniform":
        population = sum(1 for _ in iter_records(url))
        return population, None  # chosen later, once every population is known
    reservoir, n = [], 0
    for where, rec in iter_records(url):
        _checked(where, rec, fmt)
        n += 1
        if budget is None or len(reservoir) < budget:
            reservoir.append(rec)
        else:
            j = rng.randrange(n)
            if j < budget:
                reservoir[j] = rec
    return n, reservoir


def _pick(url: str, fmt: str, population: int, k: int, rng: random.Random, reservoir: list | None) -> list[dict]:
    if reservoir is not None:  # a uniform subsample of a uniform sample is uniform
        return rng.sample(reservoir, k) if k < len(reservoir) else reservoir
    chosen = set(rng.sample(range(population), k))
    return [_checked(where, rec, fmt) for i, (where, rec) in enumerate(iter_records(url)) if i in chosen]


def source_name(url: str, taken: set[str]) -> str:
    """A source's name in the manifest: the file name, made unique with ``#2``, ``#3``, ..."""
    name = PurePosixPath(url.rstrip("/")).name
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}#{i}"
    return name


# ----------------------------------------------------------------------------------------------- versions


def read_manifest(buffer: str, version: int | None = None) -> dict:
    """The manifest of ``version`` (default: the newest) of the buffer at ``buffer``."""
    fs, root = _fs(buffer)
    path = _join(root, MANIFEST) if version is None else _join(root, f"v{version:04d}", MANIFEST)
    if not fs.exists(path):
        what = "no replay buffer (manifest.json missing)" if version is None else f"no version {version}"
        raise DataError(f"{buffer}: {what}; build one with `distrib-ft replay build --out {buffer} FILE...`")
    try:
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read())
        manifest["version"], manifest["shards"], manifest["sources"]  # noqa: B018  (required keys)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{buffer}: {path} is not a valid replay manifest ({e!r}); rebuild the buffer") from None
    return manifest


def list_versions(buffer: str) -> list[int]:
    """The buffer's version numbers (``vNNNN`` folders that hold a manifest), ascending; empty if none."""
    fs, root = _fs(buffer)
    return sorted(int(PurePosixPath(p).parent.name[1:]) for p in fs.glob(_join(root, "v*", MANIFEST)))


def _write_version(buffer: str, rows: list[dict], sources: list[dict], *, policy: str, budget: int | None,
                   seed: int, shard_size: int, parent: int | None) -> dict:
    fs, root = _fs(buffer)
    version = (list_versions(buffer) or [0])[-1] + 1
    vdir = f"v{version:04d}"
    fs.makedirs(_join(root, vdir), exist_ok=True)
    random.Random(seed + version).shuffle(rows)  # every shard is a mix of the sources
    shards = []
    for i in range(0, len(rows), shard_size):
        part = rows[i:i + shard_size]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(part, schema=_SCHEMA), sink)
        data = sink.getvalue().to_pybytes()
        name = f"{vdir}/shard-{i // shard_size:05d}.parquet"
        _write_atomic(fs, _join(root, name), data)
        shards.append({"path": name, "records": len(part), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format_version": FORMAT_VERSION, "version": version, "parent": parent,
                "created": datetime.now(UTC).isoformat(timespec="seconds"), "policy": policy,
                "budget": budget, "seed": seed, "shard_size": shard_size, "records": len(rows), "sources": sources,
                "shards": shards}
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    _write_atomic(fs, _join(root, vdir, MANIFEST), text)
    _write_atomic(fs, _join(root, MANIFEST), text)  # the newest version, last: a crash leaves the old one
    return manifest


def _row(source: str, fmt: str, record: dict) -> dict:
    text = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return {"source": source, "format": fmt, "record": text, "uid": hashlib.sha1(text.encode()).hexdigest()}


def _new_sources(files: list[str], fmt: str | None, policy: str, budget: int | None, rng: random.Random,
                 taken: set[str]) -> list[dict]:
    out = []
    for url in files:
        first = next(iter_records(url), None)
        if first is None:
            raise DataError(f"{url}: no records (the file is empty)")
        f = fmt or infer_format(first[1])
        if f is None:
            raise DataError(f"{first[0]}: cannot tell the data format from the fields {sorted(first[1])}; "
                            f"pass --format ({', '.join(FORMATS)})")
        name = source_name(url, taken)
        taken.add(name)
        population, reservoir = _sample_source(url, f, policy, budget, rng)
        out.append({"name": name, "uri": url, "format": f, "sha256": file_sha256(url), "records": population,
                    "_reservoir": reservoir})
    return out


def build(out: str, files: list[str], *, fmt: str | None = None, budget: int | None = None,
          policy: str = "uniform", quotas: dict[str, int] | None = None, weights: dict[str, float] | None = None,
          seed: int = 0, shard_size: int = 1024, extra_rows: dict[str, list[dict]] | None = None) -> dict:
    """Create a buffer (version 1) at ``out`` from old data files.

    When ``out`` already holds a buffer, refuse (use :func:`update`). ``extra_rows``: in-memory sources
    ``{name: [record, ...]}`` (e.g. generated examples), sampled like files. Returns the manifest.
    """
    if list_versions(out):
        raise DataError(f"{out}: already holds a replay buffer; use `distrib-ft replay update {out} FILE...` "
                        "to add a version")
    return update(out, files, fmt=fmt, budget=budget, policy=policy, quotas=quotas, weights=weights, seed=seed,
                  shard_size=shard_size, extra_rows=extra_rows, create=True)


def update(buffer: str, files: list[str], *, fmt: str | None = None, budget: int | None = None,
           policy: str = "uniform", quotas: dict[str, int] | None = None, weights: dict[str, float] | None = None,
           seed: int = 0, shard_size: int | None = None, extra_rows: dict[str, list[dict]] | None = None,
           create: bool = False) -> dict:
    """Write a new version: the newest version's records plus samples of ``files`` (and ``extra_rows``).

    Within ``budget`` (default: the previous budget plus the new sources' share). Returns its manifest.
    """
    if policy not in ("uniform", "reservoir"):
        raise DataError(f"policy {policy!r}: use uniform or reservoir")
    if budget is not None and budget < 1:
        raise DataError(f"--budget {budget}: must be at least 1")
    prev = None if create else read_manifest(buffer)
    rng = random.Random(seed + (prev["version"] if prev else 0))
    old_rows: dict[str, list[dict]] = {}
    sources: list[dict] = []
    if prev:
        for shard in shards_of(buffer, prev):
            for row in read_shard(shard).to_pylist():
                old_rows.setdefault(row["source"], []).append(row)
        sources = [dict(s, _rows=old_rows.get(s["name"], [])) for s in prev["sources"]]
    taken = {s["name"] for s in sources}
    new = _new_sources(files, fmt, policy, budget, rng, taken)
    for name, records in (extra_rows or {}).items():
        if name in taken:
            raise DataError(f"{buffer}: already has a source named {name!r}")
        taken.add(name)
        f = infer_format(records[0]) if records else "alpaca"
        new.append({"name": name, "uri": None, "format": f,
                    "sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
                    "records": len(records), "_reservoir": records})
    if not new:
        raise DataError("no source files given")
    sources += new
    if budget is None and prev and prev.get("budget") is not None:
        budget = prev["budget"] + sum(s["records"] for s in new)
    counts = allocate({s["name"]: s["records"] for s in sources}, budget, quotas, weights)
    rows = []
    for s in sources:
        k = counts[s["name"]]
        if "_rows" in s:  # already in the buffer: a uniform subsample of what is kept
            kept = s.pop("_rows")
            rows += rng.sample(kept, k) if k < len(kept) else kept
            s["selected"] = min(k, len(kept))
        else:
            picked = _pick(s["uri"], s["format"], s["records"], k, rng, s.pop("_reservoir"))
            rows += [_row(s["name"], s["format"], r) for r in picked]
            s["selected"] = len(picked)
            s["added_in"] = (prev["version"] + 1) if prev else 1
    if not rows:
        raise DataError(f"{buffer}: the new version would hold no records (budget {budget})")
    shard_size = shard_size or (prev or {}).get("shard_size") or 1024
    return _write_version(buffer, rows, sources, policy=policy, budget=budget, seed=seed, shard_size=shard_size,
                          parent=prev["version"] if prev else None)


# ----------------------------------------------------------------------------------------------- reading


def shards_of(buffer: str, manifest: dict) -> list[dict]:
    """The manifest's shards with their full URLs."""
    _, root = _fs(buffer)
    proto = buffer.split("://")[0] + "://" if "://" in buffer else ""
    return [dict(s, url=proto + _join(root, s["path"]) if proto else _join(root, s["path"]))
            for s in manifest["shards"]]


def read_shard(shard: dict, rows: list[int] | None = None) -> pa.Table:
    """One shard's table (optionally only ``rows``), checked against the manifest.

    A missing, unreadable or wrong-sized shard is an error naming it, never a silent skip.
    """
    table = _open_shard(shard, lambda f: pq.read_table(f))
    if table.schema.names[:4] != _SCHEMA.names:
        raise DataError(f"{shard['url']}: replay shard has columns {table.schema.names}, expected "
                        f"{_SCHEMA.names}; {_DAMAGED}")
    return table if rows is None else table.take(rows)


def check_shard(shard: dict) -> None:
    """Raise DataError naming the shard when it is missing, not Parquet, or not the manifest's size.

    Reads the Parquet footer only.
    """
    _open_shard(shard, lambda f: pq.ParquetFile(f).metadata)


_DAMAGED = "the buffer is damaged: rebuild it, or set replay.version to an intact version"


def _open_shard(shard: dict, read):
    """``read(file)`` of an existing, readable shard whose row count (``.num_rows``) is the manifest's."""
    fs, path = _fs(shard["url"])
    if not fs.exists(path):
        raise DataError(f"{shard['url']}: replay shard listed in the manifest is missing; {_DAMAGED}")
    try:
        with fs.open(path, "rb") as f:
            out = read(f)
    except Exception as e:
        raise DataError(f"{shard['url']}: replay shard is not a readable Parquet file ({type(e).__name__}: {e}); "
                        f"{_DAMAGED}") from None
    if out.num_rows != shard["records"]:
        raise DataError(f"{shard['url']}: replay shard has {out.num_rows} rows, the manifest says {shard['records']}; "
                        f"{_DAMAGED}")
    return out


def assign_shards(shards: list[dict], rank: int, world: int) -> list[tuple[dict, int, int]]:
    """This rank's part of the buffer as ``(shard, part, parts)``: rows ``j`` of the shard with ``j % parts == part``.

    With at least as many shards as ranks, rank ``r`` reads whole shards
    ``r, r + world, ...``; with more ranks than shards, the ranks of shard ``i`` (``r % S == i``) split
    its rows. Disjoint and complete for any number of ranks.
    """
    n = len(shards)
    if n == 0:
        raise DataError("the replay buffer has no shards")
    if world <= n:
        return [(shards[i], 0, 1) for i in range(rank, n, world)]
    i = rank % n
    parts = len(range(i, world, n))
    return [(shards[i], rank // n, parts)]


class ReplayStream:
    """This rank's replay examples in a deterministic order, tokenized ahead in a background thread.

    The order: epoch ``e`` visits this rank's shard parts in a permutation seeded by ``(seed, rank, e)``
    and each part's rows in a permutation of their own; the stream cycles through epochs. Position
    ``q`` (the examples this rank has replayed so far) fully determines what comes next, so a resumed
    job continues exactly where it stopped.
    """

    def __init__(self, buffer: str, manifest: dict, *, rank: int, world: int, seed: int, encode, start: int = 0,
                 prefetch: int = 256):
        self.parts = []
        for shard, part, parts in assign_shards(shards_of(buffer, manifest), rank, world):
            rows = list(range(part, shard["records"], parts))
            if rows:
                self.parts.append((shard, rows))
        if not self.parts:
            raise DataError(f"{buffer}: replay rank {rank} of {world} gets no records (the buffer holds "
                            f"{manifest['records']}); use fewer workers or a larger buffer")
        for shard, _ in self.parts:  # fail at start-up, not mid-run, on a missing or damaged shard
            check_shard(shard)
        self.size = sum(len(r) for _, r in self.parts)
        self.seed, self.rank, self.encode = seed, rank, encode
        self.waited = 0.0  # seconds the training loop spent waiting in take()
        self._queue: Queue = Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True, name="replay-prefetch")
        self._thread.start()

    def _order(self, epoch: int) -> Iterator[tuple[dict, list[int]]]:
        rng = random.Random(f"{self.seed}/{self.rank}/{epoch}")
        for i in rng.sample(range(len(self.parts)), len(self.parts)):
            shard, rows = self.parts[i]
            yield shard, rng.sample(rows, len(rows))

    def _produce(self, start: int) -> None:
        try:
            epoch, skip = divmod(start, self.size)
            while not self._stop.is_set():
                for shard, rows in self._order(epoch):
                    if skip >= len(rows):
                        skip -= len(rows)
                        continue
                    rows, skip = rows[skip:], 0
                    table = read_shard(shard, rows)
                    for j, (fmt, text) in enumerate(zip(table["format"].to_pylist(), table["record"].to_pylist())):
                        ex = self.encode(json.loads(text), fmt, f"{shard['url']}: row {rows[j]}")
                        while not self._stop.is_set():
                            try:
                                self._queue.put({**ex, "replay": True}, timeout=0.5)
                                break
                            except Full:  # the training loop is behind: wait
                                continue
                        if self._stop.is_set():
                            return
                epoch += 1
        except BaseException as e:  # surfaced in the training loop by take()
            self._queue.put(e)

    def take(self, n: int) -> list[dict]:
        """The next ``n`` examples (blocks only when the prefetch has not kept up; ``waited`` adds up the time)."""
        out, start = [], time.perf_counter()
        for _ in range(n):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            out.append(item)
        self.waited += time.perf_counter() - start
        return out

    def close(self) -> None:
        self._stop.set()

