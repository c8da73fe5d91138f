"""``distrib-ft``: the command line.

    distrib-ft train JOB.yaml [section.key=value ...] [--resume] [--address ADDR] [--launcher ray|local]
    distrib-ft fisher JOB.yaml [section.key=value ...] --out FILE.safetensors [--address ADDR] [--launcher ...]
    distrib-ft eval JOB.yaml [section.key=value ...] [--model PATH] [--out DIR] [--address ADDR] [--launcher ...]
    distrib-ft replay build --out DIR [--format FMT] [--budget N] [--policy uniform|reservoir] [--quota NAME=N]
                            [--weight NAME=W] [--shard-size N] [--seed N] FILE...
    distrib-ft replay update DIR [--budget N] [--policy ...] [--quota NAME=N] [--weight NAME=W] FILE...
    distrib-ft replay show DIR [--version N]

Exit codes (stable; schedulers may rely on them):
    0  the job finished and final/ is within the forgetting budget
    1  the job failed while running (a worker raised; see the message and the log)
    2  usage or input error: bad arguments, job file, DeepSpeed JSON, data or model path (nothing ran)
    3  forgetting budget breached and no checkpoint qualifies: the model is in rejected/, not final/
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BUDGET = 3  # = distrib_ft.monitor.budget.EXIT_BUDGET


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
    f = sub.add_parser("fisher", help="compute the diagonal Fisher of the job's model on ewc.fisher_files")
    f.add_argument("job", help="job YAML file")
    f.add_argument("overrides", nargs="*", metavar="section.key=value", help="override keys of the job file")
    f.add_argument("--out", required=True, help="the safetensors file to write")
    f.add_argument("--address", default=None, help="Ray cluster to run on; default: an embedded local Ray")
    f.add_argument("--launcher", choices=["ray", "local"], default="ray", help="local: in this process")
    e = sub.add_parser("eval", help="evaluate a model or adapter on the job's retention suites against its base")
    e.add_argument("job", help="job YAML file")
    e.add_argument("overrides", nargs="*", metavar="section.key=value", help="override keys of the job file")
    e.add_argument("--model", default=None, help="a final/ folder (peft adapter or full model); default: the "
                   "job's final/ if it exists, else only the base model")
    e.add_argument("--out", default=None, help="where the report goes (default: OUTPUT_DIR/eval)")
    e.add_argument("--address", default=None, help="Ray cluster to run on; default: an embedded local Ray")
    e.add_argument("--launcher", choices=["ray", "local"], default="ray", help="local: in this process")
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
    return p


def _check_inputs(cfg) -> None:
    """Fail on the driver, before any worker starts, for what can be checked here."""
    from distrib_ft.config import resolve_path
    from distrib_ft.runtime.engine import load_deepspeed_config

    t = cfg.training
    load_deepspeed_config(cfg.distributed.deepspeed, micro_batch_size=t.per_device_train_batch_size,
                          gradient_accumulation_steps=t.gradient_accumulation_steps,
                          world_size=cfg.distributed.num_workers, max_grad_norm=t.max_grad_norm, bf16=t.bf16,
                          learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                          betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    for section, key in (("data", "train_files"), ("data", "eval_files"), ("ewc", "fisher_files"),
                         ("method", "merge_adapters")):
        files = getattr(getattr(cfg, section), key)
        for i, f in enumerate(files):
            path = resolve_path(f, cfg.source)
            if not path.exists():
                raise UsageError(f"{cfg.source}: {section}.{key}[{i}]: {f} not found")
            files[i] = str(path)
    for i, su in enumerate(cfg.monitor.suites):
        for j, f in enumerate(su.files):
            path = resolve_path(f, cfg.source)
            if not path.exists():
                raise UsageError(f"{cfg.source}: monitor.suites[{i}].files[{j}]: {f} not found")
            su.files[j] = str(path)
    r = cfg.replay
    if r.generate:
        for key in ("prompts_files", "seed_files"):
            files = getattr(r.generate, key)
            for i, f in enumerate(files):
                path = resolve_path(f, cfg.source)
                if not path.exists():
                    raise UsageError(f"{cfg.source}: replay.generate.{key}[{i}]: {f} not found")
                files[i] = str(path)
    if r.buffer and "://" not in r.buffer:
        found = resolve_path(r.buffer, cfg.source)
        r.buffer = str(found if found.exists() else Path(r.buffer).expanduser().resolve())
    if r.ratio > 0 and not r.generate:
        from distrib_ft.data.replay_buffer import read_manifest

        read_manifest(r.buffer, r.version)  # DataError (exit 2) when there is no such buffer or version
    if cfg.ewc.fisher_file:
        path = resolve_path(cfg.ewc.fisher_file, cfg.source)
        if not path.is_file():
            raise UsageError(f"{cfg.source}: ewc.fisher_file: {cfg.ewc.fisher_file} not found")
        cfg.ewc.fisher_file = str(path)
    name = cfg.model.name_or_path
    if name.startswith("offline:"):
        from distrib_ft.model import resolve_offline_model

        try:
            cfg.model.name_or_path = str(resolve_offline_model(name))
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise UsageError(f"{cfg.source}: {e}") from None
    elif name.startswith((".", "/", "~")) or Path(name).exists():
        path = resolve_path(str(Path(name).expanduser()), cfg.source)
        if not (path / "config.json").is_file():
            raise UsageError(f"{cfg.source}: model.name_or_path: {name} is not a Hugging Face model folder "
                             "(no config.json)")
        cfg.model.name_or_path = str(path)
    out = Path(t.output_dir).expanduser()
    if not out.is_absolute() and cfg.source:
        out = Path.cwd() / out
    t.output_dir = str(out.resolve())


def cmd_train(args) -> int:
    from distrib_ft.config import load_config

    cfg = load_config(args.job, args.overrides)
    _check_inputs(cfg)
    out = Path(cfg.training.output_dir)
    if not args.resume and ((out / "final").exists() or (out / "rejected").exists()):
        raise UsageError(f"{cfg.source}: training.output_dir: {out} already holds a finished run (final/); "
                         "use --resume, or another output_dir")
    if args.launcher == "local":
        from distrib_ft.runtime.loop import train

        train(cfg, resume=args.resume)
    else:
        from launcher.ray_job import run_on_ray

        run_on_ray(cfg, address=args.address, kwargs={"resume": args.resume})
    summary_file = out / "summary.json"
    if not summary_file.exists():
        return EXIT_OK
    s = json.loads(summary_file.read_text())
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(_summary_text(s, cfg, out))
    return s.get("exit_code", EXIT_OK)


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
        lines.append(f"Decision: {r['decision']} (step {r['chosen_step']}); report: {out / 'report.md'}, plots: {out / 'plots'}/")
    kind = "adapter" if cfg.method.type == "lora" else "model"
    where = "final/" if s["exit_code"] == EXIT_OK else "rejected/ (out of the forgetting budget)"
    lines.append(f"Done: {s['steps']} steps on {s['world_size']} worker(s). Results in {out} "
                 f"({where} {kind}, metrics.jsonl{', checkpoints/' if cfg.training.save_steps else ''})")
    return "\n".join(lines)


def cmd_fisher(args) -> int:
    from distrib_ft.config import load_config

    cfg = load_config(args.job, args.overrides)
    if not cfg.ewc.fisher_files:
        raise UsageError(f"{cfg.source}: ewc.fisher_files: list the data to compute the Fisher on")
    _check_inputs(cfg)
    out = str(Path(args.out).expanduser().resolve())
    if args.launcher == "local":
        from distrib_ft.runtime.loop import fisher_job

        fisher_job(cfg, out)
    else:
        from launcher.ray_job import run_on_ray

        run_on_ray(cfg, address=args.address, entry="distrib_ft.runtime.loop:fisher_job", kwargs={"out": out})
    print(f"Fisher written to {out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from distrib_ft.config import load_config

    cfg = load_config(args.job, args.overrides)
    _check_inputs(cfg)
    out_dir = Path(cfg.training.output_dir)
    model = args.model or (str(out_dir / "final") if (out_dir / "final").exists() else None)
    if model is not None:
        model = str(Path(model).expanduser().resolve())
        if not (Path(model) / "config.json").exists() and not (Path(model) / "adapter_config.json").exists():
            raise UsageError(f"--model: {model} holds neither a peft adapter nor a Hugging Face model")
    out = str(Path(args.out).expanduser().resolve()) if args.out else str(out_dir / "eval")
    if args.launcher == "local":
        from distrib_ft.monitor.evaluation import eval_job

        eval_job(cfg, model, out)
    else:
        from launcher.ray_job import run_on_ray

        run_on_ray(cfg, address=args.address, entry="distrib_ft.monitor.evaluation:eval_job",
                   kwargs={"model_path": model, "out": out})
    report = json.loads((Path(out) / "report.json").read_text())
    print(f"Decision: {report['decision']}; report: {Path(out) / 'report.md'}")
    return report["exit_code"]


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


def main(argv: list[str] | None = None) -> int:
    from distrib_ft.config import ConfigError
    from distrib_ft.data.formats import DataError
    from distrib_ft.runtime.engine import DeepSpeedConfigError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also come after the options
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    input_errors = (UsageError, ConfigError, DataError, DeepSpeedConfigError, FileNotFoundError)
    try:
        return {"train": cmd_train, "fisher": cmd_fisher, "eval": cmd_eval, "replay": cmd_replay}[args.command](args)
    except input_errors as e:
        print(f"distrib-ft: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("distrib-ft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from launcher.ray_job import WorkerError

        cause = e.cause if isinstance(e, WorkerError) else e
        if isinstance(cause, input_errors):
            print(f"distrib-ft: error: {cause}", file=sys.stderr)
            return EXIT_USAGE
        print(f"distrib-ft: the job failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
