"""The jobs a worker can run, by name: what the CLI's commands hand to the launcher.

Each job takes a :class:`~distrib_ft.job.Job` (resolved on the driver, or a JobConfig resolved on the
worker) and keyword arguments, runs on every rank, and returns a JSON-able dict on every rank.
"""

from __future__ import annotations

from distrib_ft.data.formats import build_dataset
from distrib_ft.export import load_merged
from distrib_ft.methods import load_trained
from distrib_ft.model import load_model, load_tokenizer
from distrib_ft.monitor.budget import Monitor
from distrib_ft.monitor.evaluation import evaluate_nll, evaluate_suites, load_suites
from distrib_ft.monitor.report import write_report
from distrib_ft.preservation import Context
from distrib_ft.preservation.ewc import EWC
from distrib_ft.runtime import dist
from distrib_ft.runtime.loop import train
from distrib_ft.runtime.worker import build_model_engine, start_worker


def fisher(job, out: str) -> dict:
    """``distrib-ft fisher``: the Fisher of the job's model and method on ``ewc.fisher_data_files``.

    Written to ``out`` (safetensors) with the anchors (target=trainable). Rank 0 writes. Returns the Fisher's info.
    Under ZeRO-3 with partitioned parameters each rank computes F of its own partitions and the file gets the
    gathered full tensors: the same file whatever the world size.
    """
    job = start_worker(job)
    cfg = job.config
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    engine, _, _, _ = build_model_engine(job, total_steps=1, warmup_steps=0)
    ewc = EWC(cfg.ewc, Context.of(cfg, tokenizer))
    fisher_values, info = ewc.compute(engine.module, ewc.fisher_examples())
    anchors = ewc.current_anchors(engine.module)
    ewc.write(out, engine.module, fisher_values, info, anchors)
    dist.print0(f"fisher: {info['estimator']} over {info['sequences']} sequences ({info['target_tokens']} target "
                f"tokens), {len(fisher_values)} tensors -> {out}")
    return info


def evaluate(job, model_path: str | list[str] | None, out: str) -> dict:
    """``distrib-ft eval``: the job's retention suites and new-task eval set, before and after, against its budgets.

    Evaluated on the base model (step 0, "before") and on ``model_path`` (step 1, "after": a final/ folder with a
    peft adapter or a full model; a list: peft adapters of the base merged into it in order, their updates summed),
    with the job's budgets; writes report.json/md and plots to ``out``. Rank 0 writes.

    The models are plain Hugging Face models on each rank (no DeepSpeed sharding), evaluated on each
    rank's share of every set with the sums all-reduced. Returns ``{"exit_code", "decision"}``.
    """
    job = start_worker(job)
    cfg = job.config
    d, mc, t = cfg.data, cfg.monitor, cfg.training
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    suites = load_suites(mc.suites, tokenizer, max_seq_length=d.max_seq_length, prompt_template=d.prompt_template)
    eval_ds = (dist.main_first(lambda: build_dataset(d.eval_files, fmt=d.format, tokenizer=tokenizer,
                                                     max_seq_length=d.max_seq_length,
                                                     prompt_template=d.prompt_template))[0]
               if d.eval_files else None)
    if not suites and eval_ds is None:
        raise ValueError("monitor.suites: nothing to evaluate; list retention suites or data.eval_files")
    monitor = Monitor([sd.suite for sd in suites], policy="report")

    def load(path: str):
        return load_model(path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                          trust_remote_code=cfg.model.trust_remote_code)

    models = [("base", lambda: load(cfg.model.name_or_path))]
    if isinstance(model_path, (list, tuple)) and len(model_path) > 1:
        models.append(("candidate", lambda: load_merged(load(cfg.model.name_or_path), model_path)))
        candidate = " + ".join(map(str, model_path)) + " (adapters merged into the base in this order)"
    elif model_path is not None:
        model_path = model_path[0] if isinstance(model_path, (list, tuple)) else model_path
        models.append(("candidate", lambda: load_trained(cfg.model.name_or_path, model_path, load_model=load)))
        candidate = str(model_path)
    for step, (label, make) in enumerate(models):
        model = make().to(dist.device())
        new = evaluate_nll(model, eval_ds, batch_size=t.per_device_eval_batch_size,
                           pad_token_id=tokenizer.pad_token_id) if eval_ds is not None else {}
        values = evaluate_suites(model, tokenizer, suites, batch_size=t.per_device_eval_batch_size)
        monitor.record(step, values, new.get("eval_loss"))
        dist.print0(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in {**values, **new}.items()
                                            if k not in ("eval_tokens", "eval_perplexity")))
    chosen, decision = monitor.choose(monitor.steps[-1], [])
    report = monitor.report(chosen, decision, notes=[f"step 0 = {cfg.model.name_or_path}",
                                                      f"step 1 = {candidate}" if model_path else "base model only"])
    if dist.is_main():
        write_report(report, out)
    dist.barrier()
    return {"exit_code": report["exit_code"], "decision": decision}


JOBS = {"train": train, "fisher": fisher, "eval": evaluate}
