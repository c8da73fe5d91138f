"""Write the demo's data sets to examples/data/ (deterministic: seeded ``random``, no network).

- ``units_train.jsonl`` / ``units_eval.jsonl``: a narrow NEW skill for the demo's LoRA run: metric unit
  conversion answered in one fixed terse style, ``"<value> <unit> = <value> <unit>"`` (e.g. instruction
  "Convert 3.5 km to m." -> "3.5 km = 3500 m"). Disjoint: no (value, from, to) question is in both.
- ``general_qa.jsonl`` (``--general-qa``): a retention set, ~100 general prompts (facts, definitions,
  how-tos, simple reasoning, language) answered by SmolLM2-135M-Instruct itself (greedy, chat template,
  at most 48 new tokens; an answer cut by that limit is trimmed to its last full sentence, if any). Needs the
  converted model (``distrib_ft.assets.smollm2_path``); a few minutes on CPU.

Usage: python scripts/make_demo_data.py [--general-qa] [--out-dir examples/data]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from decimal import Decimal
from fractions import Fraction as F
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# symbol -> (quantity, size in the quantity's base unit, English name)
UNITS = {
    "km": ("length", F(1000), "kilometer"), "m": ("length", F(1), "meter"),
    "cm": ("length", F(1, 100), "centimeter"), "mm": ("length", F(1, 1000), "millimeter"),
    "kg": ("mass", F(1000), "kilogram"), "g": ("mass", F(1), "gram"), "mg": ("mass", F(1, 1000), "milligram"),
    "l": ("volume", F(1), "liter"), "ml": ("volume", F(1, 1000), "milliliter"),
    "h": ("time", F(3600), "hour"), "min": ("time", F(60), "minute"), "s": ("time", F(1), "second"),
}
QUANTITIES = sorted({q for q, _, _ in UNITS.values()})
MAX_DECIMALS, MAX_VALUE = 4, 10**6  # both sides of every answer

# (instruction, input); {v} value, {a}/{b} symbols, {A} source name (plural unless 1), {B} target name (plural)
TEMPLATES = [
    ("Convert {v} {a} to {b}.", ""),
    ("Convert {v} {A} to {B}.", ""),
    ("How many {B} are in {v} {a}?", ""),
    ("What is {v} {a} in {b}?", ""),
    ("Express {v} {A} in {B}.", ""),
    ("{v} {a} = ? {b}", ""),
    ("Please convert {v} {a} into {B}.", ""),
    ("Change {v} {A} to {b}.", ""),
    ("Convert the following quantity to {B}.", "{v} {a}"),
]
CANONICAL_SHARE = 0.3  # the first template; the others share the rest evenly


def fmt(x: F) -> str:
    """An exact, terminating value in plain decimal notation without trailing zeros: 3500, 0.25, 1.5."""
    s = format((Decimal(x.numerator) / Decimal(x.denominator)).normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def _nice(rng: random.Random) -> F:
    """A number a person would write: 7, 250, 4300, 12.5, 0.75."""
    shape = rng.randrange(5)
    if shape == 0:
        return F(rng.randint(1, 20))
    if shape == 1:
        return F(rng.randint(21, 999))
    if shape == 2:
        return F(rng.randint(100, 999) * 10)
    if shape == 3:
        return F(rng.randint(1, 999), 10)
    return F(rng.randint(1, 199) * 5, 100)


def _ok(x: F) -> bool:
    return 0 < x <= MAX_VALUE and (10**MAX_DECIMALS) % x.denominator == 0


def conversion(rng: random.Random) -> tuple[F, str, str, F]:
    """One question (value, from, to, answer); a nice number on a random side, both sides exact."""
    quantity = rng.choice(QUANTITIES)
    a, b = rng.sample([u for u, (q, _, _) in UNITS.items() if q == quantity], 2)
    ratio = UNITS[a][1] / UNITS[b][1]
    while True:
        x = _nice(rng)
        v, r = (x, x * ratio) if rng.random() < 0.5 else (x / ratio, x)
        if _ok(v) and _ok(r):
            return v, a, b, r


def record(rng: random.Random, v: F, a: str, b: str, r: F) -> dict:
    weights = [CANONICAL_SHARE] + [(1 - CANONICAL_SHARE) / (len(TEMPLATES) - 1)] * (len(TEMPLATES) - 1)
    instruction, inp = rng.choices(TEMPLATES, weights)[0]
    names = {"v": fmt(v), "a": a, "b": b, "A": UNITS[a][2] + ("" if v == 1 else "s"), "B": UNITS[b][2] + "s"}
    return {"instruction": instruction.format(**names), "input": inp.format(**names),
            "output": f"{fmt(v)} {a} = {fmt(r)} {b}"}


def unit_records(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/eval splits: distinct questions first, then the split, then one phrasing each."""
    rng, seen, questions = random.Random(seed), set(), []
    while len(questions) < n_train + n_eval:
        q = conversion(rng)
        if q[:3] not in seen:
            seen.add(q[:3])
            questions.append(q)
    recs = [record(rng, *q) for q in questions]
    return recs[n_eval:], recs[:n_eval]


GENERAL_PROMPTS: list[str | tuple[str, str]] = [
    # facts
    "What is the capital of France?", "What is the capital of Japan?", "Which planet is known as the Red Planet?",
    "Who wrote \"Romeo and Juliet\"?", "What is the largest ocean on Earth?", "How many continents are there?",
    "What is the chemical symbol for gold?", "Who painted the Mona Lisa?",
    "What is the boiling point of water at sea level in degrees Celsius?", "Which gas do plants absorb from the air?",
    "What is the longest river in Africa?", "Who was the first person to walk on the Moon?",
    "What language is spoken in Brazil?", "What is the hardest natural substance?",
    "How many days are in a leap year?", "What is the smallest prime number?",
    "Which organ pumps blood through the human body?", "What is the tallest mountain in the world?",
    "In which country are the pyramids of Giza?", "Who developed the theory of relativity?",
    "What is the main ingredient of guacamole?", "What currency is used in Japan?",
    "How many legs does a spider have?", "What is the largest planet in our solar system?",
    "Who invented the telephone?",
    # definitions
    "What is photosynthesis?", "Define the word \"democracy\".", "What is a black hole?",
    "Explain what DNA is in one sentence.", "What does a CPU do in a computer?", "What is gravity?",
    "What is inflation in economics?", "What is a noun?", "What is machine learning?",
    "What does \"ecosystem\" mean?", "What is the difference between weather and climate?", "What is an atom?",
    "What is a metaphor?", "What is the internet?", "What is a vaccine?", "What is renewable energy?",
    "What is a volcano?", "What is an algorithm?", "What is friction?", "What is a haiku?",
    # how-tos
    "How do I boil an egg?", "How can I improve my sleep?", "Give three tips for studying effectively.",
    "How do you make a cup of tea?", "How can I save money on groceries?", "What should I do if I cut my finger?",
    "How do I plant a tomato seed?", "How can I stay focused while working from home?",
    "Give me two tips for writing a good email.", "How do I reduce stress before an exam?",
    "What are good habits for staying healthy?", "How do I start learning to play the guitar?",
    "How can I make my password more secure?", "How should I prepare for a job interview?",
    "How do I clean a cast iron pan?", "How can I be more productive in the morning?",
    "What is a good way to learn a new language?", "How do I make a paper airplane?",
    "How can I reduce plastic waste at home?", "How do I write a good cover letter?",
    # simple reasoning and arithmetic
    "What is 12 plus 30?", "If I have 5 apples and eat 2, how many are left?", "What is 7 times 8?",
    "If today is Monday, what day will it be in three days?", "What is half of 50?",
    "Sort these numbers from smallest to largest: 9, 2, 7, 4.", "What comes next in the sequence 2, 4, 6, 8?",
    "If a shirt costs $20 and is 25% off, what is the new price?",
    "Tom is taller than Sam, and Sam is taller than Ann. Who is the shortest?", "What is the square root of 81?",
    "How many sides does a hexagon have?", "Is 17 a prime number?", "What is 100 divided by 4?",
    "If it is raining, should I take an umbrella? Explain briefly.", "Which is larger, 0.5 or 0.45?",
    # language and writing
    "Give me a synonym for \"happy\".", "What is the opposite of \"ancient\"?",
    "Translate \"thank you\" into Spanish.", "Write a short sentence using the word \"curious\".",
    "Suggest a name for a pet goldfish.", "Write a haiku about autumn.", "Give me a fun fact about octopuses.",
    "What is the plural of \"mouse\"?", "Write a one-sentence birthday message for a friend.",
    "Name three primary colors.", "List three fruits that are red.", "Tell me a short joke.",
    "Describe the color blue to someone who cannot see.",
    ("Summarize the following text in one sentence.", "The city council met on Tuesday to discuss the new park. "
     "Residents asked for more trees, a playground and better lighting. The council agreed to review the plans "
     "next month."),
    ("Correct the grammar in this sentence.", "She don't like going to school on Mondays."),
    ("Classify the sentiment of this review as positive or negative.", "The food was cold and the service was slow."),
    ("Extract the name of the city from this sentence.", "Last summer we spent two weeks hiking near Vancouver."),
    ("Rewrite this sentence to be more formal.", "Hey, can you send me that report real quick?"),
    ("Give a title for this story.", "A young girl finds a lost puppy in the rain and searches the whole town "
     "for its owner."),
    ("Answer the question using the text.", "Text: Maria has two brothers and one sister.\n"
     "Question: How many siblings does Maria have?"),
]


def _trim(text: str) -> str:
    """Cut an answer that hit the token limit after its last full sentence (not after "2." in a list)."""
    m = re.match(r"(.*[^\d\s][.!?])(\s|$)", text, flags=re.S)
    return m.group(1) if m and len(m.group(1)) >= 20 else text


def general_qa(max_new_tokens: int, cache_dir: str | None, prompts=None, label: str = "general_qa") -> list[dict]:
    """The base model's own greedy answers to ``prompts`` (default GENERAL_PROMPTS).

    Rendered as ``distrib_ft.data.formats`` does; a prompt is an instruction or an (instruction, input) pair.
    """
    prompts = GENERAL_PROMPTS if prompts is None else prompts
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distrib_ft.assets import smollm2_path

    path = smollm2_path(cache_dir)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    out, start = [], time.perf_counter()
    for i, p in enumerate(prompts):
        instruction, inp = (p, "") if isinstance(p, str) else p
        user = instruction + ("\n\n" + inp if inp else "")  # distrib_ft.data.formats's chat rendering of alpaca
        enc = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[0, enc["input_ids"].shape[1]:]
        answer = tok.decode(ids, skip_special_tokens=True).strip()
        if len(ids) == max_new_tokens and ids[-1] != tok.eos_token_id:
            answer = _trim(answer)
        out.append({"instruction": instruction, "input": inp, "output": answer})
        if (i + 1) % 10 == 0:
            print(f"  {label} {i + 1}/{len(prompts)} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    return out


def write_jsonl(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    print(f"wrote {path} ({len(recs)} records, {path.stat().st_size / 1e3:.1f} KB)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=60)
    parser.add_argument("--general-qa", action="store_true", help="also write general_qa.jsonl (loads SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--cache-dir", help="model cache root (default $DISTRIB_FT_CACHE or ~/.cache/distrib-ft)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = unit_records(args.n_train, args.n_eval, args.seed)
    write_jsonl(args.out_dir / "units_train.jsonl", train)
    write_jsonl(args.out_dir / "units_eval.jsonl", evaluation)
    if args.general_qa:
        write_jsonl(args.out_dir / "general_qa.jsonl", general_qa(args.max_new_tokens, args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.exit(main())
