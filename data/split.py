"""Check the default data set and (re)write its stratified train/validation/test split (70/10/20).

    python data/split.py data/parts/*.jsonl      # first split from the hand-written files
    python data/split.py                         # re-split the current files: same result, same seed

Pools the given JSON Lines files, refuses exact or near duplicates (word Jaccard > 0.6) and texts outside 4-40
words, then splits every (category, sentiment) cell 70/10/20 with a fixed seed and prints the counts per cell.
"""

import itertools
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}
SEED = 13


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def check(rows: list[dict]) -> None:
    keys = [" ".join(sorted(words(r["text"]))) for r in rows]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        sys.exit(f"duplicate texts: {duplicates[:3]}")
    for row in rows:
        if not 4 <= len(row["text"].split()) <= 40:
            sys.exit(f"text outside 4-40 words: {row['text']!r}")
    sets = [words(r["text"]) for r in rows]
    for i, j in itertools.combinations(range(len(rows)), 2):
        if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) > 0.6:
            sys.exit(f"near duplicates: {rows[i]['text']!r} / {rows[j]['text']!r}")


def main(paths: list[str]) -> None:
    paths = paths or [str(HERE / f"{split}.jsonl") for split in SPLITS]
    rows = [json.loads(line) for path in paths for line in Path(path).read_text("utf-8").splitlines() if line.strip()]
    check(rows)
    cells = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["text"]):
        cells[(row["category"], row["sentiment"])].append(row)
    rng = random.Random(SEED)
    splits = defaultdict(list)
    for cell in sorted(cells):
        members = cells[cell]
        rng.shuffle(members)
        n_train = round(len(members) * SPLITS["train"])
        n_validation = round(len(members) * SPLITS["validation"])
        splits["train"] += members[:n_train]
        splits["validation"] += members[n_train : n_train + n_validation]
        splits["test"] += members[n_train + n_validation :]
    for split, members in splits.items():
        rng.shuffle(members)
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in members:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = Counter((r["category"], r["sentiment"]) for r in members)
        print(split, len(members), dict(sorted(counts.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
