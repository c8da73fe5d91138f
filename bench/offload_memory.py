"""Peak memory per worker: ZeRO-3 against ZeRO-3 with CPU offload, full fine-tuning of SmolLM2-135M-Instruct.

Each measurement is one job on ``--workers`` real gloo processes (this script started again per rank with
``--rank``), full fine-tuning of ``offline:SmolLM2-135M-Instruct`` (:func:`distrib_ft.assets.smollm2_path`) for
``--steps`` steps under ``ds_configs/zero3.json`` (torch AdamW on the fp32 partitions) or
``ds_configs/zero3_offload.json`` (parameters and optimizer state in CPU memory, DeepSpeed's CPU Adam; ZeRO-Offload,
https://www.deepspeed.ai/tutorials/zero-offload/). Each worker reports its own peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, Linux: KiB) after the job; the table gives the median over ``--repeats`` runs
of the largest worker's peak. With no GPU, "device" memory is the same CPU memory, so offload can save nothing here:
the figure shows what it costs in host memory (its pinned / fp32 buffers), which is what a GPU node's host RAM must
hold on top of the GPU's share.

    python bench/offload_memory.py [--steps 3] [--repeats 3] [--out bench/results/offload_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("zero3", "zero3_offload")


def _train_file(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A small instruction file (unit conversion answered in one format)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = rng.randint(1, 99)
            f.write(json.dumps({"instruction": f"convert {a} km to m", "input": "",
                                "output": f"{a} km = {a * 1000} m"}) + "\n")
    return path


def job(model_dir: str, config: str, work: Path, steps: int, workers: int, seq: int) -> dict:
    """The job dict: full fine-tuning, fp32, batch 1 per worker, under ``ds_configs/<config>.json``."""
    return {
        "model": {"name_or_path": model_dir},
        "method": {"type": "full"},
        "data": {"train_files": [str(_train_file(work / "train.jsonl"))], "max_seq_length": seq},
        "training": {"output_dir": str(work / "out"), "max_steps": steps, "per_device_train_batch_size": 1,
                     "learning_rate": 1e-5, "warmup_ratio": 0.0, "logging_steps": 1, "bf16": False, "seed": 0},
        "distributed": {"num_workers": workers, "deepspeed": str(ROOT / "ds_configs" / f"{config}.json")},
    }


def rank_main(rank: int, world: int, port: int, spec_path: str) -> None:
    """One rank: run the job in this process, write its peak RSS (and the job's wall time) beside the spec."""
    import resource

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    spec = json.loads(Path(spec_path).read_text())
    from distrib_ft.config import config_from_dict
    from distrib_ft.runtime.loop import train

    t0 = time.time()
    train(config_from_dict(spec["job"]))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(spec_path).with_name(f"rank{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_kib / 1024,
                                                                        "wall_s": time.time() - t0}))


def run_once(model_dir: str, config: str, steps: int, workers: int, seq: int) -> dict:
    """One job on ``workers`` fresh processes; each rank's peak RSS (MiB) and the slowest rank's wall seconds."""
    from distrib_ft.runtime.dist import free_port

    with tempfile.TemporaryDirectory(prefix=f"offload-mem-{config}-") as tmp:
        work = Path(tmp)
        spec = work / "spec.json"
        spec.write_text(json.dumps({"job": job(model_dir, config, work, steps, workers, seq)}))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(workers),
                                   "--port", str(port), "--spec", str(spec)], env=env, cwd=ROOT)
                 for r in range(workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"offload_memory: {config}: a rank failed (exit codes {codes})")
        ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(workers)]
    return {"peak_rss_mib": [r["peak_rss_mib"] for r in ranks], "wall_s": max(r["wall_s"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="data.max_seq_length")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "offload_memory.json"))
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.world, args.port, args.spec)
        return 0

    from distrib_ft.assets import smollm2_path
    from distrib_ft.runtime.offload_ops import build_cpu_adam

    model_dir = str(smollm2_path())
    build_cpu_adam()  # not inside the first measurement
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for i in range(args.repeats):
        for config in CONFIGS:  # interleaved, so that the machine's load falls on both alike
            r = run_once(model_dir, config, args.steps, args.workers, args.seq)
            runs[config].append(r)
            print(f"offload_memory: run {i + 1}/{args.repeats} {config}: peak RSS per worker "
                  f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib'])} MiB, {r['wall_s']:.0f} s", file=sys.stderr,
                  flush=True)
    table = {c: {"median_peak_rss_mib_max_worker": statistics.median(max(r["peak_rss_mib"]) for r in rs),
                 "median_wall_s": statistics.median(r["wall_s"] for r in rs)} for c, rs in runs.items()}
    record = {"model": "offline:SmolLM2-135M-Instruct", "method": "full", "dtype": "fp32", "workers": args.workers,
              "steps": args.steps, "repeats": args.repeats, "max_seq_length": args.seq, "micro_batch": 1,
              "runs": runs, "table": table, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    for c, row in table.items():
        print(f"{c}: peak RSS of the largest worker {row['median_peak_rss_mib_max_worker']:.0f} MiB (median of "
              f"{args.repeats}), {row['median_wall_s']:.0f} s per job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
