"""``distrib-ft retrain``: run a pipeline's pending rounds; each round a job, a gate, a registry decision.

For each round in order (issue 12; the registry is distrib_ft/registry.py):

1. Its data files are hashed. ``REGISTRY/rounds/<name>.json`` (the round's record, written last) says whether it
   ran: same hashes -> its decision is printed and nothing is trained (a refused round exits 3 again); other
   hashes -> exit 2 (a round's name stands for its data: new data goes into a new round).
2. Its job is built (distrib_ft/retrain/rounds.py) and run exactly as ``distrib-ft train`` runs it: a child
   ``python -m launcher.cli train ROUND.yaml`` (real Ray workers by default, ``--launcher local``, ``--address``),
   whose stdout goes to this process's stderr so that stdout carries one line per round. Its exit code and
   verdict.json are the job's own; a killed round submitted again resumes from its checkpoints (train's "unfinished
   run of this job" logic: the built job is byte-identical for the same registry state).
3. Exit 0 or 3: the gate (distrib_ft/retrain/gate.py) reads report.json; the model (final/ or rejected/) is added
   to the registry, then promoted (the pointer moves) or refused (it stays listed, never current); a refused round
   may be interpolated back toward its start first (``merge_back``, distrib_ft/retrain/merge_back.py). Exit 1, 2,
   130: the pipeline stops with that code, no version added.
4. After a promotion: the replay buffer gets a sample of the round's data (a new version), then the round's
   record; then the model current after the round is evaluated on every round's held-out set by one eval job
   (``distrib-ft eval``'s code: a row of GEM's R, cached in ``REGISTRY/rounds/<name>.eval.json``) and
   REGISTRY/pipeline_report.json / .md are rewritten (distrib_ft/retrain/forgetting.py).

The pipeline holds the registry's lock (distrib_ft/registry.py: a lease renewed by a thread, taken over when its
holder died) from its first round to its end: two pipelines on one registry never interleave their rounds.
A round killed after its version was added but before its record is recognised by its version (round name and
``source`` = the round's final/ or rejected/) and finished without training or adding again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distrib_ft.retrain.rounds import RoundJob, build_round, registry_hash, work_root
from distrib_ft.schema import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
ROUNDS = "rounds"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def say(text: str) -> None:
    """A line for the scheduler (stdout)."""
    print(text, flush=True)


def note(text: str) -> None:
    """A line for a person (stderr)."""
    print(f"distrib-ft retrain: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- records


def record_path(registry, name: str):
    """``REGISTRY/rounds/<name>.json``: the round's record."""
    return registry.root / ROUNDS / f"{name}.json"


def read_record(registry, name: str) -> dict | None:
    """The round's record, or None when the round has not run to its decision."""
    p = record_path(registry, name)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{p}: not a round record (invalid JSON); remove it to run the round again") from None


def write_record(registry, record: dict) -> None:
    """Write the round's record atomically (the last step of a round)."""
    from distrib_ft.runtime.storage import atomic_write_text

    atomic_write_text(record_path(registry, record["name"]), json.dumps(record, indent=2) + "\n")


def data_hashes(rnd) -> dict:
    """``{"train": {file: sha256}, "eval": {file: sha256}}`` of a round's data."""
    from distrib_ft.registry import file_sha256

    return {"train": {f: file_sha256(f) for f in rnd.train_files}, "eval": {f: file_sha256(f) for f in rnd.eval_files}}


def check_hashes(cfg, index: int, record: dict, hashes: dict) -> None:
    """ConfigError when a round's data changed since its record was written (names the file and its hashes)."""
    rnd = cfg.rounds[index]
    was = record.get("data") or {}
    for part in ("train", "eval"):
        old, new = was.get(part) or {}, hashes[part]
        for f in sorted(set(old) | set(new)):
            if old.get(f) != new.get(f):
                what = (f"sha256 {str(old.get(f))[:12]} then, {str(new.get(f))[:12]} now" if f in old and f in new
                        else "not in the round when it ran" if f not in old else "no longer in the round")
                raise ConfigError(f"{cfg.source}: rounds[{index}] ({rnd.name}): data file {f} changed since the round "
                                  f"ran ({what}); give the round a new name")


def round_line(rec: dict) -> str:
    """``round r1: promoted v0001 (exit 0 (accepted ...))`` / ``round r3: refused v0003: general over budget ...``."""
    if rec["decision"] == "refused":
        return f"round {rec['name']}: refused {rec['version']}: {rec.get('reason')}"
    extra = f", merged back at alpha {rec['merge_back']['alpha']}" if rec.get("merge_back") else ""
    return f"round {rec['name']}: promoted {rec['version']} ({rec.get('verdict')}{extra})"


# ------------------------------------------------------------------------------------------- child jobs


def _child(argv: list[str], launcher: str, address: str | None, verbose: bool) -> int:
    """Run ``distrib-ft ARGV`` as a child process; its stdout to our stderr. Returns its exit code.

    Ctrl-C reaches the child through the process group (it writes its verdict, exit 130): this process waits for it
    and returns 130 (a SIGINT sent to this process alone, ``kill -INT``, is passed on to a child still running
    after a few seconds); a SIGTERM to this process is passed on to it; the child gets SIGTERM if this process dies
    (Linux PR_SET_PDEATHSIG).
    """
    cmd = [sys.executable, "-m", "launcher.cli", *argv, "--launcher", launcher]
    if address and launcher == "ray":
        cmd += ["--address", address]
    if verbose:
        cmd.append("--verbose")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])

    def pdeathsig() -> None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    proc = subprocess.Popen(cmd, stdout=sys.stderr, env=env, preexec_fn=pdeathsig)  # noqa: PLW1509
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    with contextlib.suppress(ValueError):  # not the main thread: no forwarding
        signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                if code < 0:  # killed by a signal: SIGINT / SIGTERM read as interrupted (130), others as failed
                    code = EXIT_INTERRUPTED if -code in (signal.SIGINT, signal.SIGTERM) else EXIT_FAILED
                return code
            except KeyboardInterrupt:  # the child got the same SIGINT (Ctrl-C); let it write its verdict
                with contextlib.suppress(KeyboardInterrupt):
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:  # still running: pass it on (a SIGINT sent to us alone)
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGINT)
                        proc.wait()
                return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------ the loop


class Pipeline:
    """One run of a pipeline file over its registry (see the module docstring)."""

    def __init__(self, cfg, *, launcher: str = "ray", address: str | None = None, verbose: bool = False,
                 wait: float = 60.0):
        from distrib_ft.registry import Registry

        self.cfg, self.launcher, self.address, self.verbose = cfg, launcher, address, verbose
        self.registry = Registry(cfg.registry, wait=wait)
        self.records: list[dict] = []

    # ------------------------------------------------------------------ one round
    def run_round(self, index: int) -> int:
        cfg, reg = self.cfg, self.registry
        rnd = cfg.rounds[index]
        hashes = data_hashes(rnd)
        rec = read_record(reg, rnd.name)
        if rec is not None:
            check_hashes(cfg, index, rec, hashes)
            self.records.append(rec)
            say(round_line(rec))
            return EXIT_BUDGET if rec["decision"] == "refused" else EXIT_OK
        built = build_round(cfg, index, reg, write=False)
        found = self._added(rnd.name, built.output_dir)
        if found is not None and found.decision != "candidate":  # killed after the decision, before the record
            note(f"round {rnd.name}: {found.version} was already added and {found.decision}; finishing the round")
            return self._finish(index, built, found, hashes, gate_info=found.record.get("metrics", {}).get("gate"))
        if found is None:
            built = build_round(cfg, index, reg, write=True)
            for line in built.notes:
                note(line)
            note(f"round {rnd.name}: training from {built.parent or cfg.base_model} ({built.path})")
            began = time.time()
            code = _child(["train", str(built.path)], self.launcher, self.address, self.verbose)
            note(f"round {rnd.name}: the job ended with exit {code} after {time.time() - began:.0f} s")
            if code not in (EXIT_OK, EXIT_BUDGET):
                verdict = self._verdict(built)
                what = "interrupted" if code == EXIT_INTERRUPTED else "failed"
                say(f"round {rnd.name}: {what} (exit {code}){': ' + _vline(verdict) if verdict else ''}")
                return code
        return self._decide(index, built, hashes, found)

    def _added(self, name: str, output_dir: str):
        """A version of round ``name`` whose source is this round's final/ or rejected/ (a killed earlier run)."""
        sources = {f"{output_dir}/final", f"{output_dir}/rejected"}
        merged = str(self.merge_dir(name)) + "/"
        for v in reversed(self.registry.list()):
            if v.round == name and (str(v.record.get("source")) in sources
                                    or str(v.record.get("source")).startswith(merged)):
                return v
        return None

    def _verdict(self, built: RoundJob) -> dict | None:
        from distrib_ft.runtime import verdict as vd

        try:
            return vd.read(built.output_dir)
        except ValueError:
            return None

    def _decide(self, index: int, built: RoundJob, hashes: dict, found) -> int:
        """The gate, then add + promote or refuse (``found``: the version a killed run already added)."""
        from distrib_ft.retrain.gate import gate
        from distrib_ft.runtime.storage import as_path

        cfg, reg, rnd = self.cfg, self.registry, self.cfg.rounds[index]
        out = as_path(built.output_dir)
        report_file = out / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        verdict = self._verdict(built) or {}
        result = gate(report, cfg.retention_budget)
        info = {"passed": result.passed, "reason": result.reason, "step": result.step, "suites": result.suites,
                "new_task": result.new_task}
        artifact = verdict.get("final") or verdict.get("rejected")
        if not artifact:
            artifact = str(out / ("final" if (out / "final").exists() else "rejected"))
        chosen = None
        if found is None and not result.passed and cfg.merge_back and result.improved:
            chosen = self._merge_back(index, built, result, report, self._local_artifact(artifact))
            if chosen is not None and chosen["alpha"] is not None:
                return self._add_merged(index, built, hashes, info, chosen, verdict)
        if found is None:
            data = [*rnd.train_files, *rnd.eval_files]
            metrics = {"gate": info, "pipeline": cfg.source, "verdict": _vline(verdict)}
            if chosen is not None:
                metrics["merge_back"] = {"alpha": None, "table": chosen["table"]}
            found = reg.add(artifact, round=rnd.name, parent=built.parent, data_files=data, metrics=metrics)
        if result.passed:
            reg.promote(found.version, note=f"retrain {rnd.name}: gate passed")
        else:
            reason = result.reason
            if chosen is not None:
                reason += (f"; merge_back: {chosen['error']}" if chosen.get("error") else
                           f"; merge_back: no alpha of {', '.join(f'{a:g}' for a in cfg.merge_back_alphas)} passed")
            reg.refuse(found.version, reason=reason, details={"gate": info})
        return self._finish(index, built, reg.show(found.version), hashes, gate_info=info, verdict=verdict)

    def _finish(self, index: int, built: RoundJob, version, hashes: dict, *, gate_info=None,
                verdict: dict | None = None) -> int:
        """After the registry decision: the replay update (promoted), the round's record, the line."""
        cfg, rnd = self.cfg, self.cfg.rounds[index]
        verdict = verdict if verdict is not None else (self._verdict(built) or {})
        rec = {"name": rnd.name, "data": hashes, "overrides": copy.deepcopy(rnd.overrides),  # checks.check_history
               "version": version.version, "decision": version.decision,
               "exit_code": verdict.get("exit_code"), "verdict": _vline(verdict), "output_dir": built.output_dir,
               "job": str(built.path) if built.path else None, "parent": version.parent,
               "reason": (version.record.get("refused") or {}).get("reason") if version.decision == "refused" else
               None, "gate": gate_info, "pipeline": cfg.source, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())}
        mb = (version.record.get("metrics") or {}).get("merge_back")
        if mb and mb.get("alpha") is not None:
            rec["merge_back"] = {"alpha": mb["alpha"]}
        if version.decision == "promoted" and built.replay_buffer:
            rec["replay_version"] = self._replay_update(built, hashes)
        write_record(self.registry, rec)
        self.records.append(rec)
        say(round_line(rec))
        return EXIT_BUDGET if version.decision == "refused" else EXIT_OK

    def _replay_update(self, built: RoundJob, hashes: dict) -> int:
        """Add a sample of the round's train files to the buffer (a new version), once: returns the version."""
        import math
        from pathlib import PurePosixPath

        from distrib_ft.data import replay_buffer as rb
        from distrib_ft.preservation.replay import _even_quotas

        buffer, files = built.replay_buffer, list(self.cfg.rounds[built.index].train_files)
        prev = rb.read_manifest(buffer) if rb.list_versions(buffer) else None
        if prev is not None:  # already added by a killed run of this round (the sources carry each file's sha256)
            have = {s.get("sha256") for s in prev["sources"] if s.get("added_in") == prev["version"]}
            if set(hashes["train"].values()) <= have:
                return prev["version"]
        n = sum(1 for f in files for _ in rb.iter_records(f))
        budget = built.replay_budget or max(1, math.ceil(0.1 * n))
        quotas = _even_quotas([PurePosixPath(f).name for f in files], budget, prev)
        m = rb.update(buffer, files, quotas=quotas, budget=sum(quotas.values()), create=prev is None)
        added = sum(s["selected"] for s in m["sources"] if s.get("added_in") == m["version"])
        note(f"round {built.name}: replay: added {added:,} records of its data to {buffer} -> version {m['version']}")
        return m["version"]

    # ------------------------------------------------------------------ merge back (merge_back.py)
    def merge_dir(self, name: str) -> Path:
        """Where a round's interpolated candidates are written: ``<work dir>/merge_back/<round>/``."""
        return work_root(self.registry) / "merge_back" / name

    def _start_model(self, built: RoundJob) -> str:
        """The folder of the model a round started from (its ``model.name_or_path``, ``offline:`` resolved)."""
        from distrib_ft.job import _model_folder

        return _model_folder(built.job["model"]["name_or_path"], self.cfg.job)

    def _merge_back(self, index: int, built: RoundJob, result, report: dict, artifact: str):
        """Interpolated candidates theta0 + alpha (theta - theta0), largest alpha first; the first that passes.

        Each is measured by an eval job (the round's suites and new task) against the round's own step-0
        baselines. Returns merge_back.choose's result with ``path`` (the chosen alpha's folder).
        """
        from distrib_ft.retrain import merge_back
        from distrib_ft.retrain.gate import gate

        rnd, cfg = self.cfg.rounds[index], self.cfg
        start = self._start_model(built)
        folder = self.merge_dir(rnd.name)

        def measure(alpha: float) -> dict:
            out = folder / f"alpha_{alpha:g}"
            merge_back.interpolate(start if built.kind == "full" else None, artifact, alpha, out, kind=built.kind,
                                   earlier=self._lineage_models(built) if built.kind == "adapter" else None,
                                   overwrite=True)
            models = [*self._lineage_models(built), str(out)] if built.kind == "adapter" else [str(out)]
            note(f"round {rnd.name}: merge_back: evaluating alpha {alpha:g}")
            evaluated = self._eval(built, models, folder / f"eval_{alpha:g}", f"{rnd.name}.merge_{alpha:g}",
                                   base=start if built.kind == "full" else cfg.base_model)
            g = gate(_rebased(report, evaluated), cfg.retention_budget)
            return {"within_budget": not g.breached,
                    "new_task_better": g.improved, "reason": g.reason, "path": str(out),
                    "suites": {n: s["value"] for n, s in g.suites.items()},
                    "new_task": (g.new_task or {}).get("value")}

        try:
            chosen = merge_back.choose(cfg.merge_back_alphas, measure)
        except ValueError as e:  # an adapter interpolation cannot express (modules_to_save, ...): refused
            note(f"round {rnd.name}: merge_back: {e}")
            return {"alpha": None, "table": [], "error": str(e).splitlines()[0]}
        if chosen["alpha"] is not None:
            chosen["path"] = str(folder / f"alpha_{chosen['alpha']:g}")
        return chosen

    def _local_artifact(self, artifact: str) -> str:
        """A round's final/ (or rejected/) as a local folder: itself, or a copy of a URL one in the work dir."""
        from distrib_ft.retrain.rounds import refresh_copy, tree_identity
        from distrib_ft.runtime.storage import UrlPath, as_path

        p = as_path(artifact)
        if not isinstance(p, UrlPath):
            return str(p)
        local = work_root(self.registry) / "artifacts" / registry_hash(str(p))
        return str(refresh_copy(p, local, tree_identity(p), "its files"))

    def _lineage_models(self, built: RoundJob) -> list[str]:
        return list(built.job.get("method", {}).get("merge_adapters") or [])

    def _eval(self, built: RoundJob, models: list[str], out: Path, name: str, *, base: str,
              suites: list[dict] | None = None, eval_files: list[str] | None = None) -> dict:
        """One ``distrib-ft eval`` child of ``models`` on the round's suites (or ``suites``); its report.json."""
        from distrib_ft.retrain.rounds import write_job

        src = built.job
        job = {k: copy.deepcopy(src[k]) for k in ("model", "method", "data", "training", "distributed") if k in src}
        job["model"]["name_or_path"] = base
        job["method"] = {k: v for k, v in job["method"].items() if k != "merge_adapters"}
        if eval_files is not None:
            job["data"]["eval_files"] = eval_files
        job["monitor"] = {"suites": suites if suites is not None else copy.deepcopy(src["monitor"].get("suites", []))}
        job["training"]["output_dir"] = str(out / "job")
        path = write_job(self.registry, name, job)
        argv = ["eval", str(path), "--out", str(out)]
        for m in models:
            argv += ["--model", m]
        code = _child(argv, self.launcher, self.address, self.verbose)
        if code not in (EXIT_OK, EXIT_BUDGET):
            raise ChildFailed(code, f"the eval job {path} ended with exit {code}")
        return json.loads((out / "report.json").read_text())

    def _add_merged(self, index: int, built: RoundJob, hashes: dict, info: dict, chosen: dict, verdict: dict) -> int:
        cfg, reg, rnd = self.cfg, self.registry, self.cfg.rounds[index]
        alpha = chosen["alpha"]
        metrics = {"gate": info, "pipeline": cfg.source, "verdict": _vline(verdict),
                   "merge_back": {"alpha": alpha, "table": chosen["table"]}}
        v = reg.add(chosen["path"], round=rnd.name, parent=built.parent, data_files=[*rnd.train_files,
                    *rnd.eval_files], job_config=built.job, verdict=verdict, metrics=metrics)
        reg.promote(v.version, note=f"retrain {rnd.name}: merged back at alpha {alpha:g} (the candidate: "
                    f"{info['reason']})")
        return self._finish(index, built, reg.show(v.version), hashes, gate_info=info, verdict=verdict)

    # ------------------------------------------------------------------ forgetting (forgetting.py)
    def eval_row(self, index: int, version) -> tuple[dict, dict] | None:
        """(base scores, scores) of ``version`` (current after round ``index``) on every round's held-out set."""
        from distrib_ft.registry import file_sha256
        from distrib_ft.retrain.forgetting import row_from_eval_report
        from distrib_ft.retrain.rounds import lineage, local_model, read_template, write_job
        from distrib_ft.runtime.storage import as_path, atomic_write_text

        cfg, reg = self.cfg, self.registry
        rnd = cfg.rounds[index]
        tasks = {r.name: list(r.eval_files) for r in cfg.rounds}
        stamp = {t: [file_sha256(f) for f in files] for t, files in tasks.items()}
        cache = as_path(reg.root) / ROUNDS / f"{rnd.name}.eval.json"
        if cache.is_file():
            c = json.loads(cache.read_text())
            if c.get("version") == version.version and c.get("base_model") == cfg.base_model and \
                    c.get("files") == stamp:
                return c["base"], c["scores"]
        raw = read_template(cfg.job)
        kind = (version.record.get("artifact") or {}).get("kind")
        models = [str(local_model(reg, v)) for v in lineage(reg, version)] if kind == "adapter" and \
            raw.get("method", {}).get("type", "lora") == "lora" else [str(local_model(reg, version))]
        from distrib_ft.config import JobConfig
        from distrib_ft.job import _resolve_paths

        job = {k: raw[k] for k in ("model", "method", "data", "training", "distributed") if k in raw}
        job["model"] = {**(job.get("model") or {}), "name_or_path": cfg.base_model}
        job["method"] = {k: v for k, v in (job.get("method") or {}).items() if k != "merge_adapters"}
        job["data"] = {**(job.get("data") or {}), "train_files": list(rnd.train_files), "eval_files": []}
        fmt = job["data"].get("format", "alpaca")
        formats = {r.name: r.overrides.get("data.format", fmt) for r in cfg.rounds}
        job["monitor"] = {"suites": [{"name": t, "files": f, "format": formats[t], "metric": "nll"}
                                     for t, f in tasks.items()]}
        out = work_root(reg) / "eval" / rnd.name
        job["training"] = {**(job.get("training") or {}), "output_dir": str(out / "job")}
        _resolve_paths(JobConfig, job, "", cfg.job)
        path = write_job(reg, f"{rnd.name}.eval", job)
        argv = ["eval", str(path), "--out", str(out)]
        for m in models:
            argv += ["--model", m]
        note(f"round {rnd.name}: evaluating {version.version} on every round's held-out set (a row of R)")
        code = _child(argv, self.launcher, self.address, self.verbose)
        if code not in (EXIT_OK, EXIT_BUDGET):
            raise ChildFailed(code, f"the eval job of round {rnd.name}'s row of R ended with exit {code}")
        base, scores = row_from_eval_report(json.loads((out / "report.json").read_text()), list(tasks))
        atomic_write_text(cache, json.dumps({"version": version.version, "base_model": cfg.base_model,
                                             "files": stamp, "base": base, "scores": scores}, indent=2) + "\n")
        return base, scores

    def report(self, code: int, rows: list[dict], base: dict) -> str:
        """Write REGISTRY/pipeline_report.json / .md; returns where the .md is."""
        from distrib_ft.retrain.forgetting import write_report
        from distrib_ft.runtime.storage import as_path

        cur = self.registry.current()
        extra = {"exit_code": code, "current": cur.version if cur else None, "pipeline": self.cfg.source,
                 "rounds": [{"name": r["name"], "version": r["version"], "decision": r["decision"],
                             "verdict": r.get("verdict")} for r in self.records]}
        root = as_path(self.registry.root)
        write_report(self.registry, {"metric": "nll", "tasks": [r.name for r in self.cfg.rounds], "base": base,
                                     "rows": rows, **extra})
        return str(root / "pipeline_report.md")

    # ------------------------------------------------------------------ all rounds
    def run(self, only_round: str | None = None) -> int:
        cfg = self.cfg
        last = cfg.round_index(only_round) if only_round else len(cfg.rounds) - 1
        code = EXIT_OK
        rows: list[dict] = []
        base: dict = {}
        with self.registry.lock(f"retrain {cfg.source}"):
            from distrib_ft.retrain.checks import check_history

            check_history(cfg)  # renamed / inserted / removed decided rounds: exit 2 before anything trains
            refused = None  # what stopped the pipeline: "r3 refused", "r2 failed (exit 1)"
            for i in range(last + 1):
                try:
                    code = self.run_round(i)
                except ChildFailed as e:
                    note(str(e))
                    code = e.code
                except KeyboardInterrupt:  # Ctrl-C outside a child job (the gate, the registry)
                    say(f"round {cfg.rounds[i].name}: interrupted (exit {EXIT_INTERRUPTED})")
                    code = EXIT_INTERRUPTED
                if code != EXIT_OK:
                    refused = cfg.rounds[i].name + (" refused" if code == EXIT_BUDGET else " interrupted" if code ==
                                                    EXIT_INTERRUPTED else f" failed (exit {code})")
                    break
                v = self.registry.show(self.records[-1]["version"])
                try:
                    b, scores = self.eval_row(i, v)
                except (ChildFailed, KeyboardInterrupt) as e:
                    code = getattr(e, "code", EXIT_INTERRUPTED)
                    note(str(e) or f"round {cfg.rounds[i].name}'s row of R: interrupted")
                    refused = f"{cfg.rounds[i].name}'s row of R " + ("interrupted" if code == EXIT_INTERRUPTED else
                                                                     f"failed (exit {code})")
                    break
                base = base or b
                rows.append({"round": cfg.rounds[i].name, "version": v.version, "scores": scores})
            where = self.report(code, rows, base)
            promoted = sum(1 for r in self.records if r["decision"] == "promoted")
            cur = self.registry.current()
            say(f"Pipeline: {promoted} promoted, {refused or 'none refused'}; current "
                f"{cur.version if cur else 'none'}; report {where}")
        return code


class ChildFailed(Exception):
    """A child job (an eval of R) ended with a failure exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _rebased(report: dict, evaluated: dict) -> dict:
    """The round's report (its step-0 baselines and budgets) with an eval job's values.

    Each suite's and the new task's value is replaced by the last evaluation of ``evaluated`` (report.json of
    ``distrib-ft eval`` of an interpolated model).
    """
    out = copy.deepcopy(report)
    out["chosen_step"] = None
    for name, su in (out.get("suites") or {}).items():
        ev = ((evaluated.get("suites") or {}).get(name) or {}).get("evaluations") or []
        su["evaluations"] = [{"step": 1, "value": ev[-1]["value"], "within_budget": None}] if ev else []
    if out.get("new_task"):
        ev = ((evaluated.get("new_task") or {}).get("evaluations")) or []
        out["new_task"]["evaluations"] = [{"step": 1, "value": ev[-1]["value"]}] if ev else []
    return out


def _vline(verdict: dict | None) -> str | None:
    from distrib_ft.runtime import verdict as vd

    return vd.line(verdict) if verdict else None


def run(cfg, *, only_round: str | None = None, launcher: str = "ray", address: str | None = None,
        verbose: bool = False) -> int:
    """Run the pending rounds of pipeline ``cfg`` (up to and including ``only_round``); the pipeline's exit code.

    0 every round promoted; 3 a round refused (the pipeline stops there); 1 a job failed; 2 bad input (raised as
    ConfigError / RegistryError by the caller's error handling); 130 interrupted.
    """
    return Pipeline(cfg, launcher=launcher, address=address, verbose=verbose).run(only_round)
