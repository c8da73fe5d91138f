"""Build the retraining demo's data (examples/retrain/data/) from examples/data: deterministic, no network.

Rounds 1 and 2 split the demo's skill (metric unit conversion, examples/data/units_{train,eval}.jsonl) in two
disjoint halves by unit family: r1 = length and mass (km, m, cm, mm, kg, g, mg), r2 = volume and time (l, ml, h,
min, s); each half keeps the first 16 held-out questions of its own units. Round 3 is a different skill: spelling a word
letter by letter (``Spell "capital" letter by letter.`` -> ``c-a-p-i-t-a-l``), over the distinct words of 4-10
letters in examples/data/general_qa.jsonl's answers, sorted then shuffled with a fixed seed (64 train words, 16
held-out words, disjoint). Records are Alpaca JSONL like examples/data (see its README).

    .venv/bin/python examples/retrain/make_data.py      # rewrites examples/retrain/data/*.jsonl (same bytes)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "data"
OUT = HERE / "data"
HALVES = {"units_length_mass": {"km", "m", "cm", "mm", "kg", "g", "mg"},
          "units_volume_time": {"l", "ml", "h", "min", "s"}}
PHRASINGS = ['Spell "{w}" letter by letter.', "Spell the word {w}.",
             'How do you spell "{w}"? Letter by letter, please.']
N_TRAIN, N_EVAL, SEED = 64, 16, 12  # N_EVAL: every held-out set (CPU: R's rows evaluate them all)


def _unit(record: dict) -> str:
    return record["output"].split(" = ")[0].split()[-1]  # "3.5 km = 3500 m" -> km


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def main(out: Path = OUT) -> None:
    """Write the six files (train and eval of r1, r2, r3) into ``out``, each atomically."""
    out.mkdir(exist_ok=True)
    for split in ("train", "eval"):
        records = [json.loads(line) for line in (SRC / f"units_{split}.jsonl").read_text().splitlines() if line]
        for name, units in HALVES.items():
            mine = [r for r in records if _unit(r) in units]
            _write(out / f"{name}_{split}.jsonl", mine[:N_EVAL] if split == "eval" else mine)
    answers = [json.loads(line)["output"] for line in (SRC / "general_qa.jsonl").read_text().splitlines() if line]
    words = sorted({w.lower() for a in answers for w in re.findall(r"\b[A-Za-z]{4,10}\b", a)})
    random.Random(SEED).shuffle(words)
    if len(words) < N_TRAIN + N_EVAL:
        raise SystemExit(f"examples/data/general_qa.jsonl: only {len(words)} distinct words; need {N_TRAIN + N_EVAL}")
    for split, chosen in (("train", words[:N_TRAIN]), ("eval", words[N_TRAIN:N_TRAIN + N_EVAL])):
        _write(out / f"spell_{split}.jsonl", [{"instruction": PHRASINGS[i % len(PHRASINGS)].format(w=w), "input": "",
                                               "output": "-".join(w)} for i, w in enumerate(chosen)])


if __name__ == "__main__":
    main()
