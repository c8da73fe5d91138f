"""What EWC costs: the Fisher pass vs a training pass, and the penalty's share of a training step.

(a) ``--parts fisher``: Fisher pass vs training forward+backward, same N sequences, same model, same
    collate (``distrib_ft.data.formats.collate``), one process, ``OMP_NUM_THREADS`` set by this script:
    - ``train``: the loop's forward+backward (``distrib_ft.monitor.evaluation.token_nll_sum`` over micro-batches of
      8, loss scaled as the loop scales it, ``loss.backward()``), no optimizer; one
      ``torch.optim.AdamW`` step per micro-batch is timed separately (``Fisher / (fwd+bwd + AdamW)``);
    - ``train_b1``: the same one sequence at a time (the floor for a per-sequence estimator);
    - ``fisher``: ``distrib_ft.preservation.fisher.compute_fisher`` with each estimator (empirical: one backward per
      sequence; sampled and batched: one per micro-batch of 8) over the parameters that EWC reads:
      LoRA ``target=trainable`` (the adapter), LoRA ``target=lora_merged`` (the dense weights the adapters
      update) and full fine-tuning (every parameter).
    Each process warms up, then runs ``--rounds`` rounds of all measurements (order rotated from one
    process to the next); per process the ratio of the medians (which cancels most of the machine's
    load); reported: the median over ``--repeats`` fresh processes.

``--parts attribution``: where the extra time goes, part by part (see ``worker_attribution``).

(c) ``--parts grads``: the penalty through the gradients (``EWC.through_grads``: an autograd.Function, and for
    target=trainable added in place into ``.grad``, ``EWC.add_to_grads``, the default) vs autograd of the scalar
    (the implementation before), with and without the value (logging steps), against one micro-batch's
    forward+backward and AdamW's step, paired and interleaved inside each process (see ``worker_grads``).

(b) ``--parts penalty`` (always on the tiny model):
    - ``train()`` runs: a LoRA job (distrib_ft.runtime.loop.train, DeepSpeed ZeRO-0, fp32, micro-batch 8)
      without EWC (``no-ewc``), with EWC target=trainable / lora_merged (lambda 1), each a fresh
      subprocess, interleaved; per run the median tokens/s over the steps after the first ``--warmup``;
      ratio of the medians over runs. Also tokens per CPU-second;
    - ``alt-*``: paired inside one process: the penalty on odd steps only (``EWC.penalty`` wrapped to
      return None on even steps); per run median tokens/s of penalty steps / of the other steps;
    - micro (in the (a) processes): the penalty's own forward+backward (``EWC.penalty`` + ``backward``)
      vs one micro-batch's forward+backward, median of ``--penalty-reps`` timings each.

Usage::

    python bench/ewc_cost.py --steps 60                    # tiny Llama (hidden 256, 4 layers), ~13 min
    python bench/ewc_cost.py --models smollm2 --parts fisher --out bench/results/ewc_cost_smollm2.json
    python bench/ewc_cost.py --models tiny smollm2 --parts attribution --out bench/results/ewc_cost_attribution.json
    python bench/ewc_cost.py --models smollm2 --parts grads --penalty-reps 4 --out bench/results/ewc_cost_grads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import ROOT  # noqa: E402
from harness import median as med  # noqa: E402
from throughput import TARGETS, write_alpaca  # noqa: E402  (same model settings and data)

DEFAULT_OUT = ROOT / "bench" / "results" / "ewc_cost.json"
ESTIMATORS = ("empirical", "sampled", "batched")
MICRO = 8
PENALTY_CONFIGS = ("no-ewc", "ewc-trainable", "ewc-lora_merged", "alt-trainable", "alt-lora_merged")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
KINDS = {"trainable": ("autograd", "grads", "grads+value", "in_place", "in_place+value"),  # worker_grads
         "lora_merged": ("autograd", "grads", "grads+value")}


# ------------------------------------------------------------------------------------------ workers

def _clock():
    return time.perf_counter(), time.process_time()


def worker_fisher(spec: dict) -> dict:
    """(a) and the micro penalty timing, in one process: returns seconds (wall and CPU) per item."""
    import torch
    from datasets import load_from_disk

    from distrib_ft.data.formats import collate
    from distrib_ft.methods import METHODS, build_method
    from distrib_ft.model import load_model, load_tokenizer
    from distrib_ft.preservation.ewc import EWC, EWCConfig, lora_layers
    from distrib_ft.preservation.fisher import compute_fisher
    from distrib_ft.runtime.loss import token_nll_sum
    from distrib_ft.runtime.worker import set_seed

    set_seed(0)
    tok = load_tokenizer(spec["model_dir"])
    section = {"type": spec["method"], **(LORA if spec["method"] == "lora" else {})}
    method = build_method(METHODS[spec["method"]].config_class(**section))
    model = method.apply(load_model(spec["model_dir"], dtype="float32"))
    ds = load_from_disk(spec["data_dir"])
    examples = [ds[i] for i in range(spec["sequences"])]
    pad = tok.pad_token_id
    coll = lambda b: collate(b, pad)  # noqa: E731
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    targets = ["trainable", "lora_merged"] if spec["method"] == "lora" else ["trainable"]
    params = {t: EWC(EWCConfig(**{"lambda": 1.0, "target": t})).fisher_params(model) for t in targets}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-12, foreach=None)

    def train_pass(examples=examples, micro=MICRO):
        model.train()
        for i in range(0, len(examples), micro):
            b = coll(examples[i:i + micro])
            nll, n = token_nll_sum(model, b)
            (nll / max(n, 1)).backward()  # the loop's scale: 1 / target tokens of the (global) batch
            for p in trainable.values():
                p.grad = None

    def fisher_pass(target, estimator, examples=examples):
        compute_fisher(model, params[target], examples, coll, estimator=estimator, batch_size=MICRO, seed=0,
                       device=torch.device("cpu"), progress=False)

    def adamw_step():
        for p in trainable.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Warm-up: allocator, kernels, lazy init (first passes are slower), on a few sequences.
    train_pass(examples[:MICRO])
    train_pass(examples[:2], micro=1)
    for t in targets:
        for e in ESTIMATORS:
            fisher_pass(t, e, examples[:MICRO])
    adamw_step()

    # ``train_b1``: the same forward+backward one sequence at a time (what the empirical estimator must do).
    items = [("train", None, None), ("train_b1", None, None)] + [("fisher", t, e) for t in targets for e in ESTIMATORS]
    k = spec["repeat"] % len(items)
    items = items[k:] + items[:k]  # rotate the order from one process to the next
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(spec["rounds"]):
        for kind, t, e in items:
            w0, c0 = _clock()
            if kind == "fisher":
                fisher_pass(t, e)
            else:
                train_pass(micro=MICRO if kind == "train" else 1)
            w1, c1 = _clock()
            slot = times.setdefault(kind if kind != "fisher" else f"fisher/{t}/{e}", {"wall": [], "cpu": []})
            slot["wall"].append(w1 - w0)
            slot["cpu"].append(c1 - c0)
    times = {k: {"wall_s": statistics.median(v["wall"]), "cpu_s": statistics.median(v["cpu"]), "wall_all": v["wall"]}
             for k, v in times.items()}
    adam = []
    for _ in range(5):
        w0 = time.perf_counter()
        adamw_step()
        adam.append(time.perf_counter() - w0)
    times["adamw_step"] = {"wall_s": statistics.median(adam)}

    # Micro: the penalty's forward+backward vs one micro-batch's forward+backward (median of 20 each).
    batch = examples[:MICRO]
    step, pen = [], {}
    for t in targets:
        ewc = EWC(EWCConfig(**{"lambda": 1.0, "target": t}))
        ewc._params = ewc.fisher_params(model)
        ewc._lora = {f"{n}.base_layer.weight": m for n, m in lora_layers(model)} if t == "lora_merged" else {}
        ewc.fisher = {n: torch.rand(p.shape, dtype=torch.float32) for n, p in ewc._params.items()}
        ewc.anchors = ({n: p.detach().float() + 1e-3 * torch.randn(p.shape) for n, p in ewc._params.items()}
                       if t == "trainable" else {})
        pen[t] = ewc
    rows = {t: [] for t in targets}
    for _ in range(spec["penalty_reps"]):
        w0 = time.perf_counter()
        train_pass(batch)
        step.append(time.perf_counter() - w0)
        for t, ewc in pen.items():
            w0 = time.perf_counter()
            ewc.penalty(model).backward()
            for p in trainable.values():
                p.grad = None
            rows[t].append(time.perf_counter() - w0)
    times["micro_step_fwd_bwd"] = {"wall_s": statistics.median(step)}
    for t in targets:
        times[f"micro_penalty/{t}"] = {"wall_s": statistics.median(rows[t])}

    n_tokens = sum(len(e["input_ids"]) for e in examples)
    n_targets = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    return {"times": times, "tokens": n_tokens, "target_tokens": n_targets, "sequences": len(examples),
            "parameters": sum(p.numel() for p in model.parameters()),
            "fisher_parameters": {t: sum(p.numel() for p in params[t].values()) for t in targets},
            "torch_threads": torch.get_num_threads()}


def worker_train(spec: dict) -> dict:
    """(b): one train() job; per-step tokens/s and tokens per CPU-second from its metrics."""
    out = Path(spec["work"]) / "out"
    raw = harness.job_dict(
        spec["model_dir"], {"type": "lora", **LORA},
        {"train_files": [spec["data_dir"]], "format": "tokenized", "max_seq_length": 128},
        {"output_dir": str(out), "max_steps": spec["steps"], "per_device_train_batch_size": MICRO,
         "learning_rate": 2e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "bf16": False,
         "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "seed": 0},
        zero=0, threads=spec["threads"], dtype="float32")
    if spec["config"] != "no-ewc":
        raw["ewc"] = {"lambda": 1.0, "target": spec["config"].split("-", 1)[1], "estimator": "sampled",
                      "fisher_data_files": [spec["data_dir"]], "fisher_max_sequences": 16}
    if spec["config"].startswith("alt-"):
        # Paired design inside one process: the penalty on odd steps only (EWC.penalty returns None on
        # even steps, which the loop treats as "no penalty"), so both kinds of step share the process,
        # its memory layout and the machine's load of the moment.
        from distrib_ft.preservation.ewc import EWC

        penalty, calls = EWC.penalty, [0]

        def every_other(self, model):
            calls[0] += 1
            return penalty(self, model) if calls[0] % 2 == 1 else None

        EWC.penalty = every_other
    m = harness.train_and_measure(raw, out)
    return {"tokens_per_second": m["tokens_per_second"], "tokens_per_cpu_second": m["tokens_per_cpu_second"],
            "loss": m["loss"], "ewc_penalty": [r.get("ewc_penalty") for r in m["records"]], "wall_s": m["wall_s"]}


def worker_attribution(spec: dict) -> dict:
    """Where the extra time of a Fisher pass and of the penalty goes, per part, on this model's sizes.

    Median of 5 timings each; tensors of the model's shapes filled with random numbers:

    - ``sample_labels``: ``distrib_ft.preservation.fisher._sample_labels`` on one micro-batch's logits (8 x T x vocab,
      T = the longest of the first 8 sequences): softmax and one multinomial draw at *every* position;
      ``sample_targets_only``: the same draws at the target positions only (what the estimator needs);
    - ``accumulate_pow_add``: ``acc.add_(g.float().pow(2))`` over every parameter (what compute_fisher does
      per backward pass) vs ``accumulate_addcmul``: ``acc.addcmul_(g, g)`` (no temporary);
    - ``penalty_autograd``: ``EWC.penalty`` forward + backward over every parameter (full fine-tuning) vs
      ``penalty_direct``: adding its gradient lambda * F * (theta - theta*) straight into ``.grad``.
    """
    import torch
    from datasets import load_from_disk

    from distrib_ft.model import load_model
    from distrib_ft.preservation.ewc import EWC, EWCConfig
    from distrib_ft.preservation.fisher import _sample_labels

    torch.manual_seed(0)
    model = load_model(spec["model_dir"], dtype="float32")
    ds = load_from_disk(spec["data_dir"])
    first = [ds[i] for i in range(MICRO)]
    T = max(len(e["input_ids"]) for e in first)
    labels = torch.full((MICRO, T), -100, dtype=torch.long)
    for row, e in enumerate(first):
        labels[row, :len(e["labels"])] = torch.as_tensor(e["labels"])
    V = model.config.vocab_size
    logits = torch.randn(MICRO, T, V)
    gen = torch.Generator().manual_seed(0)

    def timed(fn, n=5):
        xs = []
        for _ in range(n):
            w0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - w0)
        return statistics.median(xs)

    def sample_targets_only():
        probs = torch.softmax(logits[:, :-1][labels[:, 1:] != -100].float(), dim=-1)
        torch.multinomial(probs, 1, generator=gen)

    params = [p for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    accs = [torch.zeros_like(p) for p in params]
    out = {"vocab": V, "T": T, "targets": int((labels[:, 1:] != -100).sum()), "positions": MICRO * (T - 1),
           "parameters": sum(p.numel() for p in params)}
    out["sample_labels"] = timed(lambda: _sample_labels(logits, labels, gen))
    out["sample_targets_only"] = timed(sample_targets_only)
    out["accumulate_pow_add"] = timed(lambda: [a.add_(g.detach().float().pow(2)) for a, g in zip(accs, grads)])
    out["accumulate_addcmul"] = timed(lambda: [a.addcmul_(g, g) for a, g in zip(accs, grads)])
    ewc = EWC(EWCConfig(**{"lambda": 1.0}))
    ewc._params = dict(model.named_parameters())
    ewc.fisher = {n: torch.rand(p.shape) for n, p in ewc._params.items()}
    ewc.anchors = {n: p.detach() + 1e-3 * torch.randn(p.shape) for n, p in ewc._params.items()}

    def autograd_penalty():
        ewc.penalty(model).backward()

    def direct():
        with torch.no_grad():
            for n, p in ewc._params.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.addcmul_(ewc.fisher[n], p - ewc.anchors[n], value=ewc.lam)

    out["penalty_autograd"] = timed(autograd_penalty)
    model.zero_grad(set_to_none=False)
    out["penalty_direct"] = timed(direct)
    return out


def worker_grads(spec: dict) -> dict:
    """(c) The penalty through the gradients vs autograd of the scalar, paired in one process (issue 13).

    Per repetition, in a rotated order: one micro-batch's forward+backward (``MICRO`` sequences, the loop's loss
    scale), and for each EWC target the penalty's forward+backward as the loop runs it, added into gradients that
    already hold the step's (``.grad`` preset to zeros, as after the micro-batch's backward):
    ``autograd`` (``EWC.through_grads = False``, the implementation before), ``grads`` (the closed-form gradient
    through ``distrib_ft.preservation.ewc.through_gradients``, a non-logging step) and ``grads+value`` (a logging
    step: the value computed too); for target=trainable also ``in_place`` / ``in_place+value`` (``EWC.add_to_grads``,
    the default since: lambda F (theta - theta*) added into ``.grad`` in place, as the loop does after the
    backward; distrib_ft/preservation/grad_buffers.py). Returns the median seconds of each.
    """
    import torch
    from datasets import load_from_disk

    from distrib_ft.data.formats import collate
    from distrib_ft.methods import METHODS, build_method
    from distrib_ft.model import load_model, load_tokenizer
    from distrib_ft.preservation.ewc import EWC, EWCConfig, lora_layers
    from distrib_ft.runtime.loss import token_nll_sum
    from distrib_ft.runtime.worker import set_seed

    set_seed(0)
    tok = load_tokenizer(spec["model_dir"])
    section = {"type": spec["method"], **(LORA if spec["method"] == "lora" else {})}
    method = build_method(METHODS[spec["method"]].config_class(**section))
    model = method.apply(load_model(spec["model_dir"], dtype="float32"))
    ds = load_from_disk(spec["data_dir"])
    batch = collate([ds[i] for i in range(MICRO)], tok.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    targets = ["trainable", "lora_merged"] if spec["method"] == "lora" else ["trainable"]
    with torch.no_grad():  # a LoRA update away from 0 (B = 0 at init), so dW and its gradients are not all zeros
        for _, m in lora_layers(model):
            for b in m.lora_B.values():
                b.weight.normal_(0, 1e-3)
    pen = {}
    for t in targets:
        ewc = EWC(EWCConfig(**{"lambda": 1.0, "target": t}))
        ewc._params = ewc.fisher_params(model)
        ewc._lora = {f"{n}.base_layer.weight": m for n, m in lora_layers(model)} if t == "lora_merged" else {}
        ewc.fisher = {n: torch.rand(p.shape, dtype=torch.float32) for n, p in ewc._params.items()}
        ewc.anchors = ({n: p.detach().float() + 1e-3 * torch.randn(p.shape) for n, p in ewc._params.items()}
                       if t == "trainable" else {})
        pen[t] = ewc

    def step():
        model.train()
        nll, n = token_nll_sum(model, batch)
        (nll / max(n, 1)).backward()

    def penalty(ewc, kind):
        def run():
            if kind.startswith("in_place"):  # as the loop: after the backward, into the gradients in place
                ewc._in_place = True
                ewc.add_to_grads(model, logging=kind.endswith("+value"))
                return
            ewc._in_place = False
            EWC.through_grads = kind != "autograd"
            ewc.penalty(model, logging=kind != "grads").backward()
        return run

    opt = torch.optim.AdamW(trainable, lr=1e-6, foreach=None)  # as distrib_ft/runtime/engine.py builds it

    def adamw():  # the optimizer's own pass over the parameters (``.grad`` preset, as after the penalty)
        opt.step()

    items = [("step", step), ("adamw", adamw)] + [(f"{t}/{k}", penalty(pen[t], k)) for t in targets
                                                  for k in KINDS[t]]
    rows: dict[str, list[float]] = {k: [] for k, _ in items}
    for rep in range(spec["penalty_reps"] + 1):  # the first round warms up and is left out
        k0 = (rep + spec["repeat"]) % len(items)
        for key, fn in items[k0:] + items[:k0]:
            for p in trainable:
                p.grad = torch.zeros_like(p)
            w0 = time.perf_counter()
            fn()
            if rep:
                rows[key].append(time.perf_counter() - w0)
    EWC.through_grads = True
    return {"times": {k: statistics.median(v) for k, v in rows.items()}, "all": rows,
            "parameters": sum(p.numel() for p in model.parameters()),
            "fisher_parameters": {t: sum(p.numel() for p in pen[t]._params.values()) for t in targets},
            "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def worker_main(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    result = {"fisher": worker_fisher, "train": worker_train, "attribution": worker_attribution,
              "grads": worker_grads}[spec["kind"]](spec)
    harness.write_result(spec, result)


# ---------------------------------------------------------------------------------------- the driver

def run_worker(spec: dict, run_dir: Path) -> dict:
    """One worker (``spec["kind"]``) in a fresh process with ``spec["threads"]``; its result and ``process_s``."""
    return harness.run_worker(__file__, spec, run_dir, threads=spec["threads"], time_key="process_s")


def prepare(work: Path, model: str, args) -> dict:
    from distrib_ft.data.formats import build_dataset
    from distrib_ft.model import load_tokenizer

    if model == "tiny":
        from distrib_ft.tiny import build_tiny_model

        model_dir = str(build_tiny_model(work / "tiny", hidden_size=args.hidden, num_layers=args.layers,
                                         num_heads=args.heads))
        desc = f"tiny Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab 384"
    else:
        from distrib_ft.assets import smollm2_path

        model_dir, desc = str(smollm2_path()), "SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152)"
    jsonl = work / "data.jsonl"
    if not jsonl.exists():
        write_alpaca(jsonl, 400)
    ds, stats = build_dataset([str(jsonl)], fmt="alpaca", tokenizer=load_tokenizer(model_dir), max_seq_length=160)
    data_dir = work / f"tokenized-{model}"
    ds.save_to_disk(str(data_dir))
    return {"model_dir": model_dir, "data_dir": str(data_dir), "description": desc, "data_summary": stats.summary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration, interleaved (3)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process (1)")
    p.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "smollm2"], help="models for (a)")
    p.add_argument("--sequences", type=int, default=64, help="sequences of a pass, tiny model (64)")
    p.add_argument("--smollm2-sequences", type=int, default=16, help="sequences of a pass, SmolLM2 (16)")
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of all (a) measurements per process, tiny (3)")
    p.add_argument("--smollm2-rounds", type=int, default=1, help="rounds per process, SmolLM2 (1)")
    p.add_argument("--penalty-reps", type=int, default=20, help="timings of the micro penalty measurement (20)")
    p.add_argument("--steps", type=int, default=30, help="steps of each train() run in (b) (30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each train() run left out (5)")
    p.add_argument("--penalty-configs", nargs="+", default=list(PENALTY_CONFIGS), choices=PENALTY_CONFIGS,
                   help="train() runs of (b): plain runs without / with EWC, and alt-*: the penalty every other step")
    p.add_argument("--parts", nargs="+", default=["fisher", "attribution", "penalty"],
                   choices=["fisher", "attribution", "penalty", "grads"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    tmp = tempfile.TemporaryDirectory(prefix="distrib-ft-ewc-cost-")
    work = Path(tmp.name)
    t_start = time.time()
    models = list(dict.fromkeys(args.models + (["tiny"] if "penalty" in args.parts else [])))
    prep = {m: prepare(work, m, args) for m in models}
    for m, pr in prep.items():
        print(f"{m}: {pr['description']}; data: {pr['data_summary']}", file=sys.stderr)
    log = harness.progress_log(t_start)

    fisher_runs, train_runs, rid = [], [], 0
    if "fisher" in args.parts:
        for rep in range(args.repeats):
            for m in args.models:
                for method in args.methods:
                    n = args.sequences if m == "tiny" else args.smollm2_sequences
                    spec = {"kind": "fisher", "threads": args.threads, "model_dir": prep[m]["model_dir"],
                            "data_dir": prep[m]["data_dir"], "method": method, "sequences": n, "repeat": rep,
                            "penalty_reps": args.penalty_reps,
                            "rounds": args.rounds if m == "tiny" else args.smollm2_rounds}
                    res = run_worker(spec, work / f"run{rid:03d}")
                    rid += 1
                    res.update(model=m, method=method, repeat=rep)
                    fisher_runs.append(res)
                    tr = res["times"]["train"]["wall_s"]
                    log(f"rep {rep} {m} {method}: train fwd+bwd {tr:.2f}s; " + ", ".join(
                        f"{k.removeprefix('fisher/')} {v['wall_s'] / tr:.2f}x" for k, v in res["times"].items()
                        if k.startswith("fisher/")))
    attribution = {}
    if "attribution" in args.parts:
        for m in args.models:
            spec = {"kind": "attribution", "threads": args.threads, "model_dir": prep[m]["model_dir"],
                    "data_dir": prep[m]["data_dir"]}
            attribution[m] = run_worker(spec, work / f"run{rid:03d}")
            rid += 1
            log(f"attribution {m}: " + ", ".join(f"{k} {v:.3f}s" for k, v in attribution[m].items()
                                                  if isinstance(v, float) and k != "process_s"))
    if "penalty" in args.parts:
        configs = args.penalty_configs
        for rep in range(args.repeats):
            for c in configs:
                spec = {"kind": "train", "threads": args.threads, "model_dir": prep["tiny"]["model_dir"],
                        "data_dir": prep["tiny"]["data_dir"], "config": c, "steps": args.steps}
                res = run_worker(spec, work / f"run{rid:03d}")
                rid += 1
                res.update(config=c, repeat=rep,
                           median_tokens_per_second=med(res["tokens_per_second"][args.warmup:]),
                           median_tokens_per_cpu_second=med(res["tokens_per_cpu_second"][args.warmup:]))
                train_runs.append(res)
                log(f"rep {rep} {c}: {res['median_tokens_per_second']:.0f} tok/s, "
                    f"{res['median_tokens_per_cpu_second']:.0f} tok/CPU-s; process {res['process_s']:.0f}s")

    grads_runs = []
    if "grads" in args.parts:
        for rep in range(args.repeats):
            for m in args.models:
                for method in args.methods:
                    spec = {"kind": "grads", "threads": args.threads, "model_dir": prep[m]["model_dir"],
                            "data_dir": prep[m]["data_dir"], "method": method, "repeat": rep,
                            "penalty_reps": args.penalty_reps}
                    res = run_worker(spec, work / f"run{rid:03d}")
                    rid += 1
                    res.update(model=m, method=method, repeat=rep)
                    grads_runs.append(res)
                    st = res["times"]["step"]
                    log(f"rep {rep} {m} {method}: step fwd+bwd {st:.2f}s (load {res['loadavg'][0]:.1f}); " + ", ".join(
                        f"{k} {100 * v / st:.1f}%" for k, v in res["times"].items() if k != "step"))

    # ---- summary
    summary, lines = {"fisher": {}, "micro_penalty": {}, "train_penalty": {}, "grads": {}}, []
    if grads_runs:
        lines += ["### (c) The penalty through the gradients vs autograd of the scalar, paired in one process", "",
                  "The default path: target=trainable in place into the gradients (``in_place``), lora_merged "
                  "through the autograd.Function (``grads``).", "",
                  "| model | method | EWC target | step fwd+bwd ms | autograd ms | autograd.Function ms | "
                  "in place ms | **autograd / step** | autograd.Function / step | in place / step | "
                  "**default / step** | default + value (logging steps) / step | per-process default / step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in args.models:
            for method in args.methods:
                rs = [r for r in grads_runs if r["model"] == m and r["method"] == method]
                if not rs:
                    continue
                st = med([r["times"]["step"] for r in rs])
                for t in (["trainable", "lora_merged"] if method == "lora" else ["trainable"]):
                    kinds = [k for k in KINDS[t] if f"{t}/{k}" in rs[0]["times"]]
                    ms = {k: med([r["times"][f"{t}/{k}"] for r in rs]) for k in kinds}
                    share = {k: med([r["times"][f"{t}/{k}"] / r["times"]["step"] for r in rs]) for k in ms}
                    default = "in_place" if "in_place" in ms else "grads"
                    per = [r["times"][f"{t}/{default}"] / r["times"]["step"] for r in rs]
                    with_opt = [r["times"][f"{t}/{default}"] / (r["times"]["step"] + r["times"]["adamw"]) for r in rs
                                if "adamw" in r["times"]]  # of the step with its optimizer update
                    summary["grads"][f"{m}/{method}/{t}"] = {"step_ms": 1e3 * st, **{f"{k}_ms": 1e3 * v for k, v in
                                                             ms.items()}, **{f"{k}_share": v for k, v in share.items()},
                                                             "default": default, "default_share_per_process": per,
                                                             "default_share_of_step_with_adamw": med(with_opt)
                                                             if with_opt else None,
                                                             "loadavg": [r["loadavg"] for r in rs]}
                    cell = lambda k, d=ms: f"{1e3 * d[k]:.1f}" if k in d else "-"  # noqa: E731
                    pct = lambda k, d=share: f"{100 * d[k]:.1f}%" if k in d else "-"  # noqa: E731
                    lines.append(f"| {m} | {method} | {t} | {1e3 * st:.0f} | {cell('autograd')} | {cell('grads')} | "
                                 f"{cell('in_place')} | **{pct('autograd')}** | {pct('grads')} | {pct('in_place')} | "
                                 f"**{pct(default)}** | {pct(default + '+value')} | "
                                 f"{' / '.join(f'{100 * x:.1f}%' for x in per)} |")
        lines.append("")
    if fisher_runs:
        lines += ["### Fisher pass vs training forward+backward (same sequences, same process)", "",
                  "| model | method | EWC target (F over) | estimator | backward passes | Fisher s | train fwd+bwd s | "
                  "**Fisher / fwd+bwd** | per-process ratios | Fisher / fwd+bwd (CPU time) | "
                  "Fisher / (fwd+bwd + AdamW steps) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        steps_of = lambda n: -(-n // MICRO)  # noqa: E731
        for m in args.models:
            for method in args.methods:
                rs = [r for r in fisher_runs if r["model"] == m and r["method"] == method]
                if not rs:
                    continue
                n = rs[0]["sequences"]
                tr = med([r["times"]["train"]["wall_s"] for r in rs])
                full_step = med([r["times"]["train"]["wall_s"] + r["times"]["adamw_step"]["wall_s"] * steps_of(n)
                                 for r in rs])
                targets = ["trainable", "lora_merged"] if method == "lora" else ["trainable"]
                rows = [("train_b1", None, None)] + [("fisher", t, e) for t in targets for e in ESTIMATORS]
                for kind, t, e in rows:
                    key = "train_b1" if kind == "train_b1" else f"fisher/{t}/{e}"
                    fs = med([r["times"][key]["wall_s"] for r in rs])
                    ratios = [r["times"][key]["wall_s"] / r["times"]["train"]["wall_s"] for r in rs]
                    ratios_cpu = [r["times"][key]["cpu_s"] / r["times"]["train"]["cpu_s"] for r in rs]
                    ratio_step = [r["times"][key]["wall_s"]
                                  / (r["times"]["train"]["wall_s"] + r["times"]["adamw_step"]["wall_s"] * steps_of(n))
                                  for r in rs]
                    passes = n if e in ("empirical", None) else steps_of(n)
                    summary["fisher"][f"{m}/{method}/{key.removeprefix('fisher/')}"] = {
                        "seconds": fs, "train_fwd_bwd_s": tr, "train_step_s": full_step,
                        "ratio": med(ratios), "ratios": ratios, "ratio_cpu": med(ratios_cpu),
                        "ratio_vs_train_step": med(ratio_step), "backward_passes": passes, "sequences": n,
                        "fisher_parameters": rs[0]["fisher_parameters"][t] if t else None,
                        "parameters": rs[0]["parameters"]}
                    what = (f"{t} ({rs[0]['fisher_parameters'][t]:,})", e) if t else \
                        ("(reference: training fwd+bwd at micro-batch 1)", "-")
                    lines.append(f"| {m} | {method} | {what[0]} | {what[1]} | {passes} | {fs:.2f} | {tr:.2f} | "
                                 f"**{med(ratios):.2f}** | {' / '.join(f'{x:.2f}' for x in ratios)} | "
                                 f"{med(ratios_cpu):.2f} | {med(ratio_step):.2f} |")
        lines += ["", "### Penalty forward+backward vs one training step's forward+backward (micro-batch of 8)", "",
                  "| model | method | EWC target | step fwd+bwd ms | penalty fwd+bwd ms | penalty / step |",
                  "|---|---|---|---|---|---|"]
        for m in args.models:
            for method in args.methods:
                rs = [r for r in fisher_runs if r["model"] == m and r["method"] == method]
                if not rs:
                    continue
                st = med([r["times"]["micro_step_fwd_bwd"]["wall_s"] for r in rs])
                for t in (["trainable", "lora_merged"] if method == "lora" else ["trainable"]):
                    pen = med([r["times"][f"micro_penalty/{t}"]["wall_s"] for r in rs])
                    share = med([r["times"][f"micro_penalty/{t}"]["wall_s"] / r["times"]["micro_step_fwd_bwd"]["wall_s"]
                                 for r in rs])
                    summary["micro_penalty"][f"{m}/{method}/{t}"] = {"step_ms": 1e3 * st, "penalty_ms": 1e3 * pen,
                                                                     "share": share}
                    lines.append(f"| {m} | {method} | {t} | {1e3 * st:.1f} | {1e3 * pen:.2f} | {100 * share:.1f}% |")
    if train_runs:
        lines += ["", f"### train() step throughput with and without the EWC penalty (LoRA r=16, tiny model, "
                  f"{args.steps} steps, first {args.warmup} left out)", "",
                  "| configuration | tokens/s (median of run medians) | per-run medians | vs no-ewc | "
                  "tokens per CPU-second | vs no-ewc (CPU) |", "|---|---|---|---|---|---|"]
        base = base_cpu = None
        for c in ("no-ewc", "ewc-trainable", "ewc-lora_merged"):
            rs = [r for r in train_runs if r["config"] == c]
            if not rs:
                continue
            w = med([r["median_tokens_per_second"] for r in rs])
            cpu = med([r["median_tokens_per_cpu_second"] for r in rs])
            base, base_cpu = base or w, base_cpu or cpu
            per_run = [r["median_tokens_per_second"] for r in rs]
            summary["train_penalty"][c] = {"median_tokens_per_second": w,
                                           "per_run": [r["median_tokens_per_second"] for r in rs],
                                           "median_tokens_per_cpu_second": cpu, "ratio_vs_no_ewc": w / base,
                                           "ratio_vs_no_ewc_cpu": cpu / base_cpu}
            lines.append(f"| {c} | {w:,.0f} | {' / '.join(f'{x:,.0f}' for x in per_run)} | "
                         f"{w / base:.3f} | {cpu:,.0f} | {cpu / base_cpu:.3f} |")
    alt = [r for r in train_runs if r["config"].startswith("alt-")]
    if alt:
        lines += ["", "### Same, paired inside one process: the penalty on every other step (odd steps with, even "
                  "steps without)", "", "| EWC target | tokens/s with penalty / without (median of per-run ratios) | "
                  "per-run ratios | same in tokens per CPU-second |", "|---|---|---|---|"]
        for c in sorted({r["config"] for r in alt}):
            rs = [r for r in alt if r["config"] == c]
            ratios, ratios_cpu = [], []
            for r in rs:
                for key, acc in (("tokens_per_second", ratios), ("tokens_per_cpu_second", ratios_cpu)):
                    vals = r[key][args.warmup:]
                    steps = range(args.warmup + 1, args.warmup + 1 + len(vals))
                    on = med([v for st, v in zip(steps, vals) if st % 2 == 1])
                    off = med([v for st, v in zip(steps, vals) if st % 2 == 0])
                    acc.append(on / off)
            summary["train_penalty"][c] = {"ratio_with_vs_without": med(ratios), "per_run": ratios,
                                           "ratio_cpu": med(ratios_cpu), "per_run_cpu": ratios_cpu}
            lines.append(f"| {c.removeprefix('alt-')} | {med(ratios):.3f} | {' / '.join(f'{x:.3f}' for x in ratios)} | "
                         f"{med(ratios_cpu):.3f} |")
    if attribution:
        lines += ["",
                  "### Where the extra time goes (seconds, one micro-batch of 8 / one pass over every parameter)", "",
                  "| model | sample labels at every position | at target positions only | accumulate "
                  "`add_(g.pow(2))` | `addcmul_(g, g)` | penalty fwd+bwd (autograd, full FT) | its gradient added "
                  "directly |", "|---|---|---|---|---|---|---|"]
        for m, a in attribution.items():
            lines.append(f"| {m} (vocab {a['vocab']:,}; {a['positions']:,} positions, {a['targets']:,} targets; "
                         f"{a['parameters']:,} parameters) | {a['sample_labels']:.3f} | "
                         f"{a['sample_targets_only']:.3f} | {a['accumulate_pow_add']:.3f} | "
                         f"{a['accumulate_addcmul']:.3f} | {a['penalty_autograd']:.3f} | {a['penalty_direct']:.3f} |")
        summary["attribution"] = attribution
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": harness.command(__file__),
              "settings": {"threads": args.threads, "repeats": args.repeats, "micro_batch": MICRO, "lora": LORA,
                           "models": {m: {k: v for k, v in pr.items() if k != "data_dir"} for m, pr in prep.items()},
                           "sequences": {"tiny": args.sequences, "smollm2": args.smollm2_sequences},
                           "train_steps": args.steps, "warmup_steps_excluded": args.warmup},
              "versions": harness.versions(), "loadavg_at_end": os.getloadavg(), "total_s": time.time() - t_start,
              "summary": summary, "table_markdown": table, "fisher_runs": fisher_runs, "grads_runs": grads_runs,
              "train_runs": [{k: ([round(x, 3) if isinstance(x, float) else x for x in v] if isinstance(v, list) else v)
                              for k, v in r.items()} for r in train_runs]}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nraw results: {args.out}", file=sys.stderr)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
