"""What replay costs per training step: the same job with ``replay.ratio`` 0 and > 0, paired.

Both arms train the same model with the same global batch on alpaca records that all tokenize to the
same length (``write_fixed``; the new data and the buffer are two samples of it), so no arm pads more
than the other -- with ``throughput.write_alpaca``'s varied lengths the replay arm's batches happened to
hold 3.7% more padded tokens, which alone exceeded the effect measured -- and any difference in time
per sequence is the replay machinery: reading Parquet shards, JSON-decoding and tokenizing records on the fly
in the prefetch thread, mixing, and the per-row loss split. The new data is tokenized once before training in
both arms (as any job does); the replay arm tokenizes its old examples during training.

Each arm runs ``train()`` in a fresh process (world of one, ZeRO-2, fp32, LoRA r16), arms alternating,
``--pairs`` times. Per step: wall seconds (metrics.jsonl tokens / tokens_per_second) and CPU seconds of
the process (all its threads, so the prefetch thread's work counts), each divided by the sequences in
the step. Reported: medians over steps after ``--warmup`` of each run, then the median over runs, and
the ratio replay / plain; also rank 0's ``replay_wait_seconds`` (time the loop waited on replay). On a
shared 2-core machine the paired ratio carries a few percent of noise, so the replay machinery is also
timed alone: CPU milliseconds per replayed example (read, decode, tokenize, queue) in one process.

Usage::

    python bench/replay_cost.py --model smollm2 --pairs 3 --steps 15      # ~8 min on 2 cores
    python bench/replay_cost.py --model tiny --pairs 3 --steps 40         # worst case: ~20 ms steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "replay_cost.json"


def write_fixed(path: Path, n: int, seed: int) -> Path:
    """Alpaca records that all tokenize to the same length, so that no arm pads more than the other.

    136 tokens with SmolLM2's ChatML template: single-letter words are single tokens.
    """
    import random
    import string

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ch = rng.choice(string.ascii_lowercase)
            f.write(json.dumps({"instruction": f"write the letter {ch} 96 times", "input": "",
                                "output": " ".join([ch] * 96)}) + "\n")
    return path


def job(spec: dict) -> dict:
    return harness.job_dict(
        spec["model_dir"], {"type": "lora", "r": 16, "lora_alpha": 32},
        {"train_files": [spec["new"]], "format": "alpaca", "max_seq_length": 256},
        {"output_dir": spec["out"], "max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"],
         "learning_rate": 1e-4, "warmup_ratio": 0.0, "logging_steps": 1, "bf16": False, "seed": 0},
        zero=2, replay={"buffer": spec["buffer"], "ratio": spec["ratio"]} if spec["ratio"] else {})


def worker(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    res = harness.train_and_measure(job(spec), Path(spec["out"]))
    per_seq = spec["batch"]
    steps = []
    for tps, n, cps, rec in zip(res["tokens_per_second"], res["tokens"], res["tokens_per_cpu_second"], res["records"]):
        steps.append({"wall_per_seq": n / tps / per_seq, "cpu_per_seq": None if cps is None else n / cps / per_seq,
                      "tokens": n, "wait": rec.get("replay_wait_seconds"), "replay": rec.get("replay_sequences")})
    harness.write_result(spec, {"steps": steps, "wall_s": res["wall_s"]})


def run_arm(spec: dict, work: Path, tag: str) -> dict:
    d = work / tag
    return harness.run_worker(__file__, {**spec, "out": str(d / "out")}, d, threads=spec["threads"])


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:]
    med = lambda key: harness.median(s[key] for s in steps)  # noqa: E731
    return {"wall_per_seq": med("wall_per_seq"), "cpu_per_seq": med("cpu_per_seq"),
            "tokens_per_step": med("tokens"),
            "wait_s_per_step": statistics.median(s["wait"] or 0.0 for s in steps)}


def machinery_cost(buffer: str, model_dir: str, n: int = 1000, trials: int = 3) -> list[float]:
    """CPU milliseconds per replayed example spent by the replay machinery alone, measured in this process.

    The machinery: Parquet read, JSON decode, tokenization with the model's tokenizer and template, the prefetch
    queue.
    """
    from distrib_ft.data import replay_buffer as rb
    from distrib_ft.data.formats import encode_record
    from distrib_ft.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    manifest = rb.read_manifest(buffer)
    out = []
    for trial in range(trials):
        t0 = time.process_time()
        stream = rb.ReplayStream(buffer, manifest, rank=0, world=1, seed=trial, prefetch=256,
                                 encode=lambda r, f, w: encode_record(r, f, w, tokenizer=tok, max_seq_length=256,
                                                                      prompt_template="auto"))
        stream.take(n)
        stream.close()
        out.append(1000 * (time.process_time() - t0) / n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads (2 on 2 busy cores oversubscribes)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from distrib_ft.data import replay_buffer as rb

    work = Path(tempfile.mkdtemp(prefix="dft-replay-cost-"))
    if args.model == "smollm2":
        from distrib_ft.assets import smollm2_path

        model_dir = str(smollm2_path())
    else:
        from distrib_ft.tiny import build_tiny_model

        model_dir = str(build_tiny_model(work / "model"))
    new = write_fixed(work / "new.jsonl", 2000, seed=0)
    rb.build(str(work / "buffer"), [str(write_fixed(work / "old.jsonl", 2000, seed=1))], shard_size=256)
    spec = {"model_dir": model_dir, "new": str(new), "buffer": str(work / "buffer"), "steps": args.steps,
            "batch": args.batch, "threads": args.threads}
    machinery = machinery_cost(spec["buffer"], model_dir)
    print(f"replay machinery: {[round(x, 3) for x in machinery]} CPU ms per replayed example", flush=True)
    runs = {"plain": [], "replay": []}
    t0 = time.time()
    for i in range(args.pairs):
        order = (("plain", 0.0), ("replay", args.ratio)) if i % 2 == 0 else (("replay", args.ratio), ("plain", 0.0))
        for arm, ratio in order:
            res = run_arm({**spec, "ratio": ratio}, work, f"{arm}-{i}")
            runs[arm].append(summarize(res, args.warmup))
            print(f"pair {i} {arm}: {runs[arm][-1]}", flush=True)
    med = {arm: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for arm, rs in runs.items()}
    ratios = {k: med["replay"][k] / med["plain"][k] for k in ("wall_per_seq", "cpu_per_seq", "tokens_per_step")}
    record = {"command": harness.command(__file__, argv), "settings": vars(args),
              "versions": harness.versions(), "runs": runs, "median": med, "replay_over_plain": ratios,
              "machinery_cpu_ms_per_replayed_example": machinery,
              "elapsed_s": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"median": med, "replay_over_plain": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
