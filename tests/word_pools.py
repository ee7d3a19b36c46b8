"""Small random question/answer pools for the feature-extraction tests (shared by several test files)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "the a cat dog runs over under blue red green house tree river stone light dark big small one two three".split()


def write_word_pool(path: Path, n: int, seed: int, question_words: tuple[int, int], answer_words: tuple[int, int],
                    prefix: str = "ex") -> Path:
    """``n`` records ``{"id": prefix+i, "question", "answer"}`` of random words, lengths drawn from the given
    inclusive ranges, reproducible from ``seed``."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*question_words)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*answer_words)))
            fh.write(json.dumps({"id": f"{prefix}{i}", "question": q, "answer": a}) + "\n")
    return path
