"""Write the bundled sample set: src/deltatune/data/sample_train.jsonl and sample_eval.jsonl.

The task is date normalisation, in English and Chinese: "March 5, 2024", "5 March 2024" or "2024年3月5日"
-> "2024-03-05". Every answer is checkable (exact match), the base SmolLM2-135M-Instruct gets it wrong (it
chats instead of answering in the format), and a short LoRA run learns the rule. Train and held-out dates
never overlap. Deterministic: run it again and the files come out byte-identical.

Run: .venv/bin/python scripts/make_sample_data.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import random

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
EN_INSTRUCTIONS = [
    "Rewrite the date in YYYY-MM-DD format.",
    "Convert this date to ISO format (YYYY-MM-DD).",
    "Normalize the date to YYYY-MM-DD.",
]
ZH_INSTRUCTIONS = [
    "把日期改写成 YYYY-MM-DD 格式。",
    "将下面的日期转换为 ISO 格式（YYYY-MM-DD）。",
    "请把这个日期标准化为 YYYY-MM-DD。",
]
TRAIN_SIZE, EVAL_SIZE = 360, 60
OUT = os.path.join(os.path.dirname(__file__), "..", "src", "deltatune", "data")


def written(year: int, month: int, day: int, style: int) -> str:
    """The date as a person writes it: style 0 'March 5, 2024', 1 '5 March 2024', 2 '2024年3月5日'."""
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{day} {MONTHS[month - 1]} {year}"
    return f"{year}年{month}月{day}日"


def example(rng: random.Random, year: int, month: int, day: int, style: int) -> dict[str, str]:
    instructions = ZH_INSTRUCTIONS if style == 2 else EN_INSTRUCTIONS
    return {
        "instruction": rng.choice(instructions),
        "input": written(year, month, day, style),
        "output": f"{year:04d}-{month:02d}-{day:02d}",
    }


def unique_dates(rng: random.Random, count: int) -> list[tuple[int, int, int]]:
    seen: set[tuple[int, int, int]] = set()
    while len(seen) < count:
        month = rng.randint(1, 12)
        seen.add((rng.randint(1950, 2049), month, rng.randint(1, DAYS_IN_MONTH[month - 1])))
    return sorted(seen)


def main(out: str = OUT) -> None:
    rng = random.Random(20240305)
    dates = unique_dates(rng, TRAIN_SIZE + EVAL_SIZE)
    rng.shuffle(dates)
    splits = {"sample_train.jsonl": dates[:TRAIN_SIZE], "sample_eval.jsonl": dates[TRAIN_SIZE:]}
    os.makedirs(out, exist_ok=True)
    for name, chosen in splits.items():
        rows = [example(rng, *date, style=i % 3) for i, date in enumerate(chosen)]
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="folder to write into (default: the package data folder)")
    main(parser.parse_args().out)
