"""Regenerate examples/user_task.jsonl and examples/user_task.csv (a toy user task).

Predicates: ``subject_animal`` (the subject is an animal) and ``negated`` ("cannot" vs "can").
Rows sharing ``pair_id`` are the 4 variants of one sentence, so minimal pairs are declared.
Run: ``python examples/make_user_task.py`` (deterministic).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

ANIMALS = "cat dog horse bird fox goat mouse rabbit wolf bear duck sheep".split()
OBJECTS = "car truck boat train lamp clock door chair kettle radio phone bike".split()
VERBS = "move stop turn shake fall roll break spin glow wait rest start".split()
ADVERBS = "today quickly slowly again now often here there".split()


def main(n_groups: int = 60, seed: int = 0) -> None:
    """Write both example files next to this script."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < 4 * n_groups:
        a, o = rng.choice(ANIMALS), rng.choice(OBJECTS)
        v, d = rng.choice(VERBS), rng.choice(ADVERBS)
        texts = {
            (animal, neg): f"the {a if animal else o} {'cannot' if neg else 'can'} {v} {d}"
            for animal in (True, False)
            for neg in (True, False)
        }
        if any(t in seen for t in texts.values()):
            continue
        gid = f"g{len(rows) // 4:03d}"
        for (animal, neg), text in texts.items():
            seen.add(text)
            rows.append({"text": text, "subject_animal": animal, "negated": neg, "pair_id": gid})
    here = Path(__file__).parent
    with open(here / "user_task.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(here / "user_task.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "subject_animal", "negated", "pair_id"])
        for r in rows:
            yn = {True: "yes", False: "no"}
            w.writerow([r["text"], yn[r["subject_animal"]], yn[r["negated"]], r["pair_id"]])


if __name__ == "__main__":
    main()
