"""Scaling: the same job at 1, 2, 4 workers, the Ray launcher against torchrun, and where a step's time goes.

One run of this script (issue #11, must-have 9):

1. builds the tiny Llama (``distrib_ft.tiny.build_tiny_model``), the generated alpaca data of
   ``bench/throughput.py`` and a replay buffer of other generated records (``distrib_ft.data.replay_buffer``);
2. **scaling**: for each configuration (LoRA / full fine-tuning x ZeRO-2 / ZeRO-3) and each worker count,
   one job under ``torchrun`` (``torch.distributed.run``, one process per worker, gloo on CPU, NCCL on GPUs)
   whose ranks run ``distrib_ft.runtime.loop`` (``setup`` -> ``run_steps`` -> ``finish``, as ``train`` does)
   with timers around its parts. Strong scaling: the global batch stays ``--global-batch`` (per-worker share
   ``global / N``); weak scaling (``--weak-configs``): the per-worker share stays ``global / max(--workers)``.
   Reported: tokens/s (all workers, and per worker) and scaling efficiency ``tokens/s(N) / (N x tokens/s(1))``;
3. **a step split** (every scaling run, replay on): per step and rank, *data wait* (this rank's examples:
   ``next`` on the loop's batch iterator and ``collate``), *replay wait* (``Replay.mix``: the replayed examples
   from the prefetch thread), *all-reduce* (every collective DeepSpeed issues, timed and sized by DeepSpeed's
   comms logger, ``"comms_logger": {"enabled": true, "prof_all": true}`` in the DeepSpeed config; its own
   accumulated timers are read, see the DeepSpeed docs "Communication Logging"), *loop sync* (the loop's scalar
   all-reduces: token counts, the logged loss, replay's metrics; they also absorb waiting for the slowest rank)
   and *compute*: the rest of the step (forward, backward, optimizer, bookkeeping). Timers, not cProfile (a
   profiler would slow the Python-heavy parts and blur the split); ``time.perf_counter`` on the host;
4. **launcher overhead**: the same job (LoRA, ZeRO-2, ``--launcher-workers`` workers, replay on) through the real
   CLI both ways, ``distrib-ft train`` (Ray Train, embedded Ray) and ``torchrun ... -m launcher.cli train
   --launcher local``: wall time from the command's start to the first step in metrics.jsonl (polled), the
   whole command's wall time, and the steady-state step time (median over steps past ``--warmup``);
5. **on paper**: collective bytes per step and GPU at 8 and 64 GPUs for SmolLM2-135M and a Llama-2-7B shape
   (parameter counts from their configs on the meta device, nothing downloaded), LoRA vs full and ZeRO-2 vs
   ZeRO-3, from the standard formulas (ring all-reduce: each GPU sends ``2 (N-1)/N x bytes``; ZeRO paper,
   Rajbhandari et al. 2020, section 7: ZeRO-2 moves ``2 psi`` per step (reduce-scatter of the gradients +
   all-gather of the updated parameters), ZeRO-3 ``3 psi`` (parameters gathered in forward and in backward +
   reduce-scatter of the gradients)), checked against the bytes per step measured at 2 workers in step 2; plus
   the Fisher's all-reduce (fp32, the trainable parameters), once per job.

On a machine with fewer cores than workers (4 workers on 2 cores) the workers share cores: the efficiency
there measures the launcher, gloo and the scheduler, not hardware scaling.

Usage::

    python bench/scaling.py                                   # CPU, 1/2/4 workers, ~12 min on 2 cores
    python bench/scaling.py --device cuda --workers 1 2 4 8   # GPUs: NCCL, bf16, one GPU per worker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import throughput as tp  # noqa: E402
from harness import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "scaling.json"
CONFIGS = ("lora-z2", "full-z2", "lora-z3", "full-z3")
TARGETS = tp.TARGETS
LORA_R = 16
# Collectives the comms logger names, grouped for the split (anything else is listed under its own name).
GATHER_OPS = ("all_gather", "all_gather_into_tensor", "all_gather_coalesced", "allgather_fn")
# Shapes for the on-paper part, from their config.json files (HuggingFaceTB/SmolLM2-135M; meta-llama/Llama-2-7b-hf).
PAPER_MODELS = {
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "Llama-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}
PAPER_GPUS = (8, 64)


# ------------------------------------------------------------------------------------ the job

def ds_config_file(work: Path, zero: int, comms: bool) -> str:
    """``ds_configs/zero{zero}.json``, with DeepSpeed's comms logger switched on when ``comms`` (a copy in ``work``)."""
    if not comms:
        return harness.ds_config(zero)
    cfg = json.loads(Path(harness.ds_config(zero)).read_text())
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    path = work / f"zero{zero}-comms.json"
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def job_raw(prep: dict, *, method: str, zero: int, workers: int, per_worker: int, steps: int, out: Path,
            ds_path: str, device: str, replay_ratio: float) -> dict:
    """The job every run trains: the tiny Llama on the generated alpaca data, replay on, no eval, no checkpoints."""
    method_section = ({"type": "lora", "r": LORA_R, "lora_alpha": 2 * LORA_R, "lora_dropout": 0.0,
                       "target_modules": TARGETS} if method == "lora" else {"type": "full"})
    raw = harness.job_dict(
        prep["model_dir"], method_section,
        {"train_files": [prep["train_file"]], "format": "alpaca", "max_seq_length": tp.SETTINGS["max_seq_length"]},
        {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": per_worker,
         "gradient_accumulation_steps": 1, "learning_rate": 2e-4 if method == "lora" else 5e-5,
         "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "warmup_steps": 0, "weight_decay": 0.0,
         "max_grad_norm": 1.0, "bf16": device == "cuda", "gradient_checkpointing": False, "logging_steps": 1,
         "save_steps": 0, "eval_steps": 0, "seed": 0},
        zero=zero, threads=1, dtype="float32",
        **({"replay": {"buffer": prep["buffer"], "ratio": replay_ratio}} if replay_ratio else {}))
    raw["distributed"].update(num_workers=workers, deepspeed=ds_path,
                              backend="nccl" if device == "cuda" else "gloo")
    return raw


def launch_env(device: str) -> dict[str, str]:
    """harness.worker_env(1), keeping the GPUs visible on ``--device cuda`` (no ``DS_ACCELERATOR=cpu`` there)."""
    env = harness.worker_env(1)
    if device == "cuda":
        env.pop("DS_ACCELERATOR", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def torchrun(workers: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--master-port",
            str(port)]


# ------------------------------------------------------------------------------------ a rank (under torchrun)

class _Clock:
    """Cumulative seconds per part, on this rank."""

    def __init__(self) -> None:
        self.s = {"data": 0.0, "replay": 0.0, "sync": 0.0}

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[part] += time.perf_counter() - t0
        return timed


def _comms_totals() -> tuple[dict, dict, dict]:
    """DeepSpeed's comms logger so far: per op, milliseconds (its accumulated timers), bytes and calls."""
    from deepspeed.comm import comm as ds_comm

    ms, nbytes, calls = {}, {}, {}
    for name, sizes in ds_comm.comms_logger.comms_dict.items():
        nbytes[name] = sum(size * rec[0] for size, rec in sizes.items())
        calls[name] = sum(rec[0] for rec in sizes.values())
    for name, timer in ds_comm.timers.get_timers().items():
        ms[name] = timer.elapsed(reset=False)  # the sum of every call's duration under that name
    return ms, nbytes, calls


def rank_main(spec_path: str) -> None:
    """One rank of a scaling run: ``train`` with timers, one JSON of per-step snapshots per rank."""
    spec = harness.read_spec(spec_path)
    from distrib_ft.config import config_from_dict
    from distrib_ft.preservation import replay as replay_mod
    from distrib_ft.runtime import dist, loop
    from distrib_ft.runtime import metrics as metrics_mod
    from distrib_ft.runtime.worker import start_worker

    clock = _Clock()
    snaps: list[dict] = []
    loop.collate = clock.wrap("data", loop.collate)
    replay_mod.Replay.mix = clock.wrap("replay", replay_mod.Replay.mix)
    dist.all_reduce_sum = clock.wrap("sync", dist.all_reduce_sum)
    write = metrics_mod.MetricsLog.write

    def write_and_snap(self, record):
        if "tokens_per_second" in record:  # every rank calls write; rank 0's writes the file
            ms, nbytes, calls = _comms_totals()
            snaps.append({"t": time.perf_counter(), "cpu": time.process_time(), **clock.s, "comm_ms": ms,
                          "comm_bytes": nbytes, "comm_calls": calls,
                          "record": {k: record.get(k) for k in ("step", "loss", "tokens_per_second", "tokens_seen",
                                                                "replay_wait_seconds", "replay_sequences")}})
        return write(self, record)

    metrics_mod.MetricsLog.write = write_and_snap
    t0 = time.perf_counter()
    job = start_worker(config_from_dict(spec["raw"]))
    run = loop.setup(job, False)
    batches = run.batches

    def timed_batches():
        while True:
            t = time.perf_counter()
            item = next(batches)
            clock.s["data"] += time.perf_counter() - t
            yield item

    run.batches = timed_batches()
    started = time.perf_counter()
    snaps.insert(0, {"t": started, "cpu": time.process_time(), **clock.s, "comm_ms": _comms_totals()[0],
                     "comm_bytes": _comms_totals()[1], "comm_calls": _comms_totals()[2], "record": None})
    loop.finish(run, loop.run_steps(run))
    out = {"rank": dist.rank(), "world": dist.world_size(), "setup_s": started - t0, "snaps": snaps,
           "trainable": run.trainable, "total": run.total, "global_batch": run.global_batch}
    Path(f"{spec['result']}.rank{dist.rank()}").write_text(json.dumps(out))


# ------------------------------------------------------------------------------------ the driver's runs

def _deltas(snaps: list[dict], key: str) -> list[float]:
    return [b[key] - a[key] for a, b in zip(snaps, snaps[1:])]


def _dict_deltas(snaps: list[dict], key: str) -> list[dict]:
    return [{k: b[key].get(k, 0) - a[key].get(k, 0) for k in b[key]} for a, b in zip(snaps, snaps[1:])]


def summarize_rank(res: dict, warmup: int) -> dict:
    """Per-step means over the steps past ``warmup`` of one rank: the split, and the collectives' bytes and calls."""
    snaps = res["snaps"]
    wall = _deltas(snaps, "t")[warmup:]
    parts = {p: _deltas(snaps, p)[warmup:] for p in ("data", "replay", "sync")}
    comm_ms = _dict_deltas(snaps, "comm_ms")[warmup:]
    comm_bytes = _dict_deltas(snaps, "comm_bytes")[warmup:]
    comm_calls = _dict_deltas(snaps, "comm_calls")[warmup:]
    n = len(wall)
    comm = [sum(d.values()) / 1000 for d in comm_ms]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    split = {"step_s": mean(wall), "data_s": mean(parts["data"]), "replay_s": mean(parts["replay"]),
             "allreduce_s": mean(comm), "sync_s": mean(parts["sync"])}
    split["compute_s"] = split["step_s"] - sum(v for k, v in split.items() if k != "step_s")
    ops = sorted({k for d in comm_bytes for k in d})
    return {"steps": n, "split": split, "cpu_s_per_step": mean(_deltas(snaps, "cpu")[warmup:]),
            "bytes_per_step": {op: mean([d.get(op, 0) for d in comm_bytes]) for op in ops},
            "calls_per_step": {op: mean([d.get(op, 0) for d in comm_calls]) for op in ops},
            "ms_per_step": {op: mean([d.get(op, 0.0) for d in comm_ms]) for op in ops}}


def scaling_run(prep: dict, work: Path, *, config: str, workers: int, per_worker: int, args, tag: str) -> dict:
    """One job under torchrun with ``workers`` ranks; returns the throughput and every rank's split."""
    from distrib_ft.runtime.dist import free_port

    method, zero = config.split("-")
    run_dir = (work / tag).resolve()
    run_dir.mkdir(parents=True)
    raw = job_raw(prep, method=method, zero=int(zero[1]), workers=workers, per_worker=per_worker,
                  steps=args.steps, out=run_dir / "out", ds_path=ds_config_file(work, int(zero[1]), comms=True),
                  device=args.device, replay_ratio=args.replay_ratio)
    spec_path = run_dir / "rank.spec.json"
    spec_path.write_text(json.dumps({"raw": raw, "threads": 1, "result": str(run_dir / "rank.json")}))
    t0 = time.time()
    with open(run_dir / "torchrun.log", "w") as log:
        rc = subprocess.run([*torchrun(workers, free_port()), str(Path(__file__).resolve()), "--rank", str(spec_path)],
                            env=launch_env(args.device), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.stderr.write((run_dir / "torchrun.log").read_text()[-6000:])
        raise SystemExit(f"{tag} failed ({rc}): {run_dir / 'torchrun.log'}")
    ranks = [json.loads((run_dir / f"rank.json.rank{r}").read_text()) for r in range(workers)]
    recs = [s["record"] for s in ranks[0]["snaps"][1:]]
    tokens = [b["tokens_seen"] - a for a, b in zip([0] + [r["tokens_seen"] for r in recs], recs)]
    step_s = [n / r["tokens_per_second"] for n, r in zip(tokens, recs)]
    past = slice(args.warmup, None)
    tps = harness.median([r["tokens_per_second"] for r in recs][past])
    per_rank = [summarize_rank(r, args.warmup) for r in ranks]
    keys = per_rank[0]["split"].keys()
    split_mean = {k: statistics.mean(p["split"][k] for p in per_rank) for k in keys}
    # CPU seconds of all ranks per step (time.process_time of each rank: its own threads only): a shared machine's
    # other processes change wall time much more than this
    cpu_all = sum(p["cpu_s_per_step"] for p in per_rank)
    return {"config": config, "workers": workers, "per_worker_batch": per_worker,
            "global_batch": ranks[0]["global_batch"],
            "trainable": ranks[0]["trainable"], "total": ranks[0]["total"], "tokens_per_second": tps,
            "tokens_per_second_per_worker": tps / workers, "median_step_s": harness.median(step_s[past]),
            "tokens_per_step": harness.median(tokens[past]), "loss": [r["loss"] for r in recs],
            "cpu_s_per_step_all_ranks": cpu_all,
            "tokens_per_cpu_second": harness.median(tokens[past]) / cpu_all if cpu_all else None,
            "replay_wait_rank0_s": harness.median([r.get("replay_wait_seconds") or 0.0 for r in recs][past]),
            "setup_s": max(r["setup_s"] for r in ranks), "process_s": time.time() - t0,
            "split_mean_over_ranks": split_mean, "per_rank": per_rank}


def _wait_first_step(proc: subprocess.Popen, metrics: Path, t0: float) -> float | None:
    """Seconds from ``t0`` until metrics.jsonl holds a step's line (polled every 20 ms); None if it ended first."""
    while proc.poll() is None:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                if '"tokens_per_second"' in line:
                    return time.time() - t0
        time.sleep(0.02)
    return None


def launcher_run(prep: dict, work: Path, *, launcher: str, args, tag: str) -> dict:
    """The same job through the real CLI: ``distrib-ft train`` (Ray) or torchrun + ``--launcher local``."""
    import yaml

    from distrib_ft.runtime.dist import free_port
    from distrib_ft.runtime.metrics import read_metrics

    n = args.launcher_workers
    run_dir = (work / tag).resolve()
    run_dir.mkdir(parents=True)
    raw = job_raw(prep, method="lora", zero=2, workers=n, per_worker=args.global_batch // n, steps=args.steps,
                  out=run_dir / "out", ds_path=harness.ds_config(2), device=args.device,
                  replay_ratio=args.replay_ratio)
    job = run_dir / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    cli = ["-m", "launcher.cli", "train", str(job)]
    cmd = [sys.executable, *cli] if launcher == "ray" else [*torchrun(n, free_port()), *cli, "--launcher", "local"]
    env = launch_env(args.device)
    env.pop("DS_ACCELERATOR", None)  # the CLI sets it itself without CUDA, as for a user
    t0 = time.time()
    with open(run_dir / "cli.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        first = _wait_first_step(proc, run_dir / "out" / "metrics.jsonl", t0)
        rc = proc.wait()
    wall = time.time() - t0
    if rc != 0:
        sys.stderr.write((run_dir / "cli.log").read_text()[-6000:])
        raise SystemExit(f"{tag} failed ({rc}): {run_dir / 'cli.log'}")
    recs = [r for r in read_metrics(run_dir / "out" / "metrics.jsonl") if "tokens_per_second" in r]
    tokens = [b["tokens_seen"] - a for a, b in zip([0] + [r["tokens_seen"] for r in recs], recs)]
    step_s = [t / r["tokens_per_second"] for t, r in zip(tokens, recs)]
    return {"launcher": launcher, "workers": n, "first_step_s": first, "wall_s": wall,
            "median_step_s": harness.median(step_s[args.warmup:]),
            "tokens_per_second": harness.median([r["tokens_per_second"] for r in recs][args.warmup:]),
            "final_loss": recs[-1]["loss"]}


# ------------------------------------------------------------------------------------ on paper

def _persistence_threshold() -> float:
    """``stage3_param_persistence_threshold`` of ``ds_configs/zero3.json``: smaller tensors ZeRO-3 keeps whole."""
    return float(json.loads(Path(harness.ds_config(3)).read_text())["zero_optimization"]
                 ["stage3_param_persistence_threshold"])


def param_counts(shape: dict, r: int = LORA_R, persistence: float | None = None) -> dict:
    """Parameter counts of a Llama shape, built on the meta device (no weights).

    Returns:
        ``total``, ``lora_trainable`` (LoRA of rank ``r`` on ``TARGETS``) and ``zero3_gathered``: the parameters
        ZeRO-3 gathers (tensors of at least ``persistence`` elements; smaller ones stay whole on every rank).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    persistence = _persistence_threshold() if persistence is None else persistence
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    seen, total, gathered = set(), 0, 0
    lora = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        gathered += p.numel() if p.numel() >= persistence else 0
        if name.split(".")[-2] in TARGETS:  # a LoRA pair A (r x in) and B (out x r) on this weight
            lora += r * (p.shape[0] + p.shape[1])
    return {"total": total, "lora_trainable": lora, "zero3_gathered": gathered}


def predicted_bytes(method: str, zero: int, counts: dict, n: int, dtype_bytes: int) -> float:
    """Bytes each GPU sends per step (ring algorithms), ZeRO paper section 7.

    ZeRO-2: reduce-scatter of the trainable gradients + all-gather of the updated trainable parameters:
    ``2 psi_trainable (N-1)/N`` (= a ring all-reduce, ``2 (N-1)/N x bytes``). ZeRO-3: the parameters it partitions
    -- frozen ones too, LoRA's base included -- gathered in forward and again in backward (``2 psi_gathered``),
    plus the reduce-scatter of the trainable gradients (``psi_trainable``), each ``(N-1)/N``.
    """
    trainable = counts["lora_trainable"] if method == "lora" else counts["total"]
    frac = (n - 1) / n
    if zero == 2:
        return 2 * trainable * dtype_bytes * frac
    return (2 * counts["zero3_gathered"] + trainable) * dtype_bytes * frac


def sent_per_rank(op: str, logged: float, n: int) -> float:
    """Bytes one rank sends for a collective of ``logged`` bytes as DeepSpeed's comms logger sizes it (ring algorithms).

    The logger sizes an op by its tensor argument (``get_msg_size_from_args``), as measured here: ``all_reduce`` and
    ``reduce_scatter_tensor`` by the whole buffer (a rank sends ``2 (N-1)/N`` and ``(N-1)/N`` of it),
    ``all_gather_into_tensor`` by one rank's shard (a rank sends it to ``N-1`` others in a ring: ``(N-1) x shard``).
    """
    if op in ("all_reduce", "all_reduce_coalesced", "inference_all_reduce"):
        return 2 * (n - 1) / n * logged
    if op in ("reduce_scatter_tensor", "reduce_scatter"):
        return (n - 1) / n * logged
    if op in GATHER_OPS:
        return (n - 1) * logged
    return logged  # broadcast, barrier: what the root sends


def on_paper(measured: dict, tiny_counts: dict, dtype_bytes_measured: int, n: int = 2) -> dict:
    """Predicted vs measured bytes per step at ``n`` workers (the tiny model), then the projection to 8 and 64 GPUs."""
    check = {}
    for config, m in measured.items():
        method, zero = config.split("-")
        pred = predicted_bytes(method, int(zero[1]), tiny_counts, n, dtype_bytes_measured)
        sent = {op: sent_per_rank(op, v, n) for op, v in m.items() if v}
        check[config] = {"logged_bytes_per_step": m, "sent_per_rank": sent, "sent_total": sum(sent.values()),
                         "predicted_sent_per_rank": pred, "measured_over_predicted": sum(sent.values()) / pred}
    projection = {}
    for model, shape in PAPER_MODELS.items():
        counts = param_counts(shape)
        rows = {}
        for config in CONFIGS:
            method, zero = config.split("-")
            for n in PAPER_GPUS:
                rows[f"{config}@{n}"] = predicted_bytes(method, int(zero[1]), counts, n, 2)  # bf16 on GPUs
        # The Fisher (EWC): fp32 sums of squared gradients of the trainable parameters, one all-reduce per job.
        for method in ("lora", "full"):
            trainable = counts["lora_trainable"] if method == "lora" else counts["total"]
            for n in PAPER_GPUS:
                rows[f"fisher-{method}@{n}"] = 2 * (n - 1) / n * trainable * 4
        # As DeepSpeed ran it here: the formula times the measured / formula ratio at 2 workers (the same ops at
        # any N: e.g. ZeRO-2 all-reduces the gradient buckets and all-gathers the parameters, 3 psi (N-1)/N).
        as_run = {k: v * check[k.split("@")[0]]["measured_over_predicted"] for k, v in rows.items()
                  if k.split("@")[0] in check}
        projection[model] = {"counts": counts, "bytes_per_gpu": rows, "bytes_per_gpu_as_measured": as_run}
    return {"check_at_2_workers": check, "projection": projection}


# ------------------------------------------------------------------------------------ reporting

def gb(x: float) -> str:
    return f"{x / 1e9:.3f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def tables(record: dict) -> str:
    out = []
    runs = record["scaling"]
    for mode in ("strong", "weak"):
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        out.append(f"\n{mode} scaling ({'global batch fixed' if mode == 'strong' else 'per-worker batch fixed'}):\n")
        out.append("| config | workers | batch per worker / global | tokens/s (all) | tokens/s per worker | "
                   "efficiency vs 1 | step ms | tokens per CPU-s (all ranks) | setup s |"
                   "\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cpu = r.get("tokens_per_cpu_second")
            out.append(f"| {r['config']} | {r['workers']} | {r['per_worker_batch']} / {r['global_batch']} | "
                       f"{r['tokens_per_second']:,.0f} | {r['tokens_per_second_per_worker']:,.0f} | "
                       f"{'-' if r['efficiency'] is None else format(r['efficiency'], '.2f')} | "
                       f"{1000 * r['median_step_s']:.1f} | {'-' if cpu is None else format(cpu, ',.0f')} | "
                       f"{r['setup_s']:.1f} |")
    out.append("\nstep split (ms per step, mean over steps past warmup and over ranks; strong scaling):\n")
    out.append("| config | workers | step | compute | all-reduce (DeepSpeed) | loop sync | data wait | replay wait |"
               "\n|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["mode"] != "strong":
            continue
        s = {k: 1000 * v for k, v in r["split_mean_over_ranks"].items()}
        out.append(f"| {r['config']} | {r['workers']} | {s['step_s']:.1f} | {s['compute_s']:.1f} | "
                   f"{s['allreduce_s']:.1f} | {s['sync_s']:.1f} | {s['data_s']:.2f} | {s['replay_s']:.2f} |")
    if record.get("launcher"):
        out.append("\nlauncher (same job, LoRA ZeRO-2, through the CLI):\n")
        out.append("| launcher | workers | to first step s | whole command s | steady step ms | tokens/s |"
                   "\n|---|---|---|---|---|---|")
        for r in record["launcher"]:
            out.append(f"| {r['launcher']} | {r['workers']} | {r['first_step_s']:.1f} | {r['wall_s']:.1f} | "
                       f"{1000 * r['median_step_s']:.1f} | {r['tokens_per_second']:,.0f} |")
    paper = record.get("paper")
    if paper:
        out.append("\nbytes each rank sends per step at 2 workers: measured (comms logger, per op: logged size -> "
                   "sent) vs the paper's formula:\n")
        out.append("| config | per op: logged -> sent | sent | formula | measured / formula |\n|---|---|---|---|---|")
        for c, m in paper["check_at_2_workers"].items():
            ops = ", ".join(f"{k} {gb(v)} -> {gb(m['sent_per_rank'][k])}" for k, v in m["logged_bytes_per_step"].items()
                            if v)
            out.append(f"| {c} | {ops} | {gb(m['sent_total'])} | {gb(m['predicted_sent_per_rank'])} | "
                       f"{m['measured_over_predicted']:.2f} |")
        out.append("\non paper: bytes each GPU sends per step (bf16), and the Fisher's all-reduce once per job "
                   "(fp32):\n")
        head = " | ".join(f"{c} @{n}" for c in CONFIGS for n in PAPER_GPUS)
        out.append(f"| model | params / LoRA r{LORA_R} | {head} | Fisher LoRA @8/@64 | Fisher full @8/@64 |")
        out.append("|---" * (4 + len(CONFIGS) * len(PAPER_GPUS)) + "|")
        for model, p in paper["projection"].items():
            b, c = p["bytes_per_gpu"], p["counts"]
            cells = " | ".join(gb(b[f"{cf}@{n}"]) for cf in CONFIGS for n in PAPER_GPUS)
            out.append(f"| {model} | {c['total'] / 1e6:,.1f} M / {c['lora_trainable'] / 1e6:.2f} M | {cells} | "
                       f"{gb(b['fisher-lora@8'])} / {gb(b['fisher-lora@64'])} | "
                       f"{gb(b['fisher-full@8'])} / {gb(b['fisher-full@64'])} |")
            a = p["bytes_per_gpu_as_measured"]
            cells = " | ".join(gb(a[f"{cf}@{n}"]) if f"{cf}@{n}" in a else "-" for cf in CONFIGS for n in PAPER_GPUS)
            out.append(f"| {model}, x measured / formula | | {cells} | | |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ main

def prepare(work: Path, args) -> dict:
    """The tiny model, the new task's JSONL and a replay buffer of other records (a multiple of 4 shards)."""
    from distrib_ft.data import replay_buffer as rb
    from distrib_ft.tiny import build_tiny_model

    model_dir = build_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.heads)
    train = tp.write_alpaca(work / "train.jsonl", args.records, seed=0)
    old = tp.write_alpaca(work / "old.jsonl", args.records, seed=1)
    rb.build(str(work / "buffer"), [str(old)], shard_size=max(1, args.records // 8))
    return {"model_dir": str(model_dir), "train_file": str(train), "buffer": str(work / "buffer")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)")
    p.add_argument("--configs", nargs="+", default=["lora-z2", "full-z2", "lora-z3"], choices=CONFIGS,
                   help="method x ZeRO stage (default lora-z2 full-z2 lora-z3; full-z3 is the slowest on CPU)")
    p.add_argument("--weak-configs", nargs="*", default=["lora-z2"], choices=CONFIGS,
                   help="also weak scaling for these (default lora-z2; none: strong only)")
    p.add_argument("--global-batch", type=int, default=16, help="strong scaling's global batch (default 16)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run left out (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per point; the median is reported (default 1)")
    p.add_argument("--replay-ratio", type=float, default=0.25, help="replay.ratio of every run (default 0.25)")
    p.add_argument("--launcher-workers", type=int, default=2, help="workers of the launcher comparison (0: skip)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL, bf16")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--records", type=int, default=400, help="alpaca records generated (default 400)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"raw results JSON; the tables go beside it as .md (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--rank", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank:
        rank_main(args.rank)
        return 0
    if args.steps <= args.warmup + 2:
        p.error("--steps must exceed --warmup by at least 3")
    for n in args.workers:
        if args.global_batch % n:
            p.error(f"--global-batch {args.global_batch} must be a multiple of every --workers value ({n})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.workers + [args.launcher_workers]):
            p.error(f"--device cuda: {max(args.workers + [args.launcher_workers])} workers need as many GPUs; "
                    f"this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    harness.limit_own_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="dft-scaling-")
    work = Path(tmp.name)
    log = harness.progress_log(time.time())
    t_start = time.time()
    load_start = os.getloadavg()
    prep = prepare(work, args)
    weak_batch = args.global_batch // max(args.workers)

    plan = [("strong", c, n, args.global_batch // n) for c in args.configs for n in args.workers]
    plan += [("weak", c, n, weak_batch) for c in args.weak_configs for n in args.workers
             if n != max(args.workers)]  # the weak point at the most workers is the strong one
    runs: list[dict] = []
    for rep in range(args.repeats):
        for i, (mode, config, n, per_worker) in enumerate(plan):
            res = scaling_run(prep, work, config=config, workers=n, per_worker=per_worker, args=args,
                              tag=f"r{rep}-{i:02d}-{mode}-{config}-w{n}")
            res.update(mode=mode, repeat=rep)
            runs.append(res)
            s = res["split_mean_over_ranks"]
            log(f"{mode} {config} x{n} (batch {per_worker}/worker): {res['tokens_per_second']:,.0f} tok/s, step "
                f"{1000 * res['median_step_s']:.0f} ms (compute {1000 * s['compute_s']:.0f}, all-reduce "
                f"{1000 * s['allreduce_s']:.0f}, sync {1000 * s['sync_s']:.0f}, data {1000 * s['data_s']:.1f}, "
                f"replay {1000 * s['replay_s']:.1f}); process {res['process_s']:.0f} s")
    # one row per point: the median repeat by tokens/s
    points = []
    for mode, config, n, _ in plan:
        reps = sorted((r for r in runs if (r["mode"], r["config"], r["workers"]) == (mode, config, n)),
                      key=lambda r: r["tokens_per_second"])
        points.append({**reps[len(reps) // 2], "repeats_tokens_per_second": [r["tokens_per_second"] for r in reps]})
    # the weak series' point at the most workers is the strong run there (same per-worker batch)
    for c in args.weak_configs:
        top = next(q for q in points if (q["mode"], q["config"], q["workers"]) == ("strong", c, max(args.workers)))
        points.append({**top, "mode": "weak"})
    for r in points:  # efficiency: tokens/s(N) / (N x tokens/s(1)) within the same series
        one = next(q for q in points if (q["mode"], q["config"], q["workers"]) == (r["mode"], r["config"], 1))
        r["efficiency"] = r["tokens_per_second"] / (r["workers"] * one["tokens_per_second"])
    points.sort(key=lambda r: (r["mode"] != "strong", CONFIGS.index(r["config"]), r["workers"]))

    launcher = []
    if args.launcher_workers:
        for rep in range(args.repeats):
            for which in ("ray", "torchrun") if rep % 2 == 0 else ("torchrun", "ray"):
                res = launcher_run(prep, work, launcher=which, args=args, tag=f"launcher-{which}-{rep}")
                res["repeat"] = rep
                launcher.append(res)
                log(f"launcher {which} x{res['workers']}: first step after {res['first_step_s']:.1f} s, "
                    f"whole {res['wall_s']:.1f} s, step {1000 * res['median_step_s']:.0f} ms")
        launcher = [
            {**sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2],
             "repeats_first_step_s": [r["first_step_s"] for r in rs]}
            for which in ("ray", "torchrun") for rs in [[r for r in launcher if r["launcher"] == which]]]

    measured = {r["config"]: r["per_rank"][0]["bytes_per_step"] for r in points
                if r["mode"] == "strong" and r["workers"] == 2}
    tiny = param_counts({"vocab_size": 384, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
                         "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                         "num_key_value_heads": args.heads, "tie_word_embeddings": False})
    paper = on_paper(measured, tiny, 2 if args.device == "cuda" else 4) if measured else None
    record = {"command": harness.command(__file__, argv), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                      for k, v in vars(args).items()},
              "versions": harness.versions(), "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(),
              "total_s": time.time() - t_start, "tiny_counts": tiny, "scaling": points, "launcher": launcher,
              "paper": paper, "runs": runs}
    record["tables_markdown"] = tables(record)
    print(record["tables_markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    md = args.out.with_suffix(".md")
    md.with_suffix(".md.tmp").write_text(f"`{record['command']}`\n{record['tables_markdown']}\n")
    os.replace(md.with_suffix(".md.tmp"), md)
    log(f"raw results: {args.out}; tables: {md}")
    harness.close_workdir(tmp, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
