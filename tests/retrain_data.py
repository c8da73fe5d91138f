"""Three toy skills for the retraining pipeline's tests (``distrib-ft retrain``, issue 12), in tests/jobs.py style.

Each skill is an Alpaca JSONL task (instruction, input, output) the tiny model learns in a few steps, unlike the
others in both prompt and answer, so a round on one skill measurably moves the others (the retention suites of
docs/architecture.md's forgetting monitor). A round's train and eval files are drawn with different seeds: the eval
file is the round's held-out set, which later rounds keep as a retention suite.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]


def _write(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def convert(path: Path, n: int, seed: int) -> Path:
    """Skill 1: unit conversion in one fixed answer format (as tests/jobs.py's toy_alpaca)."""
    rng = random.Random(seed)
    return _write(path, [{"instruction": f"convert {a} km to m", "input": "", "output": f"{a} km = {a * 1000} m"}
                         for a in (rng.randint(1, 9) for _ in range(n))])


def join(path: Path, n: int, seed: int) -> Path:
    """Skill 2: join two words with a hyphen (as tests/jobs.py's toy_join)."""
    rng = random.Random(seed)
    return _write(path, [{"instruction": f"join {w[0]} and {w[1]}", "input": "", "output": f"{w[0]}-{w[1]}"}
                         for w in (rng.sample(_WORDS, 2) for _ in range(n))])


def spell(path: Path, n: int, seed: int) -> Path:
    """Skill 3: spell a word letter by letter, the word in the input field."""
    rng = random.Random(seed)
    return _write(path, [{"instruction": "spell the word", "input": w, "output": " ".join(w.upper())}
                         for w in (rng.choice(_WORDS) for _ in range(n))])


SKILLS = {"convert": convert, "join": join, "spell": spell}


def skill_files(folder: Path, n_train: int = 64, n_eval: int = 8) -> dict[str, tuple[Path, Path]]:
    """Write every skill's train and held-out eval file under ``folder``; ``{skill: (train, eval)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: (make(folder / f"{name}.train.jsonl", n_train, seed=10 + i),
                   make(folder / f"{name}.eval.jsonl", n_eval, seed=100 + i))
            for i, (name, make) in enumerate(SKILLS.items())}
