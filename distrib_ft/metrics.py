"""What a run tells its user: metrics.jsonl (rank 0), and a progress bar that works in Ray workers."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines, one object per logging step, written by rank 0.

    On resume, lines past the resumed step are dropped first (rewritten atomically), so that the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            from distrib_ft.checkpoint import atomic_write_text

            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class Progress:
    """A progress bar on rank 0: step, loss, tokens/s, ETA.

    Inside a Ray worker, Ray's ``tqdm_ray`` renders the bar on the driver (a plain tqdm's carriage
    returns would arrive as garbled log lines); elsewhere plain tqdm on stderr.
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.bar = None
        if not enabled:
            return
        if os.environ.get("DISTRIB_FT_IN_RAY") == "1":
            from ray.experimental.tqdm_ray import tqdm
            self.bar = tqdm(total=total, desc=desc, position=0)
            self.bar.update(initial)
        else:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                            disable=None)
        self.start = time.time()

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        if postfix:
            text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
            self.bar.set_description(f"train [{text}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
