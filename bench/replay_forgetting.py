"""Replay ratio and Selective Token Masking vs forgetting, in the setting of ``bench/ewc_forgetting.py``.

The setting, the base model and the measures are those of ``ewc_forgetting.py`` (imported, not
copied): a tiny Llama (hidden 64, 2 layers) trained from scratch on the OLD skill
(``reverse: abgk -> kgba``, 500 steps), then fully fine-tuned from that base on the NEW skill
(``upper: abgk -> ABGK``) with the learning rate and steps that made plain fine-tuning forget there
(lr 1e-3 constant, 600 steps of batch 16). Held-out token NLL and greedy exact match of each skill
are measured on the saved ``final/`` model with ``ewc_forgetting.evaluate_model``.

Step 2 runs, per seed (``training.seed``: the data order, the replay order and the random control's
choice of tokens; the base is the same for every seed):

(a) replay: ``replay: {buffer: B, ratio: R}`` for R in 0, 0.01, 0.05, 0.25, where B is built once
    with ``distrib_ft.data.replay_buffer.build`` from the OLD skill's whole training file. The replayed
    sequences take their place in the global batch of 16, so a run with replay sees fewer NEW
    sequences (recorded: ``new_sequences``, ``replay_sequences`` from metrics.jsonl);
(b) token masking on the NEW data, without replay: ``data.token_masking: {mode: stm | random,
    threshold: tau}`` at tau 2.5 (the default), against R = 0 (no masking). Here the base model
    knows nothing of the NEW skill, so tau 2.5 masks almost every target token (95%); both modes are
    therefore also run at a tau that masks about ``--target-fraction`` (22.5%) of them: ``exp`` of
    the (1 - fraction) quantile of the base model's per-token NLL on the NEW training data (the
    same base-model pass STM makes, ``distrib_ft.preservation.token_masking.base_token_nll``),
    computed before step 2 (``token_masking_calibration`` in the JSON).

Runs in ``--workers`` processes (OMP_NUM_THREADS=1 each). Reported: the median over seeds, with the
per-seed values. Training on CPU with 1 thread is deterministic, so the seeds differ only by what
they seed.

Usage::

    python bench/replay_forgetting.py --seeds 0 1 2 3 4   # 40 runs, ~8 min on 2 busy cores
    python bench/replay_forgetting.py --table-from bench/results/replay_forgetting.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

harness.limit_own_threads(1)  # this process too (the base-model pass for the tau calibration)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import ewc_forgetting as ef  # noqa: E402
from harness import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "replay_forgetting.json"
DEFAULT_RATIOS = [0.0, 0.01, 0.05, 0.25]
DEFAULT_TAU = 2.5


# ------------------------------------------------------------------------------------------- one run

def run_job(job: dict, files: dict, eval_sets: dict) -> dict:
    """One step-2 run: ewc_forgetting's job dict plus the replay / token_masking sections.

    Evaluated from final/ like ewc_forgetting.
    """
    from distrib_ft.runtime.metrics import read_metrics

    out = Path(job["out"])
    if out.exists():
        shutil.rmtree(out)
    raw = ef.job_dict(job["model_dir"], files["new_train"], files["old_eval"], out, job["steps"], job["lr"],
                      job["batch"], job["scheduler"], job["seed"], 0.0, job["eval_steps"])
    if job["ratio"]:
        raw["replay"] = {"buffer": job["buffer"], "ratio": job["ratio"]}
    if job["mask"] != "off":
        raw["token_masking"] = {"mode": job["mask"], "threshold": job["tau"]}
    summary, train_s = harness.train_job(raw)
    res = {k: job[k] for k in ("name", "group", "seed", "steps", "ratio", "mask", "tau")}
    res.update(train_s=train_s, token_masking=summary.get("token_masking"), config=raw)
    metrics = read_metrics(out / "metrics.jsonl")
    lines = [r for r in metrics if "loss" in r]
    res["eval_curve"] = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]  # old-skill NLL
    res["loss_curve"] = [(r["step"], r["loss"], r.get("loss_new"), r.get("loss_replay")) for r in lines]
    g = job["batch"]
    if job["ratio"]:
        res["replay_sequences"] = sum(r["replay_sequences"] for r in lines)
        res["new_sequences"] = sum(r["new_sequences"] for r in lines)
    else:
        res["replay_sequences"], res["new_sequences"] = 0, summary["steps"] * g
    # the documented count: floor((s+1) r G) - floor(s r G) per step, i.e. floor(steps r G) in all
    res["replay_sequences_expected"] = math.floor(summary["steps"] * g * job["ratio"] + 1e-9)
    res.update(ef.evaluate_and_clean(out, eval_sets, job.get("greedy_sample", 0)))
    return res


def _done(r: dict) -> str:
    return (f" ({r['train_s']:.0f}s): old EM {r['old']['em']:.2f} NLL {r['old']['nll']:.3f}, "
            f"new EM {r['new']['em']:.2f} NLL {r['new']['nll']:.3f}")


def worker_main(spec_path: str) -> None:
    ef.worker_main(spec_path, run=run_job, done=_done)


# ------------------------------------------------------------------------------- tau calibration

def base_nll_distribution(base_dir: str, new_train: str) -> tuple[list[float], list[bool]]:
    """The base model's NLL of every target token of the NEW training data (the pass STM makes).

    Also whether each is the answer's last target (``<|im_end|>``) rather than a letter.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from distrib_ft.data.formats import build_dataset
    from distrib_ft.model import load_tokenizer
    from distrib_ft.preservation.token_masking import base_token_nll

    torch.set_num_threads(1)
    tok = load_tokenizer(base_dir)
    ds, _ = build_dataset([new_train], fmt="alpaca", tokenizer=tok, max_seq_length=64)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    nll = base_token_nll(model, ds, batch_size=64, pad_token_id=tok.pad_token_id)
    values, is_end = [], []
    for x in nll:
        t = np.flatnonzero(~np.isnan(x))
        values += x[t].tolist()
        is_end += [i == len(t) - 1 for i in range(len(t))]
    return values, is_end


def calibrate(nll: list[float], is_end: list[bool], tau: float, target_fraction: float) -> dict:
    import numpy as np

    x, end = np.asarray(nll), np.asarray(is_end)
    q = float(np.quantile(x, 1 - target_fraction))
    tau_cal = float(f"{math.exp(q):.4g}")
    frac = lambda t, sel=slice(None): float((x[sel] > math.log(t)).mean())  # noqa: E731
    return {"masked_by_token_kind": {f"tau {t:g}": {"letters": frac(t, ~end), "<|im_end|>": frac(t, end)}
                                     for t in (tau, tau_cal)},
            "target_tokens": len(x), "nll_quantiles": {str(p): float(np.quantile(x, p)) for p in
                                                       (0.05, 0.1, 0.25, 0.5, 0.75, 0.775, 0.8, 0.9, 0.95)},
            "fraction_masked_at_default_tau": frac(tau), "default_tau": tau,
            "target_fraction": target_fraction, "calibrated_tau": tau_cal,
            "fraction_masked_at_calibrated_tau": frac(tau_cal)}


# ------------------------------------------------------------------------------------------ tables

def _med(rs: list[dict], f) -> tuple[float, list[float]]:
    vals = [f(r) for r in sorted(rs, key=lambda r: r["seed"])]
    return statistics.median(vals), vals


def build_tables(record: dict) -> dict:
    runs, base = record["runs"], record["base"]
    summary = {}

    def agg(rs):
        out = {}
        for key, f in (("old_nll", lambda r: r["old"]["nll"]), ("old_em", lambda r: r["old"]["em"]),
                       ("new_nll", lambda r: r["new"]["nll"]), ("new_em", lambda r: r["new"]["em"]),
                       ("replay_sequences", lambda r: r["replay_sequences"]),
                       ("new_sequences", lambda r: r["new_sequences"]),
                       ("masked_fraction", lambda r: (r["token_masking"] or {}).get("masked_fraction", 0.0))):
            m, v = _med(rs, f)
            out[key] = {"median": m, "per_seed": v}
        out["seeds"] = sorted(r["seed"] for r in rs)
        return out

    def cell(a, key, fmt):
        return harness.with_spread(a[key]["median"], a[key]["per_seed"], fmt)

    b_old, b_new = base["old"], base["new"]
    rows = ["| replay ratio | replay / new sequences (total) | old NLL | old EM | new NLL | new EM |",
            "|---|---|---|---|---|---|",
            f"| (base, before step 2) | - | {b_old['nll']:.3f} | {b_old['em']:.2f} | "
            f"{b_new['nll']:.3f} | {b_new['em']:.2f} |"]
    for ratio in record["settings"]["ratios"]:
        rs = [r for r in runs if r["mask"] == "off" and r["ratio"] == ratio]
        if not rs:
            continue
        a = summary[f"replay/{ratio:g}"] = agg(rs)
        rows.append(f"| {ratio:g}{' (plain FT)' if not ratio else ''} | "
                    f"{a['replay_sequences']['median']:.0f} / {a['new_sequences']['median']:.0f} | "
                    f"{cell(a, 'old_nll', '.3f')} | {cell(a, 'old_em', '.2f')} | "
                    f"{cell(a, 'new_nll', '.3f')} | {cell(a, 'new_em', '.2f')} |")
    replay_table = "\n".join(rows)

    rows = ["| token masking | tau | masked fraction | old NLL | old EM | new NLL | new EM |",
            "|---|---|---|---|---|---|---|"]
    none = [r for r in runs if r["mask"] == "off" and r["ratio"] == 0]
    keys = [("off", None)] + sorted({(r["mask"], r["tau"]) for r in runs if r["mask"] != "off"},
                                    key=lambda k: (k[1], k[0] != "stm"))
    for mode, tau in keys:
        rs = none if mode == "off" else [r for r in runs if r["mask"] == mode and r["tau"] == tau]
        if not rs:
            continue
        a = summary[f"mask/{mode}/{tau:g}" if tau else "mask/off"] = agg(rs)
        label = {"off": "none (plain FT)", "stm": "stm", "random": "random (control)"}[mode]
        rows.append(f"| {label} | {'-' if tau is None else format(tau, 'g')} | "
                    f"{a['masked_fraction']['median']:.1%} | {cell(a, 'old_nll', '.3f')} | "
                    f"{cell(a, 'old_em', '.2f')} | {cell(a, 'new_nll', '.3f')} | {cell(a, 'new_em', '.2f')} |")
    masking_table = "\n".join(rows)
    return {"summary": summary, "replay_table": replay_table, "masking_table": masking_table}


# ---------------------------------------------------------------------------------------- the driver

def git_state() -> dict:
    """The commit and whether the code the runs import differs from it.

    The code: distrib_ft/, bench/ewc_forgetting.py, bench/harness.py.
    """
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": git("status", "--porcelain", "--", "distrib_ft", "bench/ewc_forgetting.py",
                                       "bench/harness.py").splitlines()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training.seed of the step-2 runs (0 1 2)")
    p.add_argument("--ratios", type=float, nargs="+", default=DEFAULT_RATIOS, help="replay.ratio values (0 = plain FT)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="data.token_masking.threshold (2.5)")
    p.add_argument("--target-fraction", type=float, default=0.225,
                   help="also run the tau that masks this share of the new data's target tokens under the base "
                        "model (0.225)")
    p.add_argument("--no-calibrated-tau", action="store_true", help="run --tau only")
    p.add_argument("--base-steps", type=int, default=ef.BASE["steps"])
    p.add_argument("--base-lr", type=float, default=ef.BASE["lr"])
    p.add_argument("--new-steps", type=int, default=ef.NEW["steps"])
    p.add_argument("--new-lr", type=float, default=ef.NEW["lr"])
    p.add_argument("--train-records", type=int, default=2000, help="records per skill for training (2000)")
    p.add_argument("--eval-records", type=int, default=200, help="held-out prompts per skill (200)")
    p.add_argument("--workers", type=int, default=2, help="processes, 1 OMP thread each (2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--table-from", type=Path, help="print the tables of an earlier run's raw JSON and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.table_from:
        t = build_tables(json.loads(args.table_from.read_text()))
        print(t["replay_table"] + "\n\n" + t["masking_table"])
        return 0

    from distrib_ft.data import replay_buffer as rb
    from distrib_ft.model import load_tokenizer
    from distrib_ft.tiny import build_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="distrib-ft-replay-forget-")
    work = Path(tmp.name)
    t_start = time.time()
    git_start = git_state()
    log = harness.progress_log(t_start)
    init_dir = str(build_tiny_model(work / "init", seed=0, **ef.MODEL))
    files = ef.make_tasks(work, load_tokenizer(init_dir), args.train_records, args.eval_records)
    log(f"alphabet {files['alphabet']!r}; model {ef.MODEL}")

    # Step 1: the base learns the OLD skill (exactly ewc_forgetting's step 1).
    base = ef.train_base(work, files, init_dir, args.base_steps, args.base_lr, log)
    base_dir = str(work / "base" / "final")

    # The replay buffer: the OLD skill's whole training file.
    buffer = str(work / "replay_buffer")
    manifest = rb.build(buffer, [files["old_train"]], budget=None, shard_size=256, seed=0)
    log(f"replay buffer: {manifest['records']} records in {len(manifest['shards'])} shards")

    # How much tau masks on the NEW data under the base model, and the tau that masks --target-fraction.
    calib = calibrate(*base_nll_distribution(base_dir, files["new_train"]), args.tau, args.target_fraction)
    taus = [args.tau] + ([] if args.no_calibrated_tau else [calib["calibrated_tau"]])
    log(f"token masking: tau {args.tau} masks {calib['fraction_masked_at_default_tau']:.1%} of "
        f"{calib['target_tokens']} target tokens; tau {calib['calibrated_tau']:g} masks "
        f"{calib['fraction_masked_at_calibrated_tau']:.1%}; running tau {taus}")

    # Step 2: the NEW skill from the base.
    common = {"model_dir": base_dir, "steps": args.new_steps, "lr": args.new_lr, "batch": ef.NEW["batch"],
              "scheduler": ef.NEW["scheduler"], "eval_steps": max(args.new_steps // 6, 1), "buffer": buffer}
    jobs = []
    for seed in args.seeds:
        grid = ([("replay", r, "off", None) for r in args.ratios] +
                [("masking", 0.0, m, tau) for tau in taus for m in ("stm", "random")])
        for group, ratio, mask, tau in grid:
            name = f"s{seed}-" + (f"replay{ratio:g}" if mask == "off" else f"{mask}-tau{tau:g}")
            jobs.append({**common, "name": name, "group": group, "seed": seed, "ratio": ratio, "mask": mask,
                         "tau": tau, "out": str(work / "runs" / name),
                         "greedy_sample": 20 if seed == args.seeds[0] else 0})
    log(f"step 2: {len(jobs)} runs in {args.workers} processes")
    runs = ef.run_workers([jobs[i::args.workers] for i in range(args.workers)], files, base_dir, work, "sweep",
                          script=__file__)  # this file's worker: it runs the replay / masking jobs
    log("step 2 done")

    record = {"command": harness.command(__file__, argv),
              "settings": {"model": ef.MODEL, "base": {**ef.BASE, "steps": args.base_steps, "lr": args.base_lr},
                           "new": {**ef.NEW, "steps": args.new_steps, "lr": args.new_lr},
                           "train_records": args.train_records, "eval_records": args.eval_records,
                           "alphabet": files["alphabet"], "seeds": args.seeds, "ratios": args.ratios, "taus": taus,
                           "replay_buffer": {"records": manifest["records"], "shards": len(manifest["shards"]),
                                             "source": "old_train.jsonl (all records)", "shard_size": 256, "seed": 0},
                           "method": "full fine-tuning, DeepSpeed ZeRO-0, fp32, AdamW (no weight decay)",
                           "eval_file_during_training": "old_eval (eval_curve = old-skill NLL at steps 0, 5, 10, 25, "
                                                        "50 and every 100)"},
              "versions": harness.versions(), "git": {"start": git_start, "end": git_state()}, "base": base,
              "token_masking_calibration": calib,
              "total_s": time.time() - t_start, "loadavg_at_end": os.getloadavg(), "runs": runs}
    record.update(build_tables(record))
    print(record["replay_table"] + "\n\n" + record["masking_table"])
    bad = [r["name"] for r in runs if r["replay_sequences"] != r["replay_sequences_expected"]]
    if bad:
        print(f"WARNING: replay sequences differ from floor(steps x ratio x G) in {bad}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    log(f"raw results: {args.out}")
    harness.close_workdir(tmp, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
