"""Every fine-tuning method on the demo's task: what trains, what it costs, what it learns and what it forgets.

The setting is the README's demo (examples/demo.yaml): SmolLM2-135M-Instruct, the new task of terse metric unit
conversions (examples/data/units_*.jsonl), the retention suite ``general_qa`` (the model's own answers to general
prompts, NLL of its first 64), 30 optimizer steps of 8 sequences (4 x 2 accumulation, one process, ZeRO-2, fp32,
cosine with 10% warmup), seed 42. Each method runs at a learning rate usual for it (``METHODS`` below, with the
source of each), in a fresh process that runs the real CLI (``distrib-ft train --launcher local``) with
``OMP_NUM_THREADS`` = ``--threads``; the methods run one after another, ``--repeats`` rounds in a rotated order.

Per run, from the job's own outputs: trainable parameters (summary.json), training tokens/s (median over the
logging windows after the first, metrics.jsonl: evaluation and checkpoints excluded), peak RSS of the process
(``ru_maxrss``: model, optimizer, activations, data), the new task's eval loss at step 0 and at the end, and the
retention suite's NLL at step 0 and at the end (report.json). Reported per method: the medians over repeats of
the step time relative to LoRA's *in the same round* (a ratio, which cancels most of the machine's load), peak
RSS, eval loss, and the relative change of the retention NLL; and a plot of new-task gain against forgetting.

Usage::

    python bench/methods.py --repeats 1 --out bench/results/methods.json      # ~25 min on 2 cores
    python bench/methods.py --only lora prompt_tuning --merge-into bench/results/methods.json
    python bench/methods.py --table-from bench/results/methods.json     # the table and plot again, from the runs
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "methods.json"

# name -> (method section, learning rate, why this learning rate)
METHODS: dict[str, tuple[dict, float, str]] = {
    "full": ({"type": "full"}, 2e-5, "full SFT of small models: 1e-5 to 3e-5"),
    "lora": ({"type": "lora", "r": 16, "lora_alpha": 32}, 5e-4, "the demo's; ~10x full (Biderman et al. 2024)"),
    "dora": ({"type": "lora", "r": 16, "lora_alpha": 32, "use_dora": True}, 5e-4, "as LoRA (Liu et al. 2024)"),
    "qlora_4bit": ({"type": "qlora", "r": 16, "lora_alpha": 32, "bits": 4}, 5e-4, "as LoRA (Dettmers et al. 2023)"),
    "houlsby": ({"type": "adapter", "adapter_type": "houlsby"}, 1e-3, "1e-4 to 1e-3 (Houlsby et al. 2019)"),
    "pfeiffer": ({"type": "adapter", "adapter_type": "pfeiffer"}, 1e-3, "1e-4 to 1e-3 (Pfeiffer et al. 2020)"),
    "bitfit": ({"type": "bitfit", "add_bias": True}, 1e-3, "1e-4 to 1e-3 (Ben Zaken et al. 2022)"),
    "prompt_tuning": ({"type": "prompt_tuning", "num_virtual_tokens": 20}, 3e-2,
                      "3e-2 (peft's examples; Lester et al. 2021 used 0.3 with Adafactor)"),
    "head_only": ({"type": "partial", "top_k_layers": 0}, 1e-4, "a linear probe's usual range"),
    "top2_layers": ({"type": "partial", "top_k_layers": 2}, 5e-5, "between full and head only"),
    "frozen_embeddings": ({"type": "partial"}, 2e-5, "as full"),
    "layerwise_lr": ({"type": "full", "layerwise_lr_decay": 0.8}, 2e-5, "as full, d = 0.8 (ELECTRA's range)"),
}


def job_yaml(folder: Path, name: str, threads: int) -> tuple[Path, list[str]]:
    """The demo job on one process, and the overrides of method ``name``."""
    import yaml

    section, lr, _ = METHODS[name]
    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    raw["method"] = section
    raw["data"]["train_files"] = [str(ROOT / "examples" / "data" / "units_train.jsonl")]
    raw["data"]["eval_files"] = [str(ROOT / "examples" / "data" / "units_eval.jsonl")]
    raw["monitor"]["suites"][0]["files"] = [str(ROOT / "examples" / "data" / "general_qa.jsonl")]
    raw["monitor"].update({"eval_at": [0], "policy": "report"})
    raw["monitor"]["suites"][0].pop("max_relative_increase", None)  # measured, not gated: final/ is the last step
    raw["training"].update({"output_dir": str(folder / "out"), "learning_rate": lr, "gradient_accumulation_steps": 2,
                            "save_steps": 0, "logging_steps": 5})
    raw["distributed"] = {"num_workers": 1, "deepspeed": str(ROOT / "ds_configs" / "zero2.json"),
                          "cpus_per_worker": threads}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, []


def worker(spec_path: str) -> None:
    """In a fresh process: run the job through the CLI, then write what it measured."""
    spec = json.loads(Path(spec_path).read_text())
    from launcher.cli import main

    started = time.time()
    code = main(["train", spec["job"], "--launcher", "local"])
    out = Path(spec["out"])
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "report.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_second"] for r in lines if "tokens_per_second" in r][1:]
    result = {"exit_code": code, "wall_seconds": time.time() - started,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "trainable": summary["trainable_parameters"], "total": summary["total_parameters"],
              "tokens_per_second": statistics.median(tps), "eval_loss_start": summary["eval_loss_start"],
              "eval_loss": summary["eval_loss"], "report": report, "seconds": summary["seconds"]}
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


def run_one(name: str, threads: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-methods-{name}-"))
    job, _ = job_yaml(folder, name, threads)
    spec = {"job": str(job), "out": str(folder / "out"), "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    env = harness.worker_env(threads)  # thread counts, CPU accelerator, no leftover launch variables
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(folder / "spec.json")], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (folder / "result.json").exists():
        raise SystemExit(f"{name}: the run failed (exit {proc.returncode}); see {folder / 'log.txt'}")
    result = json.loads((folder / "result.json").read_text())
    result["folder"] = str(folder)
    return result


def retention_values(result: dict) -> tuple[float, float]:
    """The retention suite's NLL at step 0 and at the end of the run (report.json)."""
    suite = result["report"]["suites"]["general_qa"]
    return suite["baseline"], suite["evaluations"][-1]["value"]


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    lora_tps = {r["round"]: r["tokens_per_second"] for r in runs.get("lora", [])}
    # The base model's general_qa NLL: LoRA's step 0 (B = 0). Prompt tuning's step 0 already carries its initial
    # prompt, so its own baseline is not the base's; both changes are reported.
    base = statistics.median(r["retention_start"] for r in runs["lora"])
    base_eval = statistics.median(r["eval_loss_start"] for r in runs["lora"])
    for name, rs in runs.items():
        ratio = [lora_tps[r["round"]] / r["tokens_per_second"] for r in rs if r["round"] in lora_tps]
        rows.append({
            "method": name, "learning_rate": METHODS[name][1], "trainable": rs[0]["trainable"],
            "trainable_share": rs[0]["trainable"] / rs[0]["total"],
            "step_time_vs_lora": statistics.median(ratio) if ratio else None,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            "eval_loss_start": rs[0]["eval_loss_start"],
            "eval_loss": statistics.median(r["eval_loss"] for r in rs),
            "gain_vs_base": base_eval - statistics.median(r["eval_loss"] for r in rs),
            "retention_start": rs[0]["retention_start"],
            "retention_change": statistics.median(r["retention_change"] for r in rs),
            "retention_change_vs_base": statistics.median(r["retention_end"] / base - 1 for r in rs),
            "runs": len(rs)})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| method | LR | trainable | share | step time / LoRA | peak RSS (MiB) | new-task eval loss (start -> end) "
            "| general_qa NLL change (vs the base) |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        ratio = f"{r['step_time_vs_lora']:.2f}" if r["step_time_vs_lora"] is not None else "-"
        body += (f"| {r['method']} | {r['learning_rate']:g} | {r['trainable']:,} | {100 * r['trainable_share']:.3f}% "
                 f"| {ratio} | {r['peak_rss_mib']:.0f} | {r['eval_loss_start']:.3f} -> {r['eval_loss']:.3f} "
                 f"| {100 * r['retention_change']:+.1f}% ({100 * r['retention_change_vs_base']:+.1f}%) |\n")
    return head + body


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        gain = r["gain_vs_base"]
        ax.scatter(100 * r["retention_change_vs_base"], gain)
        ax.annotate(r["method"], (100 * r["retention_change_vs_base"], gain), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("forgetting: general_qa NLL change vs the base model (%)  (right = worse)")
    ax.set_ylabel("new-task gain from the base (nats/token)")
    ax.set_title("SmolLM2-135M-Instruct, demo task, 30 steps: gain vs forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=sorted(METHODS), default=None, help="a subset of the methods")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the methods (order rotated)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--merge-into", type=Path, default=None, help="add these runs to an earlier results file")
    p.add_argument("--table-from", type=Path, default=None, help="print the table of a results file and exit")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.table_from:  # recompute the rows and the plot from the runs
        data = json.loads(args.table_from.read_text())
        data["rows"] = summarise({n: data["runs"][n] for n in METHODS if n in data["runs"]})
        args.table_from.write_text(json.dumps(data, indent=1))
        plot(data["rows"], args.table_from.with_suffix(".png"))
        print(table(data["rows"]))
        return None
    names = args.only or list(METHODS)
    if "lora" not in names:
        names = ["lora", *names]  # the reference of every ratio, in the same round
    old = json.loads(args.merge_into.read_text()) if args.merge_into else {"runs": {}}
    runs: dict[str, list[dict]] = {k: v for k, v in old["runs"].items() if k not in names}
    first_round = 1 + max((r["round"] for rs in old["runs"].values() for r in rs), default=-1)
    for rnd in range(args.repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            t0 = time.time()
            r = run_one(name, args.threads)
            start, end = retention_values(r)
            r.update({"round": first_round + rnd, "retention_start": start, "retention_end": end,
                      "retention_change": end / start - 1})
            r.pop("report")
            runs.setdefault(name, []).append(r)
            partial = (args.merge_into or args.out).with_suffix(".partial.json")
            partial.write_text(json.dumps({"runs": runs}, indent=1))  # kept if a later run fails
            print(f"[round {rnd}] {name}: {r['trainable']:,} trainable, {r['tokens_per_second']:.0f} tok/s, "
                  f"eval {r['eval_loss_start']:.3f} -> {r['eval_loss']:.3f}, general_qa {start:.3f} -> {end:.3f} "
                  f"({100 * r['retention_change']:+.1f}%), {time.time() - t0:.0f} s", flush=True)
    rows = summarise({n: runs[n] for n in METHODS if n in runs})
    out = args.merge_into or args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "methods": {k: [v[0], v[1], v[2]] for k, v in
                                                                         METHODS.items()},
                               "rows": rows, "runs": runs}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    return None


if __name__ == "__main__":
    main()
