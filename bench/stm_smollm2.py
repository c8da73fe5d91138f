"""Selective Token Masking (STM) on a real pretrained model: SmolLM2-135M-Instruct, LoRA, units task.

``bench/replay_forgetting.py`` measured STM on a tiny from-scratch model that knows nothing of its new
task (tau 2.5 masked 95% of the target tokens). STM (Wu et al. 2025) is meant for a base that is
already partly competent on the new data, so this bench runs it on the project's demo setting:

- model ``offline:SmolLM2-135M-Instruct`` (``distrib_ft.assets.smollm2_path()``), LoRA r16 alpha 32
  on all projections, lr 5e-4 cosine with 10% warmup, max_seq_length 128, fp32 (training.bf16=false);
- new task ``examples/data/units_train.jsonl`` (alpaca, 400 terse unit conversions), held-out
  ``units_eval.jsonl`` (``data.eval_files``: the new-task ``eval_loss``);
- old skills: the retention suite ``examples/data/general_qa.jsonl`` (the model's own greedy answers
  to 100 general prompts), metric nll; its rise is the forgetting;
- arms: ``data.token_masking.mode`` = off | stm (tau 2.5) | random (as many tokens masked at random:
  the control), each per seed (``training.seed``: the data order and the random control's mask);
- world of one (``distributed.num_workers: 1``, ZeRO-2 ``ds_configs/zero2.json``, DS_ACCELERATOR=cpu),
  every run in its own fresh subprocess with OMP_NUM_THREADS=1, at most ``--parallel`` (2) at once;
  ``--steps`` optimizer steps of per_device_train_batch_size 8; evaluations at steps 0, 10, 20 and
  at the end (``monitor.eval_at``, training.eval_steps 0), policy report (no checkpoints).

The base-model pass of STM (``output_dir/token_masking/base_nll-*.npz``) is made by the first masking
run and copied into the later masking runs' output dirs (its cache key is the model and the data
fingerprint, the same for every seed). From it the bench also reports how competent the base is on
the new data: the fraction of target tokens with perplexity exp(NLL) > tau, quantiles of the
per-token perplexity, and which kinds of tokens are above tau.

Reported per arm: masked fraction, general_qa NLL at step 0 and at the end (and its relative change),
new-task eval_loss at step 0 and at the end: the median over seeds, and every seed's value.

Usage (from the repository root)::

    .venv/bin/python bench/stm_smollm2.py --seeds 0 1 --steps 30
    .venv/bin/python bench/stm_smollm2.py --table-from bench/results/stm_smollm2.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

harness.limit_own_threads(1)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from harness import ROOT  # noqa: E402
from harness import median as med  # noqa: E402

DATA = ROOT / "examples" / "data"
DEFAULT_OUT = ROOT / "bench" / "results" / "stm_smollm2.json"
ARMS = ["off", "stm", "random"]
TAU = 2.5


def job_dict(out: Path, mode: str, seed: int, steps: int, tau: float) -> dict:
    # train() does not resolve ``offline:SmolLM2-135M-Instruct`` (only launcher/cli.py does): the local folder
    from distrib_ft.assets import smollm2_path

    raw = harness.job_dict(
        smollm2_path(), {"type": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        {"train_files": [str(DATA / "units_train.jsonl")], "eval_files": [str(DATA / "units_eval.jsonl")],
         "format": "alpaca", "max_seq_length": 128},
        {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 8,
         "gradient_accumulation_steps": 1, "learning_rate": 5e-4, "lr_scheduler_type": "cosine",
         "warmup_ratio": 0.1, "bf16": False, "logging_steps": 5, "eval_steps": 0, "save_steps": 0,
         "seed": seed},
        zero=2,
        monitor={"suites": [{"name": "general_qa", "files": [str(DATA / "general_qa.jsonl")], "format": "alpaca",
                             "metric": "nll"}],
                 "eval_at": [0, 10, 20], "policy": "report"})
    if mode != "off":
        raw["token_masking"] = {"mode": mode, "threshold": tau}
    return raw


# ------------------------------------------------------------------------------------ one run (child)

def worker_main(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    from distrib_ft.runtime.metrics import read_metrics

    out = Path(spec["out"])
    raw = job_dict(out, spec["mode"], spec["seed"], spec["steps"], spec["tau"])
    summary, train_s = harness.train_job(raw)
    metrics = read_metrics(out / "metrics.jsonl")
    evals = [r for r in metrics if "eval_loss" in r]
    res = {"mode": spec["mode"], "seed": spec["seed"], "steps": summary["steps"], "train_s": train_s,
           "token_masking": summary.get("token_masking"),
           "masked_fraction": next((r["masked_fraction"] for r in metrics if "masked_fraction" in r), 0.0),
           "eval_curve": [{"step": r["step"], "eval_loss": r["eval_loss"],
                           "general_qa": r["retention/general_qa"]} for r in evals],
           "loss_curve": [(r["step"], r["loss"]) for r in metrics if "loss" in r],
           "summary": {k: summary.get(k) for k in ("steps", "tokens_seen", "trainable_parameters",
                                                   "total_parameters", "decision", "eval_loss_start", "eval_loss")},
           "config": raw}
    first, last = evals[0], evals[-1]
    res.update(qa_start=first["retention/general_qa"], qa_end=last["retention/general_qa"],
               eval_start=first["eval_loss"], eval_end=last["eval_loss"], end_step=last["step"])
    res["qa_rel_change"] = res["qa_end"] / res["qa_start"] - 1
    harness.write_result(spec, res, indent=1)
    shutil.rmtree(out / "final", ignore_errors=True)  # the adapter is not needed


# ------------------------------------------------------------------------------------ scheduling

def run_all(seeds: list[int], steps: int, tau: float, parallel: int, work: Path, shared: Path) -> list[dict]:
    # stm of the first seed first: it makes the base-model pass that every later masking run reuses
    pending = [(m, s) for s in seeds for m in ARMS]
    pending.sort(key=lambda j: (j != ("stm", seeds[0]), j[1], ARMS.index(j[0])))
    running: dict[str, harness.Worker] = {}
    results = []

    def cache_ready() -> bool:
        return any(shared.glob("base_nll-*.npz"))

    def launch(mode: str, seed: int) -> None:
        tag = f"{mode}-s{seed}"
        out = work / tag
        if mode != "off" and cache_ready():
            (out / "token_masking").mkdir(parents=True, exist_ok=True)
            for f in shared.glob("base_nll-*.npz"):
                shutil.copy(f, out / "token_masking" / f.name)
        spec = {"out": str(out), "mode": mode, "seed": seed, "steps": steps, "tau": tau}
        running[tag] = harness.start_worker(__file__, spec, work / tag, threads=1)
        print(f"[{time.strftime('%H:%M:%S')}] start {tag}", flush=True)

    while pending or running:
        while pending and len(running) < parallel:
            masking_running = any(w.spec["mode"] != "off" for w in running.values())
            pick = next((j for j in pending if j[0] == "off" or cache_ready() or not masking_running), None)
            if pick is None:
                break
            pending.remove(pick)
            launch(*pick)
        time.sleep(2)
        for tag, w in list(running.items()):
            if w.running():
                continue
            del running[tag]
            res = w.finish()
            res["wall_s"] = time.time() - w.started
            spec = w.spec
            text = w.log_path.read_text()
            res["base_pass_cached"] = "base-model NLL from" in text if spec["mode"] != "off" else None
            results.append(res)
            if spec["mode"] != "off" and not cache_ready():
                shared.mkdir(parents=True, exist_ok=True)
                for f in (Path(spec["out"]) / "token_masking").glob("base_nll-*.npz"):
                    shutil.copy(f, shared / f.name)
            print(f"[{time.strftime('%H:%M:%S')}] done {tag} ({res['wall_s']:.0f}s): "
                  f"masked {res['masked_fraction']:.1%}, "
                  f"general_qa {res['qa_start']:.4f} -> {res['qa_end']:.4f} ({res['qa_rel_change']:+.1%}), "
                  f"eval {res['eval_start']:.4f} -> {res['eval_end']:.4f}", flush=True)
    return results


# ------------------------------------------------------------------------------------ base competence

def base_competence(npz: Path, tau: float) -> dict:
    import numpy as np

    with np.load(npz) as f:
        values, offsets = f["values"], f["offsets"]
    nll = values[~np.isnan(values)].astype(np.float64)
    ppl = np.exp(nll)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
    res = {"file": npz.name, "examples": int(len(offsets) - 1), "target_tokens": int(nll.size),
           "fraction_above_tau": float((ppl > tau).mean()), "tau": tau,
           "mean_nll": float(nll.mean()), "ppl_quantiles": {str(q): float(np.quantile(ppl, q)) for q in qs}}
    # which tokens are above tau: rebuild the training data (same tokenizer and rendering as train())
    try:
        from distrib_ft.assets import smollm2_path
        from distrib_ft.data.formats import build_dataset
        from distrib_ft.model import load_tokenizer

        tok = load_tokenizer(str(smollm2_path()), False)
        ds, _ = build_dataset([str(DATA / "units_train.jsonl")], fmt="alpaca", tokenizer=tok, max_seq_length=128,
                              prompt_template="auto", text_field="text", packing=False, streaming=False)
        kinds: dict[str, list[int]] = {}
        above_ex = []
        for i in range(len(ds)):
            v = values[offsets[i]:offsets[i + 1]]
            ids = ds[i]["input_ids"]
            if len(ids) != len(v):
                raise ValueError(f"example {i}: {len(ids)} tokens, {len(v)} NLL entries")
            n_above = 0
            for t in np.flatnonzero(~np.isnan(v)):
                piece = tok.decode([ids[t]])
                kind = ("<|im_end|>" if piece == "<|im_end|>" else "digit" if piece.strip().isdigit()
                        else "punct ('.', '=', ' ')" if piece.strip() in ("", ".", "=", ",") else "unit/word")
                above = bool(math.exp(v[t]) > tau)
                n_above += above
                k = kinds.setdefault(kind, [0, 0])
                k[0] += 1
                k[1] += above
            above_ex.append(n_above)
        res["by_kind"] = {k: {"targets": a, "above_tau": b, "fraction_above": b / a} for k, (a, b) in kinds.items()}
        res["examples_with_any_above_tau"] = float(np.mean([n > 0 for n in above_ex]))
        # a few examples, the tokens above tau marked [..]
        shown = []
        for i in range(3):
            v = values[offsets[i]:offsets[i + 1]]
            ids = ds[i]["input_ids"]
            pieces = [(f"[{tok.decode([ids[t]])}]" if math.exp(v[t]) > tau else tok.decode([ids[t]]))
                      for t in np.flatnonzero(~np.isnan(v))]
            shown.append("".join(pieces))
        res["examples_marked"] = shown
    except Exception as e:  # noqa: BLE001 -- the breakdown is extra; the fractions above stand
        res["by_kind_error"] = repr(e)
    return res


# ------------------------------------------------------------------------------------ tables

def table(doc: dict) -> str:
    runs = doc["runs"]
    seeds = doc["settings"]["seeds"]
    lines = ["| arm | masked fraction | general_qa NLL step 0 | general_qa NLL end | relative change | "
             "units eval_loss step 0 | units eval_loss end |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = sorted([r for r in runs if r["mode"] == arm], key=lambda r: r["seed"])
        if not rs:
            continue

        def cell(key, fmt, rs=rs):
            vals = [r[key] for r in rs]
            return harness.with_spread(med(vals), vals, fmt)

        name = {"off": "off (plain LoRA)", "stm": f"stm (tau {doc['settings']['tau']})",
                "random": "random (control)"}[arm]
        lines.append(f"| {name} | {cell('masked_fraction', '.1%')} | {cell('qa_start', '.4f')} | "
                     f"{cell('qa_end', '.4f')} | {cell('qa_rel_change', '+.1%')} | "
                     f"{cell('eval_start', '.4f')} | {cell('eval_end', '.4f')} |")
    lines.append("")
    lines.append(f"Median over seeds {', '.join(map(str, seeds))}; per-seed values in brackets (seed order "
                 f"{'/'.join(map(str, seeds))}). End = step {runs[0]['end_step']}.")
    return "\n".join(lines)


def competence_text(c: dict) -> str:
    q = c["ppl_quantiles"]
    s = (f"Base model on the new training data ({c['target_tokens']:,} target tokens in {c['examples']} examples): "
         f"{c['fraction_above_tau']:.1%} have perplexity exp(NLL) > tau {c['tau']}; mean NLL {c['mean_nll']:.3f}; "
         f"per-token perplexity quantiles " + ", ".join(f"q{float(k) * 100:g} {v:.2f}" for k, v in q.items()) + ".")
    if "by_kind" in c:
        s += " Above tau by token kind: " + ", ".join(
            f"{k} {v['above_tau']}/{v['targets']} ({v['fraction_above']:.0%})" for k, v in c["by_kind"].items()) + "."
        s += f" Examples with at least one token above tau: {c['examples_with_any_above_tau']:.0%}."
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tau", type=float, default=TAU)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (each 1 OMP thread)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=None, help="output dirs of the runs (default: a temp dir, removed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--table-from", type=Path, help="print the table of a results JSON and exit")
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker)
        return
    if a.table_from:
        doc = json.loads(a.table_from.read_text())
        print(table(doc))
        print()
        print(competence_text(doc["base_competence"]))
        return
    t0 = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="stm_smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    shared = work / "base_cache"
    results = run_all(a.seeds, a.steps, a.tau, a.parallel, work, shared)
    npz = next(shared.glob("base_nll-*.npz"))
    comp = base_competence(npz, a.tau)
    doc = {"command": harness.command(__file__),
           "settings": {"seeds": a.seeds, "steps": a.steps, "tau": a.tau, "parallel": a.parallel,
                        "model": "offline:SmolLM2-135M-Instruct", "method": "LoRA r16 alpha 32, all projections",
                        "lr": 5e-4, "scheduler": "cosine, warmup 10%", "per_device_train_batch_size": 8,
                        "world": 1, "deepspeed": "ds_configs/zero2.json", "bf16": False, "max_seq_length": 128,
                        "eval_at": [0, 10, 20, "end"], "threads_per_run": 1,
                        "train": "examples/data/units_train.jsonl", "eval": "examples/data/units_eval.jsonl",
                        "retention": "examples/data/general_qa.jsonl (nll)"},
           "versions": harness.versions(("torch", "transformers", "peft", "deepspeed", "datasets", "numpy"),
                                        machine=False), "total_wall_s": time.time() - t0,
           "base_competence": comp,
           "runs": sorted(results, key=lambda r: (ARMS.index(r["mode"]), r["seed"]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print()
    print(competence_text(comp))
    print(f"total {doc['total_wall_s']:.0f}s; results in {a.out}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
