"""``distrib-ft``: the command line.

    distrib-ft train JOB.yaml [section.key=value ...] [--resume] [--address ADDR] [--launcher ray|local]
    distrib-ft fisher JOB.yaml [section.key=value ...] --out FILE.safetensors [--address ADDR] [--launcher ...]
    distrib-ft eval JOB.yaml [section.key=value ...] [--model PATH [--model PATH ...]] [--out DIR] [--address ADDR]
                    [--launcher ...]
    distrib-ft export RUN_DIR_OR_FINAL --out DIR [--merge] [--dtype float32|bfloat16|float16] [--base MODEL]
                      [--overwrite]
    distrib-ft merge --adapters A B ... --method linear|cat|ties|dare_ties [--weights W ...] [--density D]
                     --out DIR [--base MODEL] [--seed N] [--overwrite]
    distrib-ft replay build --out DIR [--format FMT] [--budget N] [--policy uniform|reservoir] [--quota NAME=N]
                            [--weight NAME=W] [--shard-size N] [--seed N] FILE...
    distrib-ft replay update DIR [--budget N] [--policy ...] [--quota NAME=N] [--weight NAME=W] FILE...
    distrib-ft replay show DIR [--version N]
    distrib-ft status OUTPUT_DIR [--json]
    distrib-ft registry list|show|promote|rollback REGISTRY [VERSION] [--to VERSION] [--force] [--json]
    distrib-ft retrain PIPELINE.yaml [--round NAME] [--launcher ray|local] [--address ADDR]

Exit codes (stable; schedulers may rely on them):
    0  the job finished and final/ is within the forgetting budget
    1  the job failed while running (a worker raised; see the message and the log)
    2  usage or input error: bad arguments, job file, DeepSpeed JSON, data or model path (nothing ran)
    3  forgetting budget breached and no checkpoint qualifies: the model is in rejected/, not final/
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. ``| head``): stopped quietly, as a program killed by SIGPIPE (128 + 13)

Every train (and eval) that ran writes OUTPUT_DIR/verdict.json (distrib_ft/runtime/verdict.py) and prints its path
last; ``distrib-ft status OUTPUT_DIR`` prints it and exits with the job's code (2: no verdict there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BUDGET = 3  # = distrib_ft.monitor.budget.EXIT_BUDGET
EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of stdout closed it early


class UsageError(Exception):
    """An input problem found before anything ran; printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrib-ft", description="Distributed fine-tuning without forgetting "
                                "(DeepSpeed workers launched by Ray).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a fine-tuning job")
    t.add_argument("job", help="job YAML file")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="override keys of the job file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.add_argument("--address", default=None,
                   help="Ray cluster to run on (e.g. auto, ray://head:10001); default: an embedded local Ray")
    t.add_argument("--launcher", choices=["ray", "local"], default="ray",
                   help="local: run the loop in this process (one rank, or each rank under torchrun)")
    f = sub.add_parser("fisher", help="compute the diagonal Fisher of the job's model on ewc.fisher_data_files")
    f.add_argument("job", help="job YAML file")
    f.add_argument("overrides", nargs="*", metavar="section.key=value", help="override keys of the job file")
    f.add_argument("--out", required=True, help="the safetensors file to write")
    f.add_argument("--address", default=None, help="Ray cluster to run on; default: an embedded local Ray")
    f.add_argument("--launcher", choices=["ray", "local"], default="ray", help="local: in this process")
    e = sub.add_parser("eval", help="evaluate a model or adapter on the job's retention suites against its base")
    e.add_argument("job", help="job YAML file")
    e.add_argument("overrides", nargs="*", metavar="section.key=value", help="override keys of the job file")
    e.add_argument("--model", action="append", default=None,
                   help="a final/ folder (peft adapter or full model); default: the job's final/ if it exists, else "
                   "only the base model. Repeated: LoRA adapters of the job's base, merged into it in this order "
                   "(their updates summed) and evaluated as one model")
    e.add_argument("--out", default=None, help="where the report goes (default: OUTPUT_DIR/eval)")
    e.add_argument("--address", default=None, help="Ray cluster to run on; default: an embedded local Ray")
    e.add_argument("--launcher", choices=["ray", "local"], default="ray", help="local: in this process")
    for q in (t, f, e):  # launcher/console.py
        q.add_argument("--verbose", action="store_true", help="show Ray's own lines (its INFO and warnings, the "
                       "Train controller's, every rank's output) on the console too; default: rank 0's and ours "
                       "only, Ray's go to its logs folder (the first line names it); also DISTRIB_FT_VERBOSE=1")
    x = sub.add_parser("export", help="a run's final/ (or an adapter or model folder) as a plain Hugging Face folder")
    x.add_argument("path", metavar="RUN_DIR_OR_FINAL", help="a job's training.output_dir (its final/ is exported), a "
                   "final/ folder, a peft adapter folder or a model folder")
    x.add_argument("--out", required=True, help="the folder to write (written beside it first, then renamed)")
    x.add_argument("--merge", action="store_true", help="merge a LoRA/DoRA adapter into its base (loaded in fp32) "
                   "and write the whole model; adapters that cannot merge are exported as they are")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of a written model (default: the base model's saved dtype)")
    x.add_argument("--base", default=None, help="the base model to merge into (default: the adapter's "
                   "base_model_name_or_path)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m = sub.add_parser("merge", help="combine LoRA adapters of one base into one adapter (peft add_weighted_adapter)")
    m.add_argument("--adapters", nargs="+", required=True, metavar="ADAPTER",
                   help="LoRA adapter folders (or run folders: their final/)")
    m.add_argument("--method", required=True, choices=["linear", "cat", "ties", "dare_ties"],
                   help="cat: exact sum of the updates (rank = sum of ranks); linear: A's and B's averaged (same "
                   "ranks, approximate); ties / dare_ties: sign-consensus merging of A's and B's with --density")
    m.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per adapter (default: 1 each)")
    m.add_argument("--density", type=float, default=None,
                   help="share of entries kept by ties / dare_ties (default 0.5)")
    m.add_argument("--out", required=True, help="the folder of the combined adapter")
    m.add_argument("--base", default=None, help="the base model (default: the adapters' base_model_name_or_path)")
    m.add_argument("--seed", type=int, default=0, help="seed of dare_ties' random drop")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    st = sub.add_parser("status", help="print a job's verdict (output_dir/verdict.json) and exit with the job's code")
    st.add_argument("output_dir", metavar="OUTPUT_DIR", help="the job's training.output_dir (or an eval --out); "
                    "a folder or a URL (s3://, gs://, hdfs://)")
    st.add_argument("--json", action="store_true", help="print verdict.json as it is")
    r = sub.add_parser("replay", help="build, update or show a replay buffer of old examples")
    rsub = r.add_subparsers(dest="action", required=True)
    rb = rsub.add_parser("build", help="make a buffer (version 1) from old data files")
    rb.add_argument("--out", required=True, help="the buffer: a folder or an fsspec URL (s3://..., gs://...)")
    ru = rsub.add_parser("update", help="add a sample of new data files as a new version (older ones stay)")
    ru.add_argument("buffer", help="the buffer: a folder or an fsspec URL")
    for q in (rb, ru):
        q.add_argument("files", nargs="+", metavar="FILE", help="JSONL / Parquet files or saved datasets folders")
        q.add_argument("--format", choices=["alpaca", "chat", "text", "tokenized"], default=None,
                       help="data format of the files (default: inferred from the first record)")
        q.add_argument("--budget", type=int, default=None, help="records in the buffer (default: all; update: "
                       "the previous budget plus the new files' share)")
        q.add_argument("--policy", choices=["uniform", "reservoir"], default="uniform",
                       help="uniform: count, then read the sample (two passes); reservoir: one pass")
        q.add_argument("--quota", action="append", default=[], metavar="NAME=N",
                       help="exactly N records of source NAME (a file's name); repeatable")
        q.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                       help="share of the budget by weight instead of by size; repeatable")
        q.add_argument("--seed", type=int, default=0, help="sampling seed")
    rb.add_argument("--shard-size", type=int, default=1024, help="records per Parquet shard")
    rs = rsub.add_parser("show", help="print a version's manifest summary and the list of versions")
    rs.add_argument("buffer", help="the buffer: a folder or an fsspec URL")
    rs.add_argument("--version", type=int, default=None, help="default: the newest")
    _registry_parser(sub)  # distrib_ft/registry.py
    _retrain_parser(sub)  # distrib_ft/retrain/pipeline.py
    return p


def _job(args):
    """The job file, validated and resolved on this driver for the launcher's world size."""
    import torch

    from distrib_ft.config import load_config
    from distrib_ft.job import resolve

    if not torch.cuda.is_available():  # DeepSpeed (imported by the checks) would warn that it guessed CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = load_config(args.job, args.overrides)
    world = cfg.distributed.num_workers if args.launcher == "ray" else int(os.environ.get("WORLD_SIZE", "1"))
    return resolve(cfg, world_size=world)


def _run(job, args, name: str, **kwargs) -> None:
    """Run job ``name`` of distrib_ft.jobs.JOBS: in this process (``--launcher local``) or on Ray workers."""
    from distrib_ft.jobs import JOBS

    if args.launcher == "local":
        if "WORLD_SIZE" not in os.environ and job.config.distributed.num_workers > 1:
            print(f"distrib-ft: --launcher local runs this process alone (distributed.num_workers: "
                  f"{job.config.distributed.num_workers} is for the Ray launcher; torchrun sets its own)",
                  file=sys.stderr)
        JOBS[name](job, **kwargs)
    else:
        from launcher.ray_job import run_on_ray

        if getattr(args, "verbose", False):
            os.environ["DISTRIB_FT_VERBOSE"] = "1"  # launcher/console.py: Ray's lines on the console too
        run_on_ray(job, JOBS[name], address=args.address, kwargs=kwargs)


def cmd_train(args) -> int:
    """``distrib-ft train``: run the job, then print its results table and decision (once under torchrun).

    Idempotent by output_dir: the same job (same resolved settings, see
    :func:`distrib_ft.runtime.verdict.job_sha256`) submitted again after it finished prints ``already finished:
    <verdict line>`` and exits with the recorded code without training; on checkpoints of an unfinished run of
    the same job (their ``job.json``) it resumes as ``--resume`` would, and says so. Every run that started ends
    with output_dir/verdict.json (also on a failure) and prints its location last.

    Args:
        args: the parsed ``train`` arguments (job, overrides, ``--resume``, ``--address``, ``--launcher``).

    Returns:
        The run's exit code from output_dir/summary.json; ``EXIT_OK`` when the run wrote none.

    Raises:
        UsageError: output_dir already holds a finished run (final/ or rejected/) of another job, or of this job
            with other settings, and ``--resume`` is not given; or checkpoints of another job.
    """
    from distrib_ft.runtime import checkpoint as ckpt
    from distrib_ft.runtime import verdict as vd

    began, started = time.time(), vd.now()
    job = _job(args)
    checked = time.time()
    cfg = job.config
    from distrib_ft.runtime import storage

    out = storage.as_path(cfg.training.output_dir)  # a local Path, or a storage.UrlPath (s3://, gs://, hdfs://)
    main_rank = os.environ.get("RANK", "0") == "0"  # once under torchrun
    if main_rank:
        try:  # an unreachable endpoint, a missing bucket or bad keys: one line, exit 2, before anything is read
            storage.check_writable(out)
        except ValueError as e:
            raise UsageError(f"{cfg.source}: {e}") from None
    try:
        prior = vd.read(out)
    except ValueError:
        prior = None  # not ours to trust; the checks below decide from final/ and the checkpoints
    same = prior is not None and prior.get("command") == "train" and prior.get("job_sha256") == vd.job_sha256(cfg)
    if same and not args.resume and prior["exit_code"] in vd.FINISHED_CODES \
            and storage.artifact_exists(prior.get("final") or prior.get("rejected") or out / "final"):
        if main_rank:
            print(f"already finished: {vd.line(prior)}")
            print(f"Verdict: {out / vd.VERDICT}")
        return prior["exit_code"]
    finished = storage.artifact_exists(out / "final") or storage.artifact_exists(out / "rejected")
    if not args.resume and finished:
        raise UsageError(f"{cfg.source}: training.output_dir: {out} already holds a finished run (final/)"
                         f"{' of this job with other settings' if prior and prior.get('job') == cfg.source else ''}; "
                         "use --resume, or another output_dir")
    resume, resumed_from = args.resume, None
    found = ckpt.complete_checkpoints(out)
    if not resume and found and (found[-1] / ckpt.OWNER).is_file():
        try:  # the same job's unfinished run: continue it
            ckpt.check_owner(found[-1], job.owner())
        except ValueError as e:
            raise UsageError(f"{cfg.source}: {str(e).replace('--resume: ', 'training.output_dir: ', 1)}") from None
        saved = json.loads((found[-1] / ckpt.OWNER).read_text()).get("schedule") or {}
        changed = {k: (v, job.owner()["schedule"][k]) for k, v in saved.items() if job.owner()["schedule"][k] != v}
        if changed:  # --resume may lengthen a run (its LR schedule follows); a plain re-submit does not
            shown = ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in changed.items())
            raise UsageError(f"{cfg.source}: training.output_dir: {out} holds an unfinished run of this job with "
                             f"another length ({shown}); use --resume to continue it with this length, or "
                             "another output_dir")
        resume = True
        if main_rank:
            print(f"distrib-ft: {out} holds an unfinished run of this job: resuming it from {found[-1].name} "
                  "(as --resume)", file=sys.stderr, flush=True)
    if resume and found:
        resumed_from = found[-1].name
    from distrib_ft.runtime.loop import check_output_dir

    try:  # before any worker starts: another run's checkpoints are refused here, not after the model loads
        check_output_dir(job, resume)
        from distrib_ft.runtime import reshard

        job = reshard.fit_resume(job, resume)  # checkpoints of another world size: the batch keys refitted
    except ValueError as e:
        raise UsageError(f"{cfg.source}: {e}") from None
    earlier = prior if same else None

    def verdict(code: int, **kw) -> Path | None:
        if not main_rank:
            return None
        try:
            return vd.write(out, vd.build(command="train", config=cfg, output_dir=out, exit_code=code,
                                          started=started, began=began, resumed_from=resumed_from,
                                          earlier=earlier, **kw))
        except OSError as e:  # the output_dir cannot be written: the exit code still says what happened
            print(f"distrib-ft: could not write {out / vd.VERDICT}: {e}", file=sys.stderr)
            return None

    try:
        _ensure_cpu_op(args)
        _run(job, args, "train", resume=resume)
    except KeyboardInterrupt:
        path = verdict(EXIT_INTERRUPTED, decision="interrupted", error="interrupted (Ctrl-C)")
        if path is not None:
            print(f"Verdict: {path}", flush=True)
        raise
    except Exception as e:
        code, message = _failure(e)
        if code == EXIT_FAILED:  # an input error found on a worker (exit 2) ran nothing worth a verdict
            path = verdict(EXIT_FAILED, decision="failed", error=message,
                           worker_attempts=getattr(e, "attempts", None))  # Ray's restarts (launcher/ray_job.py)
            if path is not None:
                print(f"Verdict: {path}", flush=True)
        raise
    summary_file = out / "summary.json"
    s = json.loads(summary_file.read_text()) if summary_file.exists() else None
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    code = s.get("exit_code", EXIT_OK) if s else EXIT_OK
    path = verdict(code, summary=s, report=report, decision=None if s else "no_summary")  # written elsewhere
    if main_rank:
        if s is not None:
            print(_summary_text(s, cfg, out))
            print(_time_text(time.time() - began, checked - began, s.get("seconds", {}), ray=args.launcher == "ray"))
        if path is not None:
            print(f"Verdict: {path}")
    return code


def _ensure_cpu_op(args) -> None:
    """Build DeepSpeed's CPU op on the driver, announced, when the workers run on this machine (no GPU).

    A stale lock of a killed build is removed first (distrib_ft.runtime.dist.ensure_cpu_ops); the workers then
    load the op without building. On a remote cluster (``--address``) each worker does this itself.
    """
    import torch

    if torch.cuda.is_available() or (args.launcher == "ray" and args.address not in (None, "local")):
        return
    from distrib_ft.runtime import dist

    dist.ensure_cpu_ops()


def _input_errors() -> tuple:
    from distrib_ft.config import ConfigError
    from distrib_ft.data.formats import DataError
    from distrib_ft.export import ExportError
    from distrib_ft.runtime.engine import DeepSpeedConfigError

    return UsageError, ConfigError, DataError, DeepSpeedConfigError, FileNotFoundError, ExportError


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: poll() reports POLLERR / POLLHUP on it."""
    import select

    try:
        events = select.poll()
        events.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events.poll(0))
    except (AttributeError, OSError, ValueError):  # no fileno (a captured stream), no poll()
        return False


def _closed_stdout() -> int:
    """Stop quietly when the reader of stdout closed it early (``distrib-ft registry list REG --json | head -3``).

    As the Python docs advise (https://docs.python.org/3/library/signal.html#note-on-sigpipe): point the stdout fd
    at /dev/null so the flush at exit does not fail again, print nothing, exit 141 (128 + SIGPIPE) as a program
    killed by SIGPIPE would.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def _failure(e: BaseException) -> tuple[int, str]:
    """(exit code, the line printed) of an exception a command raised.

    2 for an input error (also one a worker raised), else 1.
    """
    from launcher.ray_job import WorkerError

    cause = e.cause if isinstance(e, WorkerError) else e
    if isinstance(cause, _input_errors()):
        return EXIT_USAGE, f"distrib-ft: error: {cause}"
    return EXIT_FAILED, f"{type(cause).__name__}: {cause}"


def _time_text(total: float, checks: float, phases: dict, ray: bool) -> str:
    """``Time: 4 min 10 s: checks and model 3 s, start-up 20 s, data 2 s, ...``: where a run's time went."""
    start_up = max(total - checks - sum(phases.values()), 0.0)
    parts = {"job check and model": checks, f"start-up ({'Ray, workers, ' if ray else ''}imports)": start_up,
             **phases}
    return (f"Time: {int(total // 60)} min {total % 60:.0f} s: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items() if v >= 0.5))


def _summary_text(s: dict, cfg, out: Path) -> str:
    lines = []
    report = out / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        lines.append(f"{'Suite':24} {'metric':16} {'baseline':>10} {'final':>10} {'change':>9}  budget")
        for name, su in r["suites"].items():
            final = next((e for e in su["evaluations"] if e["step"] == r["chosen_step"]), su["evaluations"][-1])
            ok = "ok" if final["within_budget"] else "BREACHED"
            change = f"{100 * final['relative']:+.1f}%" if su["kind"] == "loss" and final["relative"] is not None \
                else f"{final['delta']:+.3f}"
            lines.append(f"{name:24} {su['metric']:16} {su['baseline']:10.4f} {final['value']:10.4f} {change:>9}  {ok}")
        if r["new_task"]:
            lines.append(f"{'new task (eval loss)':24} {'nll':16} {r['new_task']['baseline']:10.4f} "
                         f"{r['new_task']['baseline'] - r['new_task']['gain']:10.4f}")
        if r["decision"] == "rejected":
            lines.append("No update stayed within the budget.")
        lines.append(f"Decision: {r['decision']} (step {r['chosen_step']}); report: {out / 'report.md'}, "
                     f"plots: {out / 'plots'}/")
    kind = s.get("artifact", "model")
    where = "final/" if s["exit_code"] == EXIT_OK else "rejected/ (out of the forgetting budget)"
    lines.append(f"Done: {s['steps']} steps on {s['world_size']} worker(s). Results in {out} "
                 f"({where} {kind}, metrics.jsonl{', checkpoints/' if cfg.training.save_steps else ''})")
    return "\n".join(lines)


def cmd_fisher(args) -> int:
    """``distrib-ft fisher``: compute the Fisher of the job's model on ``ewc.fisher_data_files`` into ``--out``.

    Args:
        args: the parsed ``fisher`` arguments (job, overrides, ``--out``, ``--address``, ``--launcher``).

    Returns:
        ``EXIT_OK``.

    Raises:
        UsageError: the job lists no ``ewc.fisher_data_files``.
    """
    job = _job(args)
    if not job.config.ewc.fisher_data_files:
        raise UsageError(f"{job.config.source}: ewc.fisher_data_files: list the data to compute the Fisher on")
    out = str(Path(args.out).expanduser().resolve())
    _ensure_cpu_op(args)
    _run(job, args, "fisher", out=out)
    print(f"Fisher written to {out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    """``distrib-ft eval``: evaluate a model against the job's base model and budgets; print the decision.

    The model is ``--model``, else the job's final/ when it exists, else none (the base model only). Several
    ``--model``: peft adapters of the job's base, merged into it in order (LoRA: W + sum_i B_i A_i s_i) and
    evaluated as one model. The report goes to ``--out``, default OUTPUT_DIR/eval.

    Args:
        args: the parsed ``eval`` arguments (job, overrides, ``--model``, ``--out``, ``--address``, ``--launcher``).

    Returns:
        The report's exit code.

    Raises:
        UsageError: ``--model`` holds neither a peft adapter nor a Hugging Face model; one of several ``--model``
            is no adapter that merges into the base weights.
    """
    job = _job(args)
    from distrib_ft.runtime import storage

    url = storage.remote(job.config.training.output_dir)  # a URL output_dir: its final/ read from a local copy
    out_dir = storage.local(url) if url is not None else Path(job.config.training.output_dir)
    if url is not None and not args.model and storage.artifact_exists(url / "final"):
        storage.download_tree(url / "final", out_dir / "final")  # this machine's copy (workers on it read it)
    models = args.model or ([str(out_dir / "final")] if (out_dir / "final").exists() else [])
    models = [str(Path(m).expanduser().resolve()) for m in models]
    from distrib_ft.methods import METHODS

    for model in models:
        folder = Path(model)
        own = any(hasattr(m, "owns_final") and m.owns_final(folder) for m in METHODS.values())
        if not own and not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise UsageError(f"--model: {model} holds neither a peft adapter, a Hugging Face model nor a method's own "
                             "final/ (e.g. bottleneck_config.json)")
    if len(models) > 1:
        from distrib_ft.export import ExportError, describe

        for model in models:
            try:
                a = describe(model)
            except ExportError as e:
                raise UsageError(str(e)) from None
            if a.kind != "peft" or a.not_mergeable:
                raise UsageError(f"--model: {model} cannot be merged into the base weights "
                                 f"({a.not_mergeable or 'a whole model, not an adapter'}); several --model must all "
                                 "be adapters that merge (LoRA, DoRA)")
    model = models if len(models) > 1 else (models[0] if models else None)
    out = str(Path(args.out).expanduser().resolve()) if args.out else str(out_dir / "eval")
    from distrib_ft.runtime import verdict as vd

    began, started = time.time(), vd.now()
    _ensure_cpu_op(args)
    _run(job, args, "eval", model_path=model, out=out)
    report = json.loads((Path(out) / "report.json").read_text())
    print(f"Decision: {report['decision']}; report: {Path(out) / 'report.md'}")
    if os.environ.get("RANK", "0") == "0":  # the eval's own verdict, beside its report (not the training's)
        new_task = report.get("new_task") or {}
        summary = {"decision": report["decision"], "chosen_step": report.get("chosen_step"),
                   "final": model if isinstance(model, str) else None, "eval_loss_start": new_task.get("baseline"),
                   "eval_loss": (new_task["baseline"] - new_task["gain"]) if new_task.get("gain") is not None
                   else None}
        path = vd.write(out, vd.build(command="eval", config=job.config, output_dir=out,
                                      exit_code=report["exit_code"], started=started, began=began, summary=summary,
                                      report=report))
        print(f"Verdict: {path}")
        if url is not None and not args.out:  # the eval's report and verdict beside the job's, on the URL
            storage.publish(url, ["eval"])
    return report["exit_code"]


def cmd_export(args) -> int:
    """``distrib-ft export``: write a run's final/ (or an adapter / model folder) to ``--out``; print one line.

    Args:
        args: the parsed ``export`` arguments (path, ``--out``, ``--merge``, ``--dtype``, ``--base``, ``--overwrite``).

    Returns:
        ``EXIT_OK`` (also when an adapter cannot merge: it is exported as it is, and the line says so).

    Raises:
        ExportError: a missing folder, no adapter or model in it, its base model not found, ``--out`` taken.
    """
    from distrib_ft.export import export

    print(export(args.path, args.out, merge=args.merge, dtype=args.dtype, overwrite=args.overwrite, base=args.base))
    return EXIT_OK


def cmd_merge(args) -> int:
    """``distrib-ft merge``: combine LoRA adapters of one base into one peft adapter in ``--out``; print one line.

    Args:
        args: the parsed ``merge`` arguments (``--adapters``, ``--method``, ``--weights``, ``--density``, ``--out``,
            ``--base``, ``--seed``, ``--overwrite``).

    Returns:
        ``EXIT_OK``.

    Raises:
        ExportError: adapters of different bases, a non-LoRA adapter, ranks the method cannot combine, bad weights.
    """
    from distrib_ft.export import merge_adapters

    print(merge_adapters(args.adapters, args.out, method=args.method, weights=args.weights, density=args.density,
                         overwrite=args.overwrite, base=args.base, seed=args.seed))
    return EXIT_OK


def cmd_status(args) -> int:
    """``distrib-ft status OUTPUT_DIR``: print the job's verdict and exit with its code.

    So a wrapper that loses the job's own exit code (``ray job submit`` reports every failure as 1) can recover it.

    Args:
        args: the parsed ``status`` arguments (``output_dir``, ``--json``).

    Returns:
        The verdict's ``exit_code``.

    Raises:
        UsageError: no verdict.json in OUTPUT_DIR (the job has not ended, or never ran there), or not a verdict.
    """
    from distrib_ft.runtime import verdict as vd
    from distrib_ft.runtime.storage import as_path

    folder = as_path(args.output_dir)  # a folder, or a URL (s3://, gs://, hdfs://)
    try:
        v = vd.read(folder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if v is None:
        from distrib_ft.runtime.checkpoint import complete_checkpoints

        found = complete_checkpoints(folder)
        if found:  # a driver that died (node lost, SIGKILL) wrote no verdict; its checkpoints are there
            raise UsageError(f"{folder}: no {vd.VERDICT}, checkpoints up to {found[-1].name}: the job is running, or "
                             "its driver died; submit the same job again to resume it")
        raise UsageError(f"{folder}: no {vd.VERDICT} (the job has not ended, or never ran with this output_dir)")
    print((folder / vd.VERDICT).read_text().rstrip() if args.json else vd.text(v, folder / vd.VERDICT))
    return v["exit_code"]


def _pairs(items: list[str], flag: str, cast) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[name] = cast(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise UsageError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {flag} old.jsonl=100")
    return out


def _manifest_text(buffer: str, m: dict) -> str:
    from distrib_ft.data.replay_buffer import list_versions

    lines = [f"{buffer} version {m['version']}: {m['records']:,} records in {len(m['shards'])} shard(s) "
             f"(policy {m['policy']}, budget {m['budget'] if m['budget'] is not None else 'all'})"]
    for src in m["sources"]:
        lines.append(f"  {src['name']:32} {src['format']:9} {src['selected']:>9,} of {src['records']:,} records "
                     f"(sha256 {src['sha256'][:12]})")
    lines.append(f"versions: {', '.join(map(str, list_versions(buffer)))}")
    return "\n".join(lines)


def cmd_replay(args) -> int:
    """``distrib-ft replay build|update|show``: make, extend or describe a replay buffer; print its manifest.

    Local paths are made absolute; fsspec URLs (``scheme://...``) are used as they are.

    Args:
        args: the parsed ``replay`` arguments (``action`` and its options).

    Returns:
        ``EXIT_OK``.

    Raises:
        UsageError: a ``--quota`` / ``--weight`` that is not NAME=VALUE.
    """
    from distrib_ft.data import replay_buffer as rb

    def url(p: str) -> str:
        return p if "://" in p else str(Path(p).expanduser().resolve())

    if args.action == "show":
        print(_manifest_text(url(args.buffer), rb.read_manifest(url(args.buffer), args.version)))
        return EXIT_OK
    kwargs = dict(fmt=args.format, budget=args.budget, policy=args.policy, seed=args.seed,
                  quotas=_pairs(args.quota, "--quota", int), weights=_pairs(args.weight, "--weight", float))
    files = [url(f) for f in args.files]
    if args.action == "build":
        m = rb.build(url(args.out), files, shard_size=args.shard_size, **kwargs)
        print(_manifest_text(url(args.out), m))
    else:
        m = rb.update(url(args.buffer), files, **kwargs)
        print(_manifest_text(url(args.buffer), m))
    return EXIT_OK


def _registry_parser(sub) -> None:
    g = sub.add_parser("registry", help="list, show, promote or roll back the versions of a model registry")
    gsub = g.add_subparsers(dest="action", required=True)
    for action, text in (("list", "every version: round, parent, decision, whether current"),
                         ("show", "one version's record (default: the current one)"),
                         ("promote", "make a version current (a refused one needs --force)"),
                         ("rollback", "make the previous current version (or --to VERSION) current again")):
        q = gsub.add_parser(action, help=text)
        q.add_argument("registry", metavar="REGISTRY", help="the registry: a folder or a URL (s3://, gs://, hdfs://)")
        if action in ("show", "promote"):
            q.add_argument("version", nargs="?" if action == "show" else None, help="v0003, v3 or 3")
        if action == "promote":
            q.add_argument("--force", action="store_true", help="promote a version its gate refused")
        if action == "rollback":
            q.add_argument("--to", default=None, metavar="VERSION", help="an earlier current version")
        if action in ("promote", "rollback"):
            q.add_argument("--note", default=None, help="a note for the registry's log")
            q.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the registry's lock")
        q.add_argument("--json", action="store_true", help="print JSON")


def cmd_registry(args) -> int:
    """``distrib-ft registry list|show|promote|rollback REGISTRY``: read or move a model registry's pointer.

    Returns:
        ``EXIT_OK``.

    Raises:
        UsageError: an unknown version, an empty registry, a refused version without --force, the lock held.
    """
    from distrib_ft import registry as rg
    from distrib_ft.runtime.storage import StorageError

    try:
        reg = rg.Registry(args.registry, wait=getattr(args, "wait", 60.0))
        if args.action == "list":
            versions = reg.list()
            if not versions:  # also with --json: a mistyped REGISTRY must not read as "no versions yet"
                raise rg.RegistryError(f"{reg.root}: empty registry (no versions)")
            print(json.dumps([v.as_dict() for v in versions], indent=2) if args.json else rg.table(versions))
            return EXIT_OK
        if args.action == "show":
            v = reg.show(args.version) if args.version else reg.current()
            if v is None:
                raise rg.RegistryError(f"{reg.root}: nothing is current; name a version")
        elif args.action == "promote":
            v = reg.promote(args.version, force=args.force, note=args.note)
        else:
            v = reg.rollback(args.to, note=args.note)
        print(json.dumps(v.as_dict(), indent=2) if args.json else rg.text(v))
        return EXIT_OK
    except (rg.RegistryError, StorageError) as e:
        raise UsageError(str(e)) from None


def _retrain_parser(sub) -> None:
    r = sub.add_parser("retrain", help="run a retraining pipeline's pending rounds: train, gate, registry")
    r.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file (registry, base_model, job, "
                   "retention_budget, rounds)")
    r.add_argument("--round", default=None, metavar="NAME", help="run the pending rounds up to and including NAME")
    r.add_argument("--launcher", choices=["ray", "local"], default="ray", help="how each round's job runs (as train)")
    r.add_argument("--address", default=None, help="Ray cluster the rounds run on; default: an embedded local Ray")
    r.add_argument("--verbose", action="store_true", help="Ray's own lines on the console too (as train)")


def cmd_retrain(args) -> int:
    """``distrib-ft retrain PIPELINE.yaml``: the pending rounds, each a train job, a gate and a registry decision.

    Returns:
        0 every round promoted, 3 a round refused (the pipeline stops there), 1 a job failed, 130 interrupted.

    Raises:
        UsageError: a bad pipeline file, a changed data file of a round that ran, the registry's lock held.
    """
    from distrib_ft import registry as rg
    from distrib_ft.retrain.config import load_pipeline
    from distrib_ft.retrain.pipeline import run
    from distrib_ft.runtime.storage import StorageError

    try:
        return run(load_pipeline(args.pipeline), only_round=args.round, launcher=args.launcher,
                   address=args.address, verbose=args.verbose)
    except (rg.RegistryError, StorageError) as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """The ``distrib-ft`` entry point: parse the arguments, run the command, map errors to exit codes.

    ``section.key=value`` overrides may also come after the options.

    Args:
        argv: command-line arguments; default ``sys.argv[1:]``.

    Returns:
        The exit code (see the module docstring): the command's, 2 for an input error, 1 when the job failed,
        130 when interrupted, 141 when stdout was closed early.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also come after the options
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        code = {"train": cmd_train, "fisher": cmd_fisher, "eval": cmd_eval, "export": cmd_export, "merge": cmd_merge,
                "replay": cmd_replay, "status": cmd_status, "registry": cmd_registry,
                "retrain": cmd_retrain}[args.command](args)
        sys.stdout.flush()  # a reader that closed stdout early shows here, not in the flush at exit
        return code
    except _input_errors() as e:
        print(f"distrib-ft: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("distrib-ft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return _closed_stdout()
        code, message = _failure(e)
        logs = f" ({e.ray_logs})" if getattr(e, "ray_logs", None) else ""  # launcher/ray_job.py ray_session
        print(message if code == EXIT_USAGE else f"distrib-ft: the job failed: {message}{logs}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
