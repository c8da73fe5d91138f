"""Training throughput of distrib-ft's loop vs Hugging Face Trainer + peft LoRA, same model, data, settings.

One run of this script:

1. builds a small Llama from a config (``distrib_ft.tiny.build_tiny_model``) and an alpaca JSONL with
   varied outputs in a temporary folder, and tokenizes it ONCE with ``distrib_ft.data.formats.build_dataset``
   (saved as a ``datasets`` folder that both sides read: ours as ``format: tokenized``);
2. runs each configuration in a fresh subprocess, ``--repeats`` times, interleaved (A B C A B C ...):
   - ``ours-zero0`` / ``ours-zero2``: ``distrib_ft.runtime.loop.train`` (a world of one, DeepSpeed ZeRO-0 /
     ZeRO-2 from ``ds_configs/``); tokens/s per step read from its ``metrics.jsonl``;
   - ``hf``: ``transformers.Trainer`` on ``peft.get_peft_model``; tokens/s per step from a
     ``TrainerCallback`` (token counts from the batches' ``attention_mask`` via a wrapped collator);
3. drops the first ``--warmup`` steps of each run, takes the median of the rest per run, then the
   median over runs, and prints a markdown table with the ratio ours / HF; raw results go to ``--out``.

Both sides see the same examples in the same order (HF reads them through a sequential sampler in
the order ``distrib_ft.data.batches`` gives ours), the same LoRA initialisation (same seed), and the same
settings: LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/down; torch AdamW (lr 2e-4, no weight
decay, non-fused), constant LR, no warmup, micro-batch 8, no accumulation, fp32 (bf16 off),
max_grad_norm 1.0, logging every step, no eval, no checkpoints; one process; OMP_NUM_THREADS set
explicitly. Their losses therefore track each other step by step (printed as a sanity check).

Tokens counted: non-padding input tokens (``attention_mask`` sum), on both sides.

HF timing, two windows per step:
- ``hf`` (primary): from one ``on_step_end`` to the next: the whole loop iteration (fetching and
  collating the batch, forward, backward, clip, optimizer and scheduler step, logging), which is
  what ours' ``tokens_per_second`` covers (its window runs from the end of one logging step to the
  next, batch fetch and collation included).
- ``hf-compute``: ``on_step_begin`` -> ``on_step_end`` only; the HF Trainer fetches the batch *before*
  ``on_step_begin``, so this leaves data loading out and flatters HF a little.

Usage::

    python bench/throughput.py                       # 1 thread, 3 repeats, 40 steps
    python bench/throughput.py --threads 1 2 --out bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "throughput.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-4, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, micro_batch=8, grad_accum=1, max_grad_norm=1.0, bf16=False,
                logging_steps=1, seed=0, max_seq_length=128)
CONFIGS = ("ours-zero0", "ours-zero2", "hf")

# --------------------------------------------------------------------------------------------- data

_WORDS = ("the quick brown fox jumps over the lazy dog hello world question answer user assistant "
          "system task request response input instruction").split()


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable alpaca task with varied, longer outputs (~60-130 tokens with the tiny tokenizer)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            kind = rng.randrange(4)
            if kind == 0:
                a = rng.randint(1, 60)
                b = a + rng.randint(8, 24)
                rec = {"instruction": f"count from {a} to {b}", "input": "",
                       "output": " ".join(str(i) for i in range(a, b + 1))}
            elif kind == 1:
                k = rng.randint(3, 6)
                rows = [(v := rng.randint(1, 99), v * 1000) for _ in range(k)]
                rec = {"instruction": "convert each distance from km to m",
                       "input": ", ".join(f"{a} km" for a, _ in rows),
                       "output": "; ".join(f"{a} km = {m} m" for a, m in rows)}
            elif kind == 2:
                words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
                rec = {"instruction": "repeat the words in reverse order", "input": " ".join(words),
                       "output": " ".join(reversed(words))}
            else:
                word = rng.choice([w for w in _WORDS if len(w) > 4])
                times = rng.randint(3, 6)
                rec = {"instruction": f"spell the word {word} {times} times", "input": "",
                       "output": " | ".join(" ".join(word) for _ in range(times))}
            f.write(json.dumps(rec) + "\n")
    return path


def prepare(work: Path, args) -> dict:
    """Model, JSONL, tokenized dataset (once); returns the paths and data stats."""
    from distrib_ft.data.formats import build_dataset
    from distrib_ft.model import load_tokenizer
    from distrib_ft.tiny import build_tiny_model

    model_dir = build_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.heads)
    jsonl = write_alpaca(work / "train.jsonl", args.records)
    tok = load_tokenizer(str(model_dir))
    ds, stats = build_dataset([str(jsonl)], fmt="alpaca", tokenizer=tok, max_seq_length=SETTINGS["max_seq_length"])
    ds.save_to_disk(str(work / "tokenized"))
    lengths = [len(x) for x in ds["input_ids"]]
    return {"model_dir": str(model_dir), "data_dir": str(work / "tokenized"), "data_summary": stats.summary(),
            "examples": len(ds), "length_min": min(lengths), "length_median": statistics.median(lengths),
            "length_max": max(lengths)}


# ------------------------------------------------------------------------------------------ workers


def worker_ours(spec: dict) -> dict:
    s = spec["settings"]
    out = Path(spec["work"]) / "out"
    raw = harness.job_dict(
        spec["model_dir"],
        {"type": "lora", "r": s["lora_r"], "lora_alpha": s["lora_alpha"], "lora_dropout": s["lora_dropout"],
         "target_modules": TARGETS},
        {"train_files": [spec["data_dir"]], "format": "tokenized", "max_seq_length": s["max_seq_length"]},
        {"output_dir": str(out), "max_steps": spec["steps"], "per_device_train_batch_size": s["micro_batch"],
         "gradient_accumulation_steps": s["grad_accum"], "learning_rate": s["learning_rate"],
         "lr_scheduler_type": s["lr_scheduler_type"], "warmup_ratio": 0.0, "warmup_steps": s["warmup_steps"],
         "weight_decay": s["weight_decay"], "max_grad_norm": s["max_grad_norm"], "bf16": s["bf16"],
         "gradient_checkpointing": False, "logging_steps": s["logging_steps"], "save_steps": 0,
         "eval_steps": 0, "seed": s["seed"]},
        zero=spec["zero"], threads=spec["threads"], dtype="float32")
    m = harness.train_and_measure(raw, out)
    return {k: m[k] for k in ("tokens_per_second", "loss", "tokens", "tokens_per_cpu_second", "wall_s")}


def worker_hf(spec: dict) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from distrib_ft.data.batches import global_batch_indices
    from distrib_ft.data.formats import collate
    from distrib_ft.methods.lora import LoRA, LoRAConfig
    from distrib_ft.model import load_model, load_tokenizer
    from distrib_ft.runtime.worker import set_seed

    s = spec["settings"]
    t0 = time.time()
    # The same model and LoRA initialisation as ours: same loader, same seed before peft.
    set_seed(s["seed"])
    tok = load_tokenizer(spec["model_dir"])
    model = load_model(spec["model_dir"], dtype="float32")
    model = LoRA(LoRAConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                            target_modules=TARGETS)).apply(model)
    # The same examples in the same order as ours (distrib_ft.data.batches), read sequentially.
    ds = load_from_disk(spec["data_dir"])
    gb = s["micro_batch"] * s["grad_accum"]
    order = [i for step in range(spec["steps"]) for i in global_batch_indices(step, len(ds), gb, s["seed"])]
    ds = ds.select(order)

    pending: list[int] = []  # non-padding tokens of each collated batch, FIFO (the loader may run ahead)

    def collator(examples):
        batch = collate(examples, tok.pad_token_id)
        pending.append(int(batch["attention_mask"].sum()))
        return batch

    class Timing(TrainerCallback):
        def __init__(self):
            self.begin = self.last_end = self.last_cpu = None
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            end, cpu = time.perf_counter(), time.process_time()
            self.steps.append({"tokens": pending.pop(0), "compute_s": end - self.begin,
                               "cycle_s": None if self.last_end is None else end - self.last_end,
                               "cpu_s": None if self.last_cpu is None else cpu - self.last_cpu})
            self.last_end, self.last_cpu = end, cpu

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.steps:
                self.steps[-1]["loss"] = logs["loss"]

    args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "hf_out"), max_steps=spec["steps"],
        per_device_train_batch_size=s["micro_batch"], gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["learning_rate"], lr_scheduler_type=s["lr_scheduler_type"], warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch",  # torch.optim.AdamW, not fused: what ours uses (HF's default is the fused one)
        max_grad_norm=s["max_grad_norm"], bf16=s["bf16"], fp16=False, logging_strategy="steps",
        logging_steps=s["logging_steps"], save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=True, torch_compile=False,
        gradient_checkpointing=False, remove_unused_columns=False, train_sampling_strategy="sequential",
        disable_tqdm=True, seed=s["seed"], data_seed=s["seed"])
    timing = Timing()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[timing])
    trainer.train()
    wall = time.time() - t0
    st = timing.steps
    return {"tokens_per_second": [None if x["cycle_s"] is None else x["tokens"] / x["cycle_s"] for x in st],
            "tokens_per_second_compute": [x["tokens"] / x["compute_s"] for x in st],
            "tokens_per_cpu_second": [None if x["cpu_s"] is None else x["tokens"] / x["cpu_s"] for x in st],
            "loss": [x.get("loss") for x in st], "tokens": [x["tokens"] for x in st], "wall_s": wall,
            "torch_threads": torch.get_num_threads()}


def worker_main(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    harness.write_result(spec, worker_ours(spec) if spec["side"] == "ours" else worker_hf(spec))


# ---------------------------------------------------------------------------------------- the driver

def worker_spec(config: str, steps: int, prep: dict) -> dict:
    """The spec of one configuration's worker (``worker_ours`` / ``worker_hf``), given :func:`prepare`'s paths."""
    side = "hf" if config == "hf" else "ours"
    return {"side": side, "zero": int(config[-1]) if side == "ours" else None, "steps": steps, "settings": SETTINGS,
            "model_dir": prep["model_dir"], "data_dir": prep["data_dir"]}


def run_one(config: str, threads: int, steps: int, prep: dict, work: Path, run_id: int) -> dict:
    """One configuration in a fresh subprocess; returns its raw per-step results."""
    return harness.run_worker(__file__, worker_spec(config, steps, prep), work / f"run{run_id:03d}-{config}-t{threads}",
                              threads=threads, time_key="process_s")


def summarize_run(res: dict, warmup: int, key: str = "tokens_per_second") -> float:
    return harness.median(res[key][warmup:])


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved (default 3)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out (default 5)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="OMP_NUM_THREADS values (default 1)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--records", type=int, default=400, help="alpaca records generated (default 400)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="what to run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"raw results JSON (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.steps <= args.warmup + 2:
        p.error("--steps must exceed --warmup by at least 3")

    tmp = tempfile.TemporaryDirectory(prefix="distrib-ft-bench-")
    work = Path(tmp.name)
    t_start = time.time()
    log = harness.progress_log(t_start)
    prep = prepare(work, args)
    print(f"model: Llama hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"(intermediate {2 * args.hidden}); "
          f"data: {prep['data_summary']}; lengths min/median/max {prep['length_min']}/{prep['length_median']}/"
          f"{prep['length_max']}", file=sys.stderr)

    runs, run_id = [], 0
    for threads in args.threads:
        for rep in range(args.repeats):
            for config in args.configs:  # interleaved: A B C A B C ...
                res = run_one(config, threads, args.steps, prep, work, run_id)
                run_id += 1
                res.update(config=config, threads=threads, repeat=rep,
                           median_tokens_per_second=summarize_run(res, args.warmup),
                           median_tokens_per_cpu_second=summarize_run(res, args.warmup, "tokens_per_cpu_second"))
                if config == "hf":
                    res["median_tokens_per_second_compute"] = summarize_run(res, args.warmup,
                                                                            "tokens_per_second_compute")
                runs.append(res)
                log(f"threads={threads} rep={rep} {config:10s} "
                    f"median {res['median_tokens_per_second']:6.0f} tok/s, {res['median_tokens_per_cpu_second']:6.0f} "
                    f"tok/CPU-s; final loss {res['loss'][-1]:.4f}; process {res['process_s']:.1f}s")

    # Summary: median over runs of the per-run medians; ratio of medians.
    rows, summary = [], {}
    for threads in args.threads:
        def med(config, key, threads=threads):
            vals = [r[key] for r in runs if r["config"] == config and r["threads"] == threads]
            return statistics.median(vals), vals

        entries = {c: (med(c, "median_tokens_per_second"), med(c, "median_tokens_per_cpu_second"))
                   for c in args.configs}
        if "hf" in args.configs:
            entries["hf-compute"] = (med("hf", "median_tokens_per_second_compute"), (None, None))
        hf_wall, hf_cpu = (entries["hf"][0][0], entries["hf"][1][0]) if "hf" in entries else (None, None)
        for name, ((wall, walls), (cpu, cpus)) in entries.items():
            final = statistics.median(r["loss"][-1] for r in runs
                                      if r["config"] == name.removesuffix("-compute") and r["threads"] == threads)
            ours = not name.startswith("hf")
            r_wall = wall / hf_wall if ours and hf_wall else None
            r_cpu = cpu / hf_cpu if ours and hf_cpu and cpu else None
            summary[f"{name}@{threads}"] = {
                "median_tokens_per_second": wall, "per_run": walls, "ratio_vs_hf": r_wall,
                "median_tokens_per_cpu_second": cpu, "per_run_cpu": cpus, "ratio_vs_hf_cpu": r_cpu, "final_loss": final}
            opt = lambda x, f: "-" if x is None else f(x)  # noqa: E731
            rows.append(f"| {threads} | {name} | {fmt_int(wall)} | {' / '.join(fmt_int(v) for v in walls)} | "
                        f"{opt(r_wall, '{:.2f}'.format)} | {opt(cpu, fmt_int)} | {opt(r_cpu, '{:.2f}'.format)} | "
                        f"{final:.4f} |")
    table = ("| OMP threads | configuration | tokens/s (median of run medians) | per-run medians | ours / HF | "
             "tokens per CPU-second | ours / HF (CPU) | final loss |\n|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    print(table)

    # Sanity: same task, same batches, same init -> losses in the same ballpark.
    print("\nloss sanity check (median over runs, steps 1 / 10 / last):")
    for threads in args.threads:
        for config in args.configs:
            rs = [r for r in runs if r["config"] == config and r["threads"] == threads]
            pick = [statistics.median(r["loss"][i] for r in rs) for i in (0, min(9, args.steps - 1), -1)]
            print(f"  threads={threads} {config:10s} " + " / ".join(f"{x:.4f}" for x in pick))
    finals = [r["loss"][-1] for r in runs]
    spread = (max(finals) - min(finals)) / max(min(finals), 1e-9)
    print(f"  final losses span {min(finals):.4f}..{max(finals):.4f} ({100 * spread:.1f}% spread)"
          + ("" if spread < 0.1 else "  <-- WARNING: not the same ballpark"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": harness.command(__file__),
        "settings": {**SETTINGS, "target_modules": TARGETS, "optimizer": "torch.optim.AdamW (non-fused)",
                     "steps": args.steps, "warmup_steps_excluded": args.warmup, "repeats": args.repeats,
                     "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                               "intermediate_size": 2 * args.hidden},
                     "data": {k: prep[k]
                              for k in ("data_summary", "examples", "length_min", "length_median", "length_max")}},
        "versions": harness.versions(), "loadavg_at_end": os.getloadavg(), "total_s": time.time() - t_start,
        "summary": summary, "table_markdown": table,
        "runs": [{k: (round(v, 2) if isinstance(v, float) else
                      [round(x, 4) if isinstance(x, float) else x for x in v] if isinstance(v, list) else v)
                  for k, v in r.items()} for r in runs],
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nraw results: {args.out}", file=sys.stderr)
    harness.close_workdir(tmp, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
