"""A small forgetting experiment: does EWC keep an old skill while a new one is learned, per estimator?

1. A tiny Llama built from a config (``distrib_ft.tiny``; hidden 64, 2 layers) is trained from scratch on
   the OLD skill with ``distrib_ft.runtime.loop.train`` (full fine-tuning, ZeRO-0, fp32) until it is good;
   its ``final/`` folder is the base of step 2.
2. From that base, full fine-tuning on the NEW skill, with a learning rate that makes it forget the
   old one, for every estimator (empirical, sampled, batched) and lambda over several decades
   (lambda 0 is plain fine-tuning): ``ewc: {lambda: L, estimator: E, fisher_data_files: [old_train.jsonl],
   fisher_max_sequences: 256}``. Also plain fine-tuning stopped after ``--plain-steps`` steps: the "train
   less" frontier that EWC has to beat. Each run is evaluated from its saved ``final/`` model; the old
   skill's NLL is also followed during training (the loop's evaluation of ``data.eval_files`` =
   the old held-out set; ``eval_curve`` in the JSON).

Skills (alpaca records, rendered with the tiny tokenizer's ChatML template; letters from an alphabet
whose pairs the tokenizer never merges, so every letter is one token; held-out strings never occur
in the training data):

- OLD: ``reverse: abgk`` -> ``kgba``
- NEW: ``upper: abgk`` -> ``ABGK``

Measures (on 200 held-out prompts per skill): token NLL of the reference answer (mean over answer
tokens incl. ``<|im_end|>``), and greedy exact match: the whole answer and ``<|im_end|>`` reproduced
by greedy decoding. Greedy EM is computed in one teacher-forced forward pass (argmax at every answer
position equals the reference: greedy decoding reproduces the reference iff that holds), and checked
against a real token-by-token greedy decode on a sample of prompts (``greedy_check`` in the JSON).

Runs in ``--workers`` processes (OMP_NUM_THREADS=1 each), each running its share of the jobs
in-process one after the other.

Usage::

    python bench/ewc_forgetting.py --seeds 0 1          # 66 runs, ~6.5 min on 2 quiet cores
    python bench/ewc_forgetting.py --table-from bench/results/ewc_forgetting.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "ewc_forgetting.json"
ESTIMATORS = ("empirical", "sampled", "batched")
DEFAULT_LAMBDAS = [1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10]
MODEL = dict(hidden_size=64, num_layers=2, num_heads=4)
BASE = dict(steps=500, lr=3e-3, batch=16, scheduler="cosine", warmup_ratio=0.05)
NEW = dict(steps=600, lr=1e-3, batch=16, scheduler="constant")


# --------------------------------------------------------------------------------------------- data

def alphabet(tok) -> str:
    """Lowercase letters no two of which the tokenizer merges, and whose uppercase forms are not merged either.

    So each letter is one token, in any order.
    """
    letters: list[str] = []
    for c in string.ascii_lowercase:
        cand = letters + [c]
        ok = all(len(tok(a + b, add_special_tokens=False)["input_ids"]) == 2
                 for x in cand for y in cand for a, b in ((x, y), (x.upper(), y.upper())))
        if ok:
            letters.append(c)
    return "".join(letters)


def make_tasks(work: Path, tok, n_train: int, n_eval: int, seed: int = 0) -> dict:
    """old/new train and held-out JSONL files; held-out letter strings never occur in training."""
    letters = alphabet(tok)
    rng = random.Random(seed)
    pool: set[str] = set()
    while len(pool) < 2 * n_train + 2 * n_eval:
        pool.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 5))))
    strings = sorted(pool)
    rng.shuffle(strings)
    held = strings[:2 * n_eval]
    train = strings[2 * n_eval:]
    tasks = {"old": ("reverse", lambda s: s[::-1]), "new": ("upper", lambda s: s.upper())}
    files = {}
    for i, (name, (verb, fn)) in enumerate(tasks.items()):
        for split, items in (("train", train[i::2][:n_train]), ("eval", held[i::2][:n_eval])):
            path = work / f"{name}_{split}.jsonl"
            with open(path, "w") as f:
                for s in items:
                    f.write(json.dumps({"instruction": f"{verb}: {s}", "input": "", "output": fn(s)}) + "\n")
            files[f"{name}_{split}"] = str(path)
    files["alphabet"] = letters
    return files


# ------------------------------------------------------------------------------------------- eval

def load_eval_sets(model_dir: str, files: dict) -> dict:
    from distrib_ft.data.formats import build_dataset
    from distrib_ft.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    out = {}
    for name in ("old", "new"):
        ds, _ = build_dataset([files[f"{name}_eval"]], fmt="alpaca", tokenizer=tok, max_seq_length=64)
        out[name] = [ds[i] for i in range(len(ds))]
    return out


def evaluate_model(model_dir: str, eval_sets: dict, greedy_sample: int = 0) -> dict:
    """Per skill: mean answer-token NLL and greedy exact match (teacher-forced argmax, see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distrib_ft.data.formats import collate
    from distrib_ft.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = {}
    with torch.no_grad():
        for name, examples in eval_sets.items():
            nll_sum = n_tok = hits = 0.0
            for i in range(0, len(examples), 64):
                b = collate(examples[i:i + 64], tok.pad_token_id)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                labels = b["labels"][:, 1:]
                mask = labels != -100
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
                nll_sum += float((nll * mask).sum())
                n_tok += float(mask.sum())
                correct = (logits.argmax(-1) == labels) | ~mask
                hits += float(correct.all(dim=1).sum())
            res[name] = {"nll": nll_sum / n_tok, "em": hits / len(examples)}
        if greedy_sample:
            res["greedy_check"] = greedy_check(model, tok, eval_sets, greedy_sample)
    return res


def greedy_decode(model, prompt_ids: list[int], eos_id: int, max_new: int = 12) -> list[int]:
    import torch

    ids = list(prompt_ids)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos_id:
            break
    return ids[len(prompt_ids):]


def greedy_check(model, tok, eval_sets: dict, n: int) -> dict:
    """Real greedy decoding of the first ``n`` prompts of each skill.

    Per skill: EM, agreement with the teacher-forced EM, and a few decoded answers.
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, examples in eval_sets.items():
            agree = em = 0
            shown = []
            for e in examples[:n]:
                labels = e["labels"]
                first = next(i for i, x in enumerate(labels) if x != -100)
                last = max(i for i, x in enumerate(labels) if x != -100)
                ref = list(e["input_ids"][first:last + 1])
                gen = greedy_decode(model, e["input_ids"][:first], tok.eos_token_id, max_new=len(ref) + 4)
                hit = gen == ref
                logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
                tf = bool((logits.argmax(-1)[first - 1:last] == torch.tensor(ref)).all())
                em += hit
                agree += hit == tf
                if len(shown) < 3:
                    prompt = tok.decode(e["input_ids"][:first]).split("user\n")[-1].split("<|im_end|>")[0]
                    shown.append({"prompt": prompt, "reference": tok.decode(ref), "greedy": tok.decode(gen)})
            out[name] = {"em": em / n, "agrees_with_teacher_forced": agree / n, "examples": shown}
    return out


# ------------------------------------------------------------------------------------------ workers

def job_dict(model_dir: str, train_file: str, eval_file: str, out: Path, steps: int, lr: float, batch: int,
             scheduler: str, seed: int, warmup_ratio: float = 0.0, eval_steps: int = 0) -> dict:
    """The job of one run of this setting: full fine-tuning, ZeRO-0, fp32, one thread; evaluated on ``eval_file``."""
    return harness.job_dict(
        model_dir, {"type": "full"},
        {"train_files": [train_file], "eval_files": [eval_file], "max_seq_length": 64},
        {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": batch,
         "learning_rate": lr, "lr_scheduler_type": scheduler, "warmup_ratio": warmup_ratio,
         "weight_decay": 0.0, "bf16": False, "logging_steps": 25, "save_steps": 0,
         "eval_steps": eval_steps, "seed": seed},
        zero=0, threads=1, dtype="float32")


def run_job(job: dict, files: dict, eval_sets: dict) -> dict:
    from distrib_ft.preservation.fisher import load_fisher
    from distrib_ft.runtime.metrics import read_metrics

    out = Path(job["out"])
    if out.exists():
        shutil.rmtree(out)
    raw = job_dict(job["model_dir"], job["train_file"], job["eval_file"], out, job["steps"], job["lr"], job["batch"],
                   job["scheduler"], job["seed"], job.get("warmup_ratio", 0.0), job.get("eval_steps", 0))
    if job.get("lambda") is not None:
        raw["ewc"] = {"lambda": job["lambda"], "estimator": job["estimator"], "fisher_data_files": [files["old_train"]],
                      "fisher_max_sequences": job["fisher_max_sequences"]}
    summary, train_s = harness.train_job(raw)
    res = {**{k: job.get(k) for k in ("name", "estimator", "lambda", "seed", "steps")}, "train_s": train_s,
           "eval_loss_start": summary.get("eval_loss_start"), "eval_loss_end": summary.get("eval_loss")}
    metrics = read_metrics(out / "metrics.jsonl")
    res["eval_curve"] = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]  # on eval_file
    res["loss_curve"] = [(r["step"], r["loss"], r.get("ewc_penalty")) for r in metrics if "loss" in r]
    state = out / "ewc_state.safetensors"
    if state.exists():
        fisher, _, info = load_fisher(state)
        flat = [t.flatten() for t in fisher.values()]
        import torch

        allf = torch.cat(flat)
        res["fisher"] = {"trace": float(allf.sum()), "max": float(allf.max()), "median": float(allf.median()),
                         "sequences": info.get("sequences"), "target_tokens": info.get("target_tokens")}
    res.update(evaluate_and_clean(out, eval_sets, job.get("greedy_sample", 0), keep=job.get("keep", False)))
    return res


def evaluate_and_clean(out: Path, eval_sets: dict, greedy_sample: int, keep: bool = False) -> dict:
    """Evaluate a run's saved ``final/`` model (:func:`evaluate_model`), then delete its checkpoints and weights.

    The deletion (a sweep would fill the disk) is skipped with ``keep``.
    """
    res = evaluate_model(str(out / "final"), eval_sets, greedy_sample=greedy_sample)
    if not keep:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for f in (out / "final").glob("*.safetensors"):
            f.unlink()
    return res


def _done(r: dict) -> str:
    return f": old EM {r['old']['em']:.2f}, new EM {r['new']['em']:.2f}"


def worker_main(spec_path: str, run=run_job, done=_done) -> None:
    """A worker of :func:`run_workers`: its jobs one after the other, ``run(job, files, eval_sets)`` each.

    The results so far are written after every job, and ``done {name}`` + ``done(result)`` printed to the log.
    """
    spec = harness.read_spec(spec_path)
    eval_sets = load_eval_sets(spec["eval_model_dir"], spec["files"])
    results = []
    for job in spec["jobs"]:
        results.append(run(job, spec["files"], eval_sets))
        harness.write_result(spec, results)
        print(f"done {job['name']}{done(results[-1])}", file=sys.stderr, flush=True)


def build_table(record: dict) -> dict:
    """Mean over seeds per (estimator, lambda) and per plain run length: the markdown table and a summary."""
    st, base, runs = record["settings"], record["base"], record["runs"]
    new_steps, estimators, lambdas = st["new"]["steps"], st["estimators"], st["lambdas"]
    b_old, b_new = base["old"], base["new"]
    rows, summary = [], {}
    keys = ([("plain", 0.0, n) for n in sorted({*st["plain_steps"], new_steps})] +
            [(e, lam, new_steps) for e in estimators for lam in lambdas])
    for e, lam, steps in keys:
        rs = sorted((r for r in runs if (r["estimator"] or "plain") == e and (r["lambda"] or 0.0) == lam
                     and r["steps"] == steps), key=lambda r: r["seed"])
        if not rs:
            continue
        agg = {"old_nll_ratio": statistics.mean(r["old"]["nll"] / b_old["nll"] for r in rs),
               "old_em": statistics.mean(r["old"]["em"] for r in rs),
               "new_nll": statistics.mean(r["new"]["nll"] for r in rs),
               "new_em": statistics.mean(r["new"]["em"] for r in rs),
               "old_nll": statistics.mean(r["old"]["nll"] for r in rs), "seeds": len(rs),
               "per_seed": {r["seed"]: {"old_em": r["old"]["em"], "new_em": r["new"]["em"]} for r in rs}}
        if e != "plain":
            agg["lambda_x_trace"] = statistics.mean(lam * r["fisher"]["trace"] for r in rs)
            agg["fisher_trace"] = statistics.mean(r["fisher"]["trace"] for r in rs)
        summary[f"{e}/{fmt_lam(lam)}" + ("" if steps == new_steps else f"/{steps}steps")] = agg
        lt = "-" if e == "plain" else f"{agg['lambda_x_trace']:.3g}"
        label = e if e != "plain" else ("none (plain FT)" if steps == new_steps else f"none, stopped at step {steps}")
        rows.append(f"| {label} | {fmt_lam(lam)} | {lt} | {agg['old_nll']:.3f} | {agg['old_nll_ratio']:.0f} | "
                    f"{harness.with_spread(agg['old_em'], [r['old']['em'] for r in rs], '.2f')} | "
                    f"{agg['new_nll']:.3f} | "
                    f"{harness.with_spread(agg['new_em'], [r['new']['em'] for r in rs], '.2f')} |")
    head = (f"| EWC estimator | lambda | lambda x trace(F) | old NLL | old NLL / base | old EM | new NLL | new EM |\n"
            f"|---|---|---|---|---|---|---|---|\n"
            f"| (base, before step 2) | - | - | {b_old['nll']:.3f} | 1 | {b_old['em']:.2f} | "
            f"{b_new['nll']:.3f} | {b_new['em']:.2f} |")
    table = head + "\n" + "\n".join(rows)
    traces = {e: statistics.median(r["fisher"]["trace"] for r in runs if r["estimator"] == e) for e in estimators}
    return {"summary": summary, "fisher_trace": traces, "table_markdown": table}


# ---------------------------------------------------------------------------------------- the driver

def run_workers(job_lists: list[list[dict]], files: dict, eval_model_dir: str, work: Path, tag: str,
                script: str = __file__) -> list[dict]:
    """Run each list of jobs in a worker process (``script --worker SPEC``, by default this file's worker).

    All at once with one OMP thread each; returns the results of all jobs, list after list.
    """
    specs = [(work / f"{tag}-worker{i}", {"jobs": jobs, "files": files, "eval_model_dir": eval_model_dir})
             for i, jobs in enumerate(job_lists) if jobs]
    return [r for results in harness.run_parallel(script, specs, threads=1) for r in results]


def train_base(work: Path, files: dict, init_dir: str, steps: int, lr: float, log, script: str = __file__) -> dict:
    """Step 1: the base learns the OLD skill from ``init_dir`` (in ``work/base``; its model: ``base/final``)."""
    base_job = {"name": "base", "model_dir": init_dir, "train_file": files["old_train"], "eval_file": files["old_eval"],
                "out": str(work / "base"), "steps": steps, "lr": lr, "batch": BASE["batch"],
                "scheduler": BASE["scheduler"], "warmup_ratio": BASE["warmup_ratio"], "seed": 0, "keep": True,
                "eval_steps": max(steps // 6, 1), "greedy_sample": 20}
    base = run_workers([[base_job]], files, init_dir, work, "base", script=script)[0]
    log(f"base: old NLL {base['old']['nll']:.4f} EM {base['old']['em']:.3f}; new NLL {base['new']['nll']:.4f} "
        f"EM {base['new']['em']:.3f}; {base['train_s']:.0f}s")
    return base


def fmt_lam(x) -> str:
    if not x:
        return "0"
    exponent = math.log10(x)
    return f"1e{round(exponent):d}" if abs(exponent - round(exponent)) < 1e-9 else f"{x:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training.seed of the step-2 runs (0)")
    p.add_argument("--lambdas", type=float, nargs="+", default=DEFAULT_LAMBDAS, help="lambda grid (0 is always run)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--base-steps", type=int, default=BASE["steps"])
    p.add_argument("--base-lr", type=float, default=BASE["lr"])
    p.add_argument("--new-steps", type=int, default=NEW["steps"])
    p.add_argument("--new-lr", type=float, default=NEW["lr"])
    p.add_argument("--plain-steps", type=int, nargs="*", default=[25, 50, 100, 200, 300],
                   help="also plain fine-tuning stopped after these steps: the 'train less' baseline EWC must beat")
    p.add_argument("--train-records", type=int, default=2000, help="records per skill for training (2000)")
    p.add_argument("--eval-records", type=int, default=200, help="held-out prompts per skill (200)")
    p.add_argument("--fisher-max-sequences", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="processes, 1 OMP thread each (2)")
    p.add_argument("--base-only", action="store_true", help="stop after step 1 (for tuning the base)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--table-from", type=Path, help="print the table of an earlier run's raw JSON and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.table_from:
        record = json.loads(args.table_from.read_text())
        print(build_table(record)["table_markdown"])
        return 0

    from distrib_ft.model import load_tokenizer
    from distrib_ft.tiny import build_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="distrib-ft-ewc-forget-")
    work = Path(tmp.name)
    t_start = time.time()
    log = harness.progress_log(t_start)
    init_dir = str(build_tiny_model(work / "init", seed=0, **MODEL))
    files = make_tasks(work, load_tokenizer(init_dir), args.train_records, args.eval_records)
    log(f"alphabet {files['alphabet']!r}; model {MODEL}")

    # Step 1: the base learns the OLD skill.
    base = train_base(work, files, init_dir, args.base_steps, args.base_lr, log)
    base_dir = str(work / "base" / "final")
    record = {"command": harness.command(__file__),
              "settings": {"model": MODEL, "base": {**BASE, "steps": args.base_steps, "lr": args.base_lr},
                           "new": {**NEW, "steps": args.new_steps, "lr": args.new_lr},
                           "train_records": args.train_records, "eval_records": args.eval_records,
                           "fisher_max_sequences": args.fisher_max_sequences, "alphabet": files["alphabet"],
                           "method": "full fine-tuning, DeepSpeed ZeRO-0, fp32, AdamW (no weight decay)",
                           "seeds": args.seeds, "lambdas": args.lambdas, "plain_steps": args.plain_steps,
                           "estimators": args.estimators},
              "versions": harness.versions(), "base": base}
    if args.base_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        return 0

    # Step 2: the NEW skill from the base, per estimator and lambda.
    jobs = []
    for seed in args.seeds:
        grid = ([(None, 0.0, n) for n in sorted({*args.plain_steps, args.new_steps}, reverse=True)] +
                [(e, lam, args.new_steps) for e in args.estimators for lam in args.lambdas])
        for e, lam, steps in grid:
            name = f"s{seed}-{e or 'plain'}-{fmt_lam(lam)}" + ("" if steps == args.new_steps else f"-{steps}steps")
            jobs.append({"name": name, "model_dir": base_dir, "train_file": files["new_train"],
                         "eval_file": files["old_eval"],
                         "out": str(work / "runs" / name), "steps": steps, "lr": args.new_lr,
                         "batch": NEW["batch"], "scheduler": NEW["scheduler"], "seed": seed,
                         "estimator": e, "lambda": lam if e else None,
                         "fisher_max_sequences": args.fisher_max_sequences,
                         "eval_steps": max(args.new_steps // 6, 1),
                         "greedy_sample": 20 if lam in (0.0, max(args.lambdas)) else 0})
    log(f"step 2: {len(jobs)} runs in {args.workers} processes")
    runs = run_workers([jobs[i::args.workers] for i in range(args.workers)], files, base_dir, work, "sweep")
    log("step 2 done")

    record.update(total_s=time.time() - t_start, loadavg_at_end=os.getloadavg(), runs=runs)
    record.update(build_table(record))
    table = record["table_markdown"]
    print(table)
    print("\nFisher trace (sum of F over all parameters) per estimator: " +
          ", ".join(f"{e} {t:.3g}" for e, t in record["fisher_trace"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    log(f"raw results: {args.out}")
    harness.close_workdir(tmp, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
