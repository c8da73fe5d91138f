"""Where a training step's time goes: distrib-ft's loop vs HF Trainer + peft, under cProfile.

Companion to ``bench/throughput.py`` (same model, data and settings, built the same way). Each side
runs in a fresh subprocess with ``OMP_NUM_THREADS`` set; cProfile is switched on at the end of step
``--warmup`` and off at the end of the last step, so start-up and the final export are left out.
Prints, per side, the per-step time of the main parts (forward + loss, backward, clipping / grad
norm, optimizer step, data), what is left (loop and framework overhead), and the top functions by
own time; writes the raw ``.prof`` files next to ``--out`` when given.

cProfile slows Python-heavy code more than the C++ kernels, so its "overhead" figures are upper
bounds; use ``bench/throughput.py`` for throughput.

Usage::

    python bench/profile_step.py                 # ZeRO-0, ZeRO-2 and HF, 1 thread, 30 steps
    python bench/profile_step.py --sides ours-zero2 hf --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import throughput as tp  # noqa: E402

# (label, substrings of "file:line(function)" whose cumulative time counts; first match wins per entry)
PARTS = {
    "ours": [
        ("data: batch fetch + collate", ["data/batches.py", "map_style_steps"], ["data/formats.py", "(collate)"]),
        ("forward + loss (token_nll_rows)", ["runtime/loss.py", "(token_nll_rows)"]),
        ("  of which peft/Llama forward", ["peft/peft_model.py", "(forward)"]),
        ("  of which cross_entropy", ["torch/nn/functional.py", "(cross_entropy)"]),
        ("backward (engine.backward)", ["deepspeed/runtime/engine.py", "(backward)"]),
        ("  of which autograd", ["<method 'run_backward'"]),
        ("  of which DeepSpeed backward epilogue (grad all-reduce / ZeRO buckets)",
         ["deepspeed/runtime/engine.py", "(_backward_epilogue)"]),
        ("own grad norm (loop._grad_norm, ZeRO-0 fp32 only)", ["runtime/loop.py", "(_grad_norm)"]),
        ("engine.step (clip + AdamW + LR + zero_grad)", ["deepspeed/runtime/engine.py", "(step)"]),
        ("  of which clip (clip_fp32_gradients, ZeRO-0)", ["deepspeed/runtime/engine.py", "(clip_fp32_gradients)"]),
        ("  of which ZeRO-2 optimizer step (norm, clip, AdamW, copies)", ["zero/stage_1_and_2.py", "(step)"]),
        ("  of which AdamW.step", ["torch/optim/adamw.py", "(step)"], ["torch/optim/adam.py", "(step)"]),
        ("  of which zero_grad", ["deepspeed/runtime/engine.py", "(zero_grad)"]),
        ("all_reduce_sum (token counts, world of one: no-op)", ["distrib_ft/runtime/dist.py", "(all_reduce_sum)"]),
        ("get_global_grad_norm / get_lr", ["deepspeed/runtime/engine.py", "(get_global_grad_norm)"],
         ["deepspeed/runtime/engine.py", "(get_lr)"]),
    ],
    "hf": [
        ("data: dataloader next + collate", ["accelerate/data_loader.py", "(__iter__)"]),
        ("training_step (forward + loss + backward)", ["transformers/trainer.py", "(training_step)"]),
        ("  of which compute_loss (forward + loss)", ["transformers/trainer.py", "(compute_loss)"]),
        ("  of which peft/Llama forward", ["peft/peft_model.py", "(forward)"]),
        ("  of which cross_entropy", ["torch/nn/functional.py", "(cross_entropy)"]),
        ("  of which backward (accelerator.backward)", ["accelerate/accelerator.py", "(backward)"]),
        ("  of which autograd", ["<method 'run_backward'"]),
        ("clip grad norm", ["transformers/trainer.py", "(_clip_grad_norm)"]),
        ("optimizer.step (AdamW)", ["accelerate/optimizer.py", "(step)"]),
        ("lr_scheduler.step", ["torch/optim/lr_scheduler.py", "(step)"]),
        ("model.zero_grad", ["torch/nn/modules/module.py", "(zero_grad)"]),
        ("floating_point_ops", ["transformers/trainer.py", "(floating_point_ops)"]),
        ("logging (_maybe_log_save_evaluate)", ["transformers/trainer.py", "(_maybe_log_save_evaluate)"]),
    ],
}


def _key_str(key) -> str:
    filename, line, func = key
    return f"{filename}:{line}({func})"


def cumulative(stats: pstats.Stats, patterns: list[list[str]]) -> float:
    """Cumulative seconds of the functions matching any pattern (all substrings must match).

    For a recursive function pstats' cumtime counts the outermost calls only, so the sum is right.
    """
    total = 0.0
    for key, (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        s = _key_str(key)
        if any(all(sub in s for sub in pat) for pat in patterns):
            total += ct
    return total


def child(spec_path: str) -> None:
    spec = harness.read_spec(spec_path)
    prof = cProfile.Profile()
    state = {"count": 0, "t0": None, "c0": None, "t1": None, "c1": None}
    warmup, steps = spec["warmup"], spec["steps"]

    def tick():
        state["count"] += 1
        if state["count"] == warmup:
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
            prof.enable()
        elif state["count"] == steps:
            prof.disable()
            state["t1"], state["c1"] = time.perf_counter(), time.process_time()

    if spec["side"] == "ours":
        from distrib_ft.runtime import metrics as metrics_mod

        write = metrics_mod.MetricsLog.write

        def write_and_tick(self, record):
            out = write(self, record)
            if "tokens_per_second" in record:
                tick()
            return out

        metrics_mod.MetricsLog.write = write_and_tick
        result = tp.worker_ours(spec)
    else:
        from transformers import trainer_callback

        on_step_end = trainer_callback.CallbackHandler.on_step_end

        def on_step_end_and_tick(self, args, state_, control):
            out = on_step_end(self, args, state_, control)
            tick()
            return out

        trainer_callback.CallbackHandler.on_step_end = on_step_end_and_tick
        result = tp.worker_hf(spec)
    prof.dump_stats(spec["prof"])
    n = steps - warmup
    tokens = sum(result["tokens"][warmup:steps])
    harness.write_result(spec, {
        "steps": n, "tokens": tokens, "wall_s": state["t1"] - state["t0"], "cpu_s": state["c1"] - state["c0"],
        "final_loss": result["loss"][-1]})


def report(side: str, label: str, prof_path: str, res: dict, top: int) -> dict:
    stats = pstats.Stats(prof_path)
    n = res["steps"]
    profiled = stats.total_tt / n
    print(f"\n### {label}: {n} profiled steps, {res['tokens'] / n:.0f} tokens/step; "
          f"wall {1000 * res['wall_s'] / n:.1f} ms/step, CPU {1000 * res['cpu_s'] / n:.1f} ms/step under cProfile "
          f"({res['tokens'] / res['cpu_s']:.0f} tokens per CPU-second)")
    print("| part | ms/step (cumulative, under cProfile) |\n|---|---|")
    parts = {}
    for label_part, *patterns in PARTS[side]:
        ms = 1000 * cumulative(stats, [list(p) for p in patterns]) / n
        parts[label_part] = ms
        print(f"| {label_part} | {ms:.1f} |")
    print(f"| total profiled (all Python + C calls seen) | {1000 * profiled:.1f} |")
    if top <= 0:
        return {"ms_per_step_parts": parts, "profiled_ms_per_step": 1000 * profiled, **res}
    buf = io.StringIO()
    pstats.Stats(prof_path, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print("\ntop functions by own time (per whole window):")
    print("\n".join(lines[start:start + top + 1]))
    return {"ms_per_step_parts": parts, "profiled_ms_per_step": 1000 * profiled, **res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", nargs="+", default=["ours-zero0", "ours-zero2", "hf"], choices=tp.CONFIGS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--top", type=int, default=15, help="functions listed by own time")
    p.add_argument("--out", type=Path, help="write the summary JSON here (and the .prof files beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="distrib-ft-prof-") as tmp:
        work = Path(tmp)
        prep = tp.prepare(work, args)
        summary = {}
        for config in args.sides:
            run_dir = work / config
            prof_path = (args.out.parent / f"{args.out.stem}-{config}.prof") if args.out else run_dir / "p.prof"
            spec = {**tp.worker_spec(config, args.steps, prep), "warmup": args.warmup, "prof": str(prof_path)}
            res = harness.run_worker(__file__, spec, run_dir, threads=args.threads, flag="--child")
            side = spec["side"]
            summary[config] = report(side, f"{config} (OMP threads {args.threads})", str(prof_path), res, args.top)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
