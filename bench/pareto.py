"""The measured Pareto of every defence on a real model: new-task gain against forgetting, three retention suites.

Issue 13, must-have 5. One setting = one in-process ``train()`` job in a fresh worker process (the way
``bench/stm_smollm2.py`` and ``bench/methods.py`` run SmolLM2; ``bench/harness.py``), ONE at a time:

- model ``offline:SmolLM2-135M-Instruct`` (``distrib_ft.assets.smollm2_path()``), the README demo's job made
  smaller for a shared 2-core CPU: LoRA r16 alpha 32 on all projections, cosine with 10% warmup, 20 optimizer
  steps of 4 sequences (a world of one), ZeRO-2 (``ds_configs/zero2.json``), fp32, max_seq_length 128, at
  ``--lr`` (default and the sweep in docs/benchmarks.md: 2e-3, where plain training forgets general_qa by +19% /
  +41% (seeds 0 / 1) in these 20 steps; at the demo's 5e-4 it moved +6.6% and the new task gained as much).
  Every defence is added on top of that job; ``lr/10`` and ``full`` change the job itself.
- new task: ``examples/data/units_train.jsonl``; the first 32 of its held-out ``units_eval.jsonl`` give the
  new-task NLL (``eval_loss``); **gain = eval_loss at step 0 - eval_loss at the end** (nats per answer token).
- suite ``general_qa`` (inside replay's distribution): the first 64 of ``examples/data/general_qa.jsonl`` (the
  base model's own greedy answers to general prompts). The last 36 (disjoint) are the *old data* the defences
  may use: the replay buffer (``distrib_ft.data.replay_buffer.build``), generative replay's prompts (their
  instructions only; the answers are generated) and EWC's Fisher data.
- suite ``python_docs`` (outside it): 64 answers in a different style, human-written reference prose. No
  second such set exists in ``examples/data``, so it is built deterministically here (:func:`python_docs_records`)
  from the docstrings of Python's own built-ins and ``str`` methods (CPython 3.11's text; sorted by name):
  instruction "What does Python's built-in `abs` do?", answer the docstring's first paragraph. Nothing of it is
  replayed or in the Fisher data.
- suite ``python_qa`` (outside it too): the base model's own greedy answers to python_docs' 64 prompts
  (:func:`python_qa_records`, ``bench/data/python_qa.jsonl``): the model's own style, like general_qa, on a topic
  nothing replays. Plain training *improved* python_docs at 5e-4, so it could not show forgetting there.
- per suite: **relative change = NLL at the end / NLL at step 0 - 1** (monitor, metric nll; > 0 = forgetting).
- time: the worker's CPU seconds at ``--threads`` (2 in the committed sweep; 1 thread takes ~40% fewer) and its
  wall seconds, both with start-up, the Fisher / base-model / generation passes and the 2 evaluations; the same
  computation varied by up to ~36% between runs here: compare settings only roughly.

Settings (``SETTINGS``): none; lr/10; full fine-tuning (the method switch: full at 2e-5, the rate of
``bench/methods.py``; LoRA is the baseline's own method here); EWC (``estimator: sampled``,
``target: lora_merged``, lambda 1e2 / 1e4 / 1e6, Fisher on the 36 old examples); L2-SP (alpha 1); replay 10% and
25%; generative replay (32 generated answers, ratio 10%); STM (token masking, tau 2.5); EMA (decay 0.95); replay
25% + EWC (lambda 1e4); and merge-back alpha 0.5 / 0.25: the no-defence run's merged weights interpolated toward
the start, ``theta0 + alpha (theta1 - theta0)`` (Wortsman et al. 2022, WiSE-FT), computed with torch on its
saved ``final/`` adapter and evaluated on the same data, no training (its time = the no-defence run's + the
merge and evaluation). Seeds (``training.seed``: data order, LoRA's initialisation, sampling): every setting
with seed 0 first, then 1.

Results go to ``bench/results/pareto.json`` after every run (temp file then rename), so a partial sweep is
kept and ``--resume`` skips what is there; the plots ``bench/results/pareto_<suite>.png`` (x: the suite's
relative change, y: the new-task gain; one point per run, the mean of the seeds marked) are redrawn with it.
The first, shorter sweep (lr 5e-4, two suites, seed 0) is kept as ``bench/results/pareto_short_lr5e-4.json``.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/pareto.py --seeds 0 1 --lr 2e-3 --resume > /tmp/pareto.log 2>&1 &
    .venv/bin/python bench/pareto.py --table-from bench/results/pareto.json   # table + plots again
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

if "--worker" not in sys.argv:  # a worker keeps the OMP_NUM_THREADS its parent gave it (read_spec checks it)
    harness.limit_own_threads(1)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

from harness import ROOT  # noqa: E402

DATA = ROOT / "examples" / "data"
DEFAULT_OUT = ROOT / "bench" / "results" / "pareto.json"
SUITE_EXAMPLES = 64
SUITES = ("general_qa", "python_docs", "python_qa")
LR = 2e-3  # the default of --lr: the sweep's rate (docs/benchmarks.md)
PYTHON_QA = ROOT / "bench" / "data" / "python_qa.jsonl"
STEPS = 20
BATCH = 4
NEW_EVAL_EXAMPLES = 32
MERGE_ALPHAS = (0.5, 0.25)
EWC_LAMBDAS = (1e2, 1e4, 1e6)

# name -> (what it changes in the job); the order is the run order within a seed
SETTINGS: dict[str, dict] = {
    "none": {},
    "lr/10": {"lr_factor": 0.1},
    "replay 25%": {"replay": 0.25},
    "ewc 1e4": {"ewc": 1e4},
    "l2_sp": {"l2_sp": {"alpha": 1.0}},
    "ema": {"ema": {"decay": 0.95}},
    "stm": {"token_masking": {"mode": "stm", "threshold": 2.5}},
    "replay 10%": {"replay": 0.10},
    "generative replay": {"generative_replay": True},
    "replay 25% + ewc 1e4": {"replay": 0.25, "ewc": 1e4},
    "ewc 1e2": {"ewc": 1e2},
    "ewc 1e6": {"ewc": 1e6},
    "full": {"method": {"type": "full"}, "lr": 2e-5},
}


# ------------------------------------------------------------------------------------ data

def python_docs_records(n: int = SUITE_EXAMPLES) -> list[dict]:
    """The outside-distribution suite: first docstring paragraphs of Python's built-ins, then of ``str`` methods.

    Deterministic for a given CPython (the text is the interpreter's own); functions and types only, no
    exceptions, no private names, no docstring shorter than 40 characters; signature lines are skipped.
    """
    import builtins
    import inspect

    def first_paragraph(obj) -> str | None:
        doc = inspect.getdoc(obj) or ""
        paras = [p.strip() for p in doc.split("\n\n") if p.strip()]
        paras = [p for p in paras if "(" not in p.split("\n")[0] or not p.split("\n")[0].rstrip().endswith(")")
                 and "->" not in p.split("\n")[0]]
        if not paras:
            return None
        text = " ".join(paras[0].split())
        return text if len(text) >= 40 else None

    out = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
            continue
        text = first_paragraph(obj)
        if text:
            out.append({"instruction": f"What does Python's built-in `{name}` do?", "input": "", "output": text})
    for name in sorted(dir(str)):
        if name.startswith("_"):
            continue
        text = first_paragraph(getattr(str, name))
        if text:
            out.append({"instruction": f"What does the Python string method `str.{name}` do?", "input": "",
                        "output": text})
    if len(out) < n:
        raise ValueError(f"python_docs: only {len(out)} docstrings found, {n} wanted")
    return out[:n]


def python_qa_records() -> list[dict]:
    """The base model's own greedy answers to the python_docs prompts (``bench/data/python_qa.jsonl``).

    The third suite: the model's own answering style (like general_qa) on a topic outside replay's
    distribution (Python, like python_docs). Generated once with ``scripts/make_demo_data.py``'s recipe (chat
    template, greedy, at most 48 new tokens, cut answers trimmed to the last full sentence) and committed, since
    the answers depend on the CPU's arithmetic; a missing file is generated (~3 min on 2 cores).
    """
    if not PYTHON_QA.exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
        mdd = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mdd)
        from distrib_ft.runtime.storage import atomic_write_text

        recs = mdd.general_qa(48, None, prompts=[r["instruction"] for r in python_docs_records()], label="python_qa")
        PYTHON_QA.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(PYTHON_QA, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return [json.loads(line) for line in PYTHON_QA.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_data(work: Path) -> dict:
    """The suites' files, the old data (general_qa's last 36) and the replay buffer built from it, in ``work``."""
    from distrib_ft.data import replay_buffer as rb

    work.mkdir(parents=True, exist_ok=True)
    qa = [json.loads(line) for line in (DATA / "general_qa.jsonl").read_text().splitlines() if line.strip()]
    files = {"general_qa": work / "general_qa_suite.jsonl", "old": work / "general_qa_old.jsonl",
             "python_docs": work / "python_docs.jsonl", "python_qa": work / "python_qa.jsonl",
             "buffer": work / "replay_buffer",
             "new_eval": work / "units_eval_first32.jsonl"}
    units_eval = (DATA / "units_eval.jsonl").read_text().splitlines(keepends=True)
    files["new_eval"].write_text("".join(units_eval[:NEW_EVAL_EXAMPLES]))
    files["general_qa"].write_text("".join(json.dumps(r) + "\n" for r in qa[:SUITE_EXAMPLES]))
    files["old"].write_text("".join(json.dumps(r) + "\n" for r in qa[SUITE_EXAMPLES:]))
    files["python_docs"].write_text("".join(json.dumps(r) + "\n" for r in python_docs_records()))
    files["python_qa"].write_text("".join(json.dumps(r) + "\n" for r in python_qa_records()))
    if not rb.list_versions(str(files["buffer"])):
        rb.build(str(files["buffer"]), [str(files["old"])], budget=None, seed=0)
    return {k: str(v) for k, v in files.items()}


# ------------------------------------------------------------------------------------ one run (worker)

def job_dict(out: Path, setting: dict, seed: int, files: dict, lr: float = LR) -> dict:
    from distrib_ft.assets import smollm2_path

    method = setting.get("method", {"type": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0})
    raw = harness.job_dict(
        smollm2_path(), method,
        {"train_files": [str(DATA / "units_train.jsonl")], "eval_files": [files["new_eval"]],
         "format": "alpaca", "max_seq_length": 128},
        {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
         "gradient_accumulation_steps": 1, "learning_rate": setting.get("lr", lr * setting.get("lr_factor", 1.0)),
         "lr_scheduler_type": "cosine",
         "warmup_ratio": 0.1, "bf16": False, "logging_steps": 5, "eval_steps": 0, "save_steps": 0,
         "per_device_eval_batch_size": 16, "seed": seed},
        zero=2,
        monitor={"suites": [{"name": s, "files": [files[s]], "format": "alpaca", "metric": "nll",
                             "max_examples": SUITE_EXAMPLES} for s in SUITES],
                 "eval_at": [0], "policy": "report"})
    if "token_masking" in setting:
        raw["token_masking"] = setting["token_masking"]
    if "l2_sp" in setting:
        raw["l2_sp"] = setting["l2_sp"]
    if "ema" in setting:
        raw["ema"] = setting["ema"]
    if "ewc" in setting:
        raw["ewc"] = {"lambda": setting["ewc"], "estimator": "sampled", "target": "lora_merged",
                      "fisher_data_files": [files["old"]], "fisher_max_sequences": 64}
    if "replay" in setting:
        raw["replay"] = {"buffer": files["buffer"], "ratio": setting["replay"]}
    if setting.get("generative_replay"):
        buffer = str(out.parent / f"{out.name}-generated")
        raw["generative_replay"] = {"buffer": buffer, "prompts_files": [files["old"]], "prompts_format": "alpaca",
                                    "num_examples": 32, "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9}
        raw["replay"] = {"buffer": buffer, "ratio": 0.10}
    return raw


def merge_back(out: Path, raw: dict, alphas: tuple[float, ...]) -> list[dict]:
    """Interpolate the trained (merged) weights toward the start and evaluate like the monitor does.

    ``theta(alpha) = theta0 + alpha * (theta1 - theta0)`` over every weight of the merged model (for LoRA:
    the base plus alpha times the adapter's update). Alpha 1 (the trained model) is evaluated too: it must
    give the run's own end values, the check that this evaluation is the monitor's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distrib_ft.data.formats import build_dataset
    from distrib_ft.model import load_tokenizer
    from distrib_ft.monitor.evaluation import evaluate_nll

    base_dir = raw["model"]["name_or_path"]
    tok = load_tokenizer(base_dir, False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    theta0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, str(out / "final")).merge_and_unload()
    theta1 = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    sets = {"eval_loss": ([raw["data"]["eval_files"][0]], 10**9)}
    sets.update({s["name"]: (s["files"], s["max_examples"]) for s in raw["monitor"]["suites"]})
    data = {}
    for name, (fs, n) in sets.items():
        ds, _ = build_dataset(fs, fmt="alpaca", tokenizer=tok, max_seq_length=raw["data"]["max_seq_length"],
                              prompt_template="auto", text_field="text", packing=False, streaming=False)
        data[name] = ds.select(range(min(len(ds), n)))
    rows = []
    for alpha in (1.0, *alphas):
        t0 = time.time()
        with torch.no_grad():
            tuned.load_state_dict({k: theta0[k] + alpha * (theta1[k] - theta0[k]) for k in theta1})
        vals = {name: evaluate_nll(tuned, ds, batch_size=16, pad_token_id=tok.pad_token_id)["eval_loss"]
                for name, ds in data.items()}
        rows.append({"alpha": alpha, "values": vals, "seconds": time.time() - t0})
    return rows


def worker_main(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    from distrib_ft.runtime.metrics import read_metrics

    out = Path(spec["out"])
    setting = SETTINGS[spec["setting"]]
    raw = job_dict(out, setting, spec["seed"], spec["files"], spec.get("lr", LR))
    summary, train_s = harness.train_job(raw)
    metrics = read_metrics(out / "metrics.jsonl")
    evals = [r for r in metrics if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    res = {"setting": spec["setting"], "seed": spec["seed"], "train_s": train_s, "end_step": last["step"],
           "steps": summary.get("steps"), "trainable_parameters": summary.get("trainable_parameters"),
           "eval_start": first["eval_loss"], "eval_end": last["eval_loss"],
           "start": {s: first[f"retention/{s}"] for s in SUITES}, "end": {s: last[f"retention/{s}"] for s in SUITES},
           "loss_curve": [(r["step"], r["loss"]) for r in metrics if "loss" in r],
           "extra": {k: next((r[k] for r in metrics if k in r), None)
                     for k in ("masked_fraction", "replay_sequences", "ewc_penalty", "l2_sp_penalty")},
           "config": raw}
    res["replay_sequences_total"] = sum(r.get("replay_sequences", 0) for r in metrics)
    state = out / "ewc_state.safetensors"
    if state.exists():
        from distrib_ft.preservation.fisher import load_fisher

        fisher, _, info = load_fisher(state)
        res["fisher_trace"] = float(sum(float(t.double().sum()) for t in fisher.values()))
    import resource

    def cpu_seconds() -> float:
        """CPU seconds of the worker, all its threads (shared machines disturb them far less than wall time)."""
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    res["cpu_s_train"] = cpu_seconds()  # the run itself, before the no-defence run's merge-back evaluations
    if setting == {}:
        try:
            res["merge_back"] = merge_back(out, raw, MERGE_ALPHAS)
        except Exception as e:  # noqa: BLE001 -- keep the run's own result; the merge-back rows are then missing
            import traceback

            traceback.print_exc()
            res["merge_back_error"] = repr(e)
    res["cpu_s"] = cpu_seconds()  # with the merge-back evaluations
    harness.write_result(spec, res, indent=1)
    shutil.rmtree(out, ignore_errors=True)  # the weights are not needed after the evaluation


# ------------------------------------------------------------------------------------ results

def train_wall(r: dict) -> float | None:
    """The run's wall seconds without the merge-back evaluations that the no-defence worker adds after training."""
    if r.get("wall_s") is None:
        return None
    return r["wall_s"] - sum(m["seconds"] for m in r.get("merge_back", []))


def row_of(r: dict) -> dict:
    """A run's Pareto row: gain, each suite's relative change, wall time."""
    return {"setting": r["setting"], "seed": r["seed"], "gain": r["eval_start"] - r["eval_end"],
            "eval_start": r["eval_start"], "eval_end": r["eval_end"],
            **{f"{s}_change": r["end"][s] / r["start"][s] - 1 for s in r["start"]}, "wall_s": train_wall(r),
            "cpu_s": r.get("cpu_s_train", r.get("cpu_s") if not r.get("merge_back") else None)}


def merge_rows(r: dict) -> list[dict]:
    """The merge-back rows derived from a no-defence run (alpha < 1)."""
    rows = []
    for m in r.get("merge_back", []):
        if m["alpha"] == 1.0:
            continue
        v = m["values"]
        rows.append({"setting": f"merge-back {m['alpha']:g}", "seed": r["seed"],
                     "gain": r["eval_start"] - v["eval_loss"],
                     "eval_start": r["eval_start"], "eval_end": v["eval_loss"],
                     **{f"{s}_change": v[s] / r["start"][s] - 1 for s in r["start"]},
                     "wall_s": (train_wall(r) or 0) + m["seconds"], "cpu_s": None})
    return rows


def all_rows(doc: dict) -> list[dict]:
    rows = []
    for r in doc["runs"]:
        if "error" in r:
            continue
        rows.append(row_of(r))
        rows.extend(merge_rows(r))
    return rows


def order_of(name: str) -> int:
    names = list(SETTINGS) + [f"merge-back {a:g}" for a in MERGE_ALPHAS]
    return names.index(name) if name in names else len(names)


def suites_of(doc: dict) -> list[str]:
    """A results file's retention suites: inside replay's distribution, outside in its style, in another style."""
    runs = [r for r in doc["runs"] if "error" not in r]
    names = list(runs[0]["start"]) if runs else list(SUITES)
    order = ("general_qa", "python_qa", "python_docs")
    return sorted(names, key=lambda s: order.index(s) if s in order else len(order))


def front(rows: list[dict], suite: str) -> list[str]:
    """The settings on the Pareto front of (new-task gain up, ``suite``'s change down), by their seeds' means."""
    means = {}
    for name in {r["setting"] for r in rows}:
        rs = [r for r in rows if r["setting"] == name]
        means[name] = (sum(r["gain"] for r in rs) / len(rs), sum(r[f"{suite}_change"] for r in rs) / len(rs))

    def dominated(g, c):
        return any(g2 >= g and c2 <= c and (g2, c2) != (g, c) for g2, c2 in means.values())

    return sorted((n for n, (g, c) in means.items() if not dominated(g, c)), key=lambda n: -means[n][0])


def table(doc: dict) -> str:
    rows = all_rows(doc)
    names = sorted({r["setting"] for r in rows}, key=order_of)
    suites = suites_of(doc)
    lines = ["| setting | seeds | new-task gain (NLL) | " + " | ".join(f"{s} change" for s in suites)
             + " | wall s / run | CPU s / run |", "|---|---|---|" + "---|" * len(suites) + "---|---|"]
    for name in names:
        rs = sorted([r for r in rows if r["setting"] == name], key=lambda r: r["seed"])

        def cell(key, fmt, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                return "-"
            mean = sum(vals) / len(vals)
            return f"{mean:{fmt}}" + (f" ({' / '.join(f'{v:{fmt}}' for v in vals)})" if len(vals) > 1 else "")

        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {cell('gain', '.3f')} | "
                     + "".join(f"{cell(f'{s}_change', '+.1%')} | " for s in suites)
                     + f"{cell('wall_s', '.0f')} | {cell('cpu_s', '.0f')} |")
    lines.append("")
    for s in suites:
        lines.append(f"Pareto front, {s} (seed means; no other setting has at least the gain and at most the "
                     f"change): " + ", ".join(front(rows, s)))
    failed = [f"{r['setting']} seed {r['seed']}: {r['error']}" for r in doc["runs"] if "error" in r]
    if failed:
        lines.append("")
        lines.append("Failed: " + "; ".join(failed))
    return "\n".join(lines)


def plot(doc: dict, results: Path) -> list[Path]:
    """One scatter per suite, ``<results stem>_<suite>.png`` beside ``results``.

    x: the suite's relative change, y: the new-task gain; small dots the seeds, joined to their mean (large); the
    Pareto front (:func:`front`) dashed. Labels alternate above and below their point to overlap less.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = all_rows(doc)
    names = sorted({r["setting"] for r in rows}, key=order_of)
    cmap = plt.get_cmap("tab20")
    paths = []
    settings = doc["settings"]
    for suite in suites_of(doc):
        fig, ax = plt.subplots(figsize=(11, 6))
        means = {}
        for i, name in enumerate(names):
            rs = [r for r in rows if r["setting"] == name]
            xs, ys = [100 * r[f"{suite}_change"] for r in rs], [r["gain"] for r in rs]
            color = cmap(i % 20)
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            means[name] = (mx, my)
            for x, y in zip(xs, ys):
                ax.plot([x, mx], [y, my], color=color, lw=0.6, alpha=0.6)
            ax.scatter(xs, ys, color=color, alpha=0.55, s=16)
            ax.scatter([mx], [my], color=color, s=60, edgecolor="black", label=name, zorder=3)
            ax.annotate(name, (mx, my), fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
        pts = sorted(means[n] for n in front(rows, suite))
        ax.plot([x for x, _ in pts], [y for _, y in pts], "k--", lw=0.8, label="Pareto front (means)")
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel(f"{suite}: relative NLL change, end vs step 0 (%)  (right = forgetting)")
        ax.set_ylabel("new-task gain: units eval NLL step 0 - end")
        ax.set_title(f"Defences on SmolLM2-135M-Instruct, LoRA lr {settings['lr']:g}, "
                     f"{settings['steps']} steps of {settings['batch']}: {suite}\n"
                     "better = up (more gain) and left (less forgetting); large dots: the seeds' mean, small: a seed",
                     fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = results.with_name(f"{results.stem}_{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def save(doc: dict, out: Path) -> None:
    """Write the results atomically (a partial sweep is never a half-written file)."""
    from distrib_ft.runtime.storage import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] + f" ({STEPS} LoRA steps of {BATCH} on "
                                 f"SmolLM2-135M-Instruct; suites {', '.join(SUITES)}; see the module docstring)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training.seed values, each for every setting")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                    help=f"a subset of: {'; '.join(SETTINGS)} (merge-back rows come with 'none')".replace("%", "%%"))
    ap.add_argument("--lr", type=float, default=LR, help="the job's learning rate (lr/10 is a tenth of it)")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of the one worker")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="results JSON (plots beside it); an existing one needs --resume")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pareto-work"), help="data and run folders")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--table-from", type=Path, help="print the table of a results JSON, redraw its plots, exit")
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker)
        return
    if a.table_from:
        doc = json.loads(a.table_from.read_text())
        print(table(doc))
        print("plots:", *plot(doc, a.table_from))
        return
    unknown = [s for s in a.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if a.out.exists() and not a.resume:
        raise SystemExit(f"--out {a.out} exists: pass --resume to add to it, or another --out")
    doc = json.loads(a.out.read_text()) if a.resume and a.out.exists() else None
    if doc is None:
        doc = {"command": harness.command(__file__),
               "settings": {"model": "offline:SmolLM2-135M-Instruct", "method": "LoRA r16 alpha 32, all projections",
                            "lr": a.lr, "scheduler": "cosine, warmup 10%", "steps": STEPS, "batch": BATCH, "world": 1,
                            "deepspeed": "ds_configs/zero2.json", "bf16": False, "max_seq_length": 128,
                            "threads": a.threads, "suite_examples": SUITE_EXAMPLES,
                            "new_task": f"examples/data/units_train.jsonl, eval units_eval.jsonl[:{NEW_EVAL_EXAMPLES}]",
                            "general_qa": "examples/data/general_qa.jsonl[:64]; old data (replay, Fisher, "
                                          "generative prompts) = [64:]",
                            "python_docs": "python_docs_records(): built-in and str docstrings, first paragraph",
                            "python_qa": "bench/data/python_qa.jsonl: the base model's greedy answers to "
                                         "python_docs' prompts",
                            "definitions": {k: v for k, v in SETTINGS.items()}},
               "versions": harness.versions(("torch", "transformers", "peft", "deepspeed"), machine=False),
               "runs": []}
    if doc["settings"]["lr"] != a.lr:
        raise SystemExit(f"--lr {a.lr:g}: {a.out} holds runs at lr {doc['settings']['lr']:g}; use another --out")
    files = prepare_data(a.work)
    done = {(r["setting"], r["seed"]) for r in doc["runs"] if "error" not in r}
    doc["runs"] = [r for r in doc["runs"] if "error" not in r]
    for seed in a.seeds:
        for name in a.settings:
            if (name, seed) in done:
                continue
            tag = f"{name.replace(' ', '_').replace('/', '-').replace('%', 'pct').replace('+', 'and')}-s{seed}"
            run_dir = a.work / "runs" / f"{tag}-{int(time.time())}"
            print(f"[{time.strftime('%H:%M:%S')}] start {name} seed {seed}", flush=True)
            t0 = time.time()
            try:
                res = harness.run_worker(__file__, {"out": str(run_dir / "out"), "setting": name, "seed": seed,
                                                    "files": files, "lr": a.lr}, run_dir, threads=a.threads,
                                         time_key="wall_s")
            except SystemExit as e:
                res = {"setting": name, "seed": seed, "error": str(e), "wall_s": time.time() - t0}
            doc["runs"].append(res)
            save(doc, a.out)
            if "error" in res:
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {name} seed {seed}: {res['error']}", flush=True)
                continue
            row = row_of(res)
            changes = ", ".join(f"{s} {row[f'{s}_change']:+.1%}" for s in suites_of(doc))
            print(f"[{time.strftime('%H:%M:%S')}] done {name} seed {seed} ({res['wall_s']:.0f}s): gain "
                  f"{row['gain']:.3f}, {changes}", flush=True)
            for m in merge_rows(res):
                changes = ", ".join(f"{s} {m[f'{s}_change']:+.1%}" for s in suites_of(doc))
                print(f"    {m['setting']}: gain {m['gain']:.3f}, {changes}", flush=True)
            try:
                plot(doc, a.out)
            except Exception as e:  # noqa: BLE001 -- a plot failure must not stop the sweep
                print(f"plot failed: {e!r}", flush=True)
    print(table(doc))


if __name__ == "__main__":
    main()
