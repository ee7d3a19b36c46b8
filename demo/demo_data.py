"""Generated demo data: a multi-task instruction pool and target tasks, no download.

The pool mixes several task families (arithmetic, number comparison, lookups in invented tables,
word copying, counting), unrelated filler, clusters of near-duplicates of the target validation
questions, and a share of wrong answers, so that the choice of a small training subset matters:

- the facts of the ``capital`` lookup are only learnt from examples that state them, so a subset
  must *cover* many keys; the near-duplicate clusters repeat the validation keys and attract
  first-order top-k selection, which then spends its budget on a handful of facts;
- wrong answers (``meta.wrong``) teach the wrong thing and should be avoided;
- filler and the non-target families are irrelevant to the targets.

Layout written by :func:`make_demo_data`::

    OUT/pool.jsonl                        records {"id", "task", "messages", "answer", "meta"}
    OUT/targets/<task>/validation.jsonl   small, used for selection
    OUT/targets/<task>/test.jsonl         larger, used for evaluation (exact match on "answer")
    OUT/manifest.json                     tasks, sizes, seed, families, clusters, wrong answers

Pool records' ``task`` is the family name; ``meta`` = {"family", "cluster" (or null), "wrong",
"correct_answer"}. For a wrong record ``answer`` is the (wrong) answer the assistant gives and
``meta.correct_answer`` the right one.

:func:`pretraining_corpus` gives Tulu-format text of the *non-target* families for the tiny base
model (:mod:`iaif.demo.tiny_model`), so the base model knows the format and the vocabulary but not
the target tasks.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from iaif.common.atomic import remove_stale_temps, temp_path, write_jsonl
from iaif.common.contracts import DEMO_MANIFEST_FILE
from iaif.common.provenance import write_run_info
from iaif.training.data import Example, Message, render

logger = logging.getLogger(__name__)

EOS = "</s>"
"""End-of-sequence token of the tiny tokenizer, written literally in the pretraining text."""

TARGET_FAMILIES = ("capital", "larger", "add")
OTHER_FAMILIES = ("smaller", "subtract", "last_word", "color_of", "count")
FILLER = "filler"

_SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "ta", "vo", "ni", "sha", "pe", "dor", "bel", "quo", "fi", "gan", "tur")
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "window", "bread", "music",
          "forest", "candle", "pencil", "ocean", "mirror", "basket", "rocket", "violin", "castle", "feather")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_TOPICS = ("the weather", "a morning walk", "cooking rice", "learning to swim", "a busy market",
           "an old library", "planting trees", "a rainy day", "a long train ride", "the night sky")
_FILLER_SENTENCES = (
    "It is a calm and simple thing that many people enjoy.",
    "Most people find it pleasant when there is enough time.",
    "There is usually more to it than one would first expect.",
    "A little patience and some practice make it much easier.",
    "It can be quiet, busy, or surprising depending on the day.",
    "Many small details make it worth a second look.",
)

Generator = Callable[[random.Random, "Tables"], tuple[str, str, str]]
"""(rng, tables) -> (question, answer, key); the key names the fact asked about."""


@dataclass(frozen=True)
class Tables:
    """The invented key -> value tables, fixed by the seed."""

    capitals: dict[str, str]
    colors: dict[str, str]


def _invented_names(rng: random.Random, n: int, syllables: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize())
    return sorted(names)


def make_tables(seed: int, num_countries: int = 16, num_objects: int = 30) -> Tables:
    """Invented countries with invented capitals, invented objects with colours."""
    rng = random.Random(f"tables-{seed}")
    countries = _invented_names(rng, num_countries, 3)
    capitals = _invented_names(rng, num_countries, 2)
    rng.shuffle(capitals)
    objects = [n.lower() for n in _invented_names(rng, num_objects, 2) if n not in capitals][:num_objects]
    return Tables(
        capitals=dict(zip(countries, capitals)),
        colors={o: rng.choice(_COLORS) for o in objects},
    )


def _capital(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    country = rng.choice(sorted(t.capitals))
    q = rng.choice(("What is the capital of {c}?", "Name the capital city of {c}.",
                    "Which city is the capital of {c}?", "Tell me the capital of {c}.")).format(c=country)
    return q, t.capitals[country], country


def _two_numbers(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(10), 2)
    return a, b


def _larger(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    a, b = _two_numbers(rng)
    q = rng.choice(("Which is larger, {a} or {b}?", "Pick the bigger number: {a} or {b}.",
                    "Of {a} and {b}, which is greater?")).format(a=a, b=b)
    return q, str(max(a, b)), f"{a},{b}"


def _smaller(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    a, b = _two_numbers(rng)
    q = rng.choice(("Which is smaller, {a} or {b}?", "Pick the smaller number: {a} or {b}.",
                    "Of {a} and {b}, which is less?")).format(a=a, b=b)
    return q, str(min(a, b)), f"{a},{b}"


def _add(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    q = rng.choice(("What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.")).format(a=a, b=b)
    return q, str(a + b), f"{a}+{b}"


def _subtract(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    a = rng.randrange(20)
    b = rng.randrange(a + 1)
    q = rng.choice(("What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.")).format(a=a, b=b)
    return q, str(a - b), f"{a}-{b}"


def _last_word(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    q = rng.choice(("What is the last word in: {w}?", "Repeat the final word of this list: {w}.")).format(w=" ".join(words))
    return q, words[-1], " ".join(words)


def _color_of(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    obj = rng.choice(sorted(t.colors))
    q = rng.choice(("What color is a {o}?", "Which colour does a {o} have?")).format(o=obj)
    return q, t.colors[obj], obj


def _count(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(1, 6))
    q = rng.choice(("How many words are in this list: {w}?", "Count the words: {w}.")).format(w=" ".join(words))
    return q, str(len(words)), " ".join(words)


def _filler(rng: random.Random, t: Tables) -> tuple[str, str, str]:
    topic = rng.choice(_TOPICS)
    q = rng.choice(("Write a short note about {x}.", "Say something about {x}.", "Describe {x} briefly.")).format(x=topic)
    a = " ".join(rng.sample(_FILLER_SENTENCES, 2))
    return q, a, topic


GENERATORS: dict[str, Generator] = {
    "capital": _capital, "larger": _larger, "add": _add,
    "smaller": _smaller, "subtract": _subtract, "last_word": _last_word, "color_of": _color_of,
    "count": _count, FILLER: _filler,
}


def _wrong_answer(family: str, answer: str, key: str, rng: random.Random, t: Tables) -> str:
    """A plausible but wrong answer for a target-family question."""
    if family == "capital":
        return rng.choice([c for c in t.capitals.values() if c != answer])
    if family == "larger":
        a, b = (int(x) for x in key.split(","))
        return str(min(a, b))
    if family == "add":
        return str(int(answer) + rng.choice((-2, -1, 1, 2, 3)))
    raise ValueError(f"no wrong-answer rule for family '{family}'")


_PREFIXES = ("", "Please answer: ", "Question: ", "Quick one. ")
_SUFFIXES = ("", " Answer briefly.", " Thanks!")
MAX_CLUSTER_SIZE = 2 * len(_PREFIXES) * len(_SUFFIXES) - 1


def near_duplicates(question: str) -> list[str]:
    """Light rewrites of a question (prefix, suffix, lower case), the question itself excluded."""
    variants = [f"{p}{q}{s}" for q in (question, question.lower()) for p in _PREFIXES for s in _SUFFIXES]
    return list(dict.fromkeys(v for v in variants if v != question))


@dataclass
class DemoDataConfig:
    """Settings of the generated demo pool and target tasks."""

    output_dir: str = "runs/demo_data"
    """Folder to write pool.jsonl, targets/ and manifest.json into (a previous demo-data folder there is replaced)."""
    seed: int = 0
    """Seed for the invented tables and every sampled example."""
    target_tasks: list[str] = field(default_factory=lambda: list(TARGET_FAMILIES))
    """Families used as target tasks (subset of capital, larger, add)."""
    per_target_family: int = 300
    """Pool examples of each target family, not counting near-duplicate clusters."""
    per_other_family: int = 130
    """Pool examples of each non-target family (smaller, subtract, last_word, color_of, count)."""
    num_filler: int = 250
    """Unrelated filler examples in the pool."""
    clusters_per_target: int = 4
    """Near-duplicate clusters per target task; each repeats one validation question's fact."""
    cluster_size: int = 10
    """Examples per near-duplicate cluster (light rewrites of the question, same answer; at most 23)."""
    wrong_fraction: float = 0.15
    """Share of the non-cluster target-family pool examples that get a wrong answer."""
    validation_size: int = 12
    """Validation examples per target task (used for selection)."""
    test_size: int = 100
    """Test examples per target task (used for evaluation)."""
    num_countries: int = 16
    """Size of the invented country -> capital table (the facts of the capital task)."""


def _record(rid: str, family: str, q: str, a: str, *, cluster: str | None = None, wrong: bool = False,
            correct: str | None = None) -> dict:
    return {
        "id": rid,
        "task": family,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        "answer": a,
        "meta": {"family": family, "cluster": cluster, "wrong": wrong, "correct_answer": correct if correct is not None else a},
    }


def _sample(family: str, rng: random.Random, t: Tables, n: int, avoid: AbstractSet[str] = frozenset()) -> list[tuple[str, str, str]]:
    """n examples of a family whose question text is not in ``avoid``."""
    out: list[tuple[str, str, str]] = []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        q, a, key = GENERATORS[family](rng, t)
        if q not in avoid:
            out.append((q, a, key))
    raise ValueError(f"family '{family}': cannot draw {n} examples outside the held-out questions")


def generate(cfg: DemoDataConfig) -> tuple[list[dict], dict[str, dict[str, list[dict]]], dict]:
    """Build (pool records, {task: {"validation": [...], "test": [...]}}, manifest) in memory."""
    unknown = [t for t in cfg.target_tasks if t not in TARGET_FAMILIES]
    if unknown or not cfg.target_tasks:
        raise ValueError(f"target_tasks must be a non-empty subset of {TARGET_FAMILIES}, got {cfg.target_tasks}")
    if not 0 <= cfg.cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster_size must be in [0, {MAX_CLUSTER_SIZE}], got {cfg.cluster_size}")
    if not 0.0 <= cfg.wrong_fraction < 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1), got {cfg.wrong_fraction}")
    tables = make_tables(cfg.seed, cfg.num_countries)
    rng = random.Random(f"demo-{cfg.seed}")

    targets: dict[str, dict[str, list[dict]]] = {}
    held_out: dict[str, set[str]] = {}  # validation questions never appear verbatim in the pool
    validation_facts: dict[str, list[tuple[str, str, str]]] = {}
    for task in cfg.target_tasks:
        val = _sample(task, rng, tables, cfg.validation_size)
        test = _sample(task, rng, tables, cfg.test_size, avoid={q for q, _, _ in val})
        targets[task] = {
            split: [_record(f"{task}-{split}-{i:04d}", task, q, a) for i, (q, a, _) in enumerate(rows)]
            for split, rows in (("validation", val), ("test", test))
        }
        held_out[task] = {q for q, _, _ in val}
        validation_facts[task] = val

    pool: list[dict] = []
    clusters: dict[str, list[str]] = {}
    for family in (*TARGET_FAMILIES, *OTHER_FAMILIES, FILLER):
        is_target = family in cfg.target_tasks
        n = cfg.per_target_family if family in TARGET_FAMILIES else cfg.num_filler if family == FILLER else cfg.per_other_family
        rows = _sample(family, rng, tables, n, avoid=held_out.get(family, set()))
        num_wrong = round(cfg.wrong_fraction * n) if family in TARGET_FAMILIES else 0
        wrong_rows = set(rng.sample(range(n), num_wrong))
        for i, (q, a, key) in enumerate(rows):
            rid = f"{family}-{i:04d}"
            if i in wrong_rows:
                pool.append(_record(rid, family, q, _wrong_answer(family, a, key, rng, tables), wrong=True, correct=a))
            else:
                pool.append(_record(rid, family, q, a))
        if not is_target:
            continue
        for c, (q, a, _) in enumerate(rng.sample(validation_facts[family], min(cfg.clusters_per_target, len(validation_facts[family])))):
            name = f"{family}-c{c:02d}"
            members = rng.sample(near_duplicates(q), cfg.cluster_size)
            clusters[name] = []
            for j, variant in enumerate(members):
                rid = f"{name}-{j:02d}"
                pool.append(_record(rid, family, variant, a, cluster=name))
                clusters[name].append(rid)
    random.Random(f"order-{cfg.seed}").shuffle(pool)

    manifest = {
        "seed": cfg.seed,
        "target_tasks": list(cfg.target_tasks),
        "families": {f: sum(r["task"] == f for r in pool) for f in (*TARGET_FAMILIES, *OTHER_FAMILIES, FILLER)},
        "pool_size": len(pool),
        "splits": {t: {s: len(v) for s, v in d.items()} for t, d in targets.items()},
        "clusters": clusters,
        "wrong_ids": sorted(r["id"] for r in pool if r["meta"]["wrong"]),
        "filler_family": FILLER,
        "answer_field": "short answer the assistant gives; exact-match gold in targets/*/test.jsonl",
        "capitals": tables.capitals,
    }
    return pool, targets, manifest


def make_demo_data(cfg: DemoDataConfig) -> Path:
    """Generate the demo pool and target sets into ``cfg.output_dir`` (written to a temporary
    sibling folder first, then moved into place, so nothing is left half-written)."""
    pool, targets, manifest = generate(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out}: exists and is not a demo-data folder; choose another output_dir")
    remove_stale_temps(out.parent, out.name)
    tmp = temp_path(out)
    write_jsonl(tmp / "pool.jsonl", pool)
    for task, splits in targets.items():
        for split, records in splits.items():
            write_jsonl(tmp / "targets" / task / f"{split}.jsonl", records)
    with open(tmp / DEMO_MANIFEST_FILE, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    write_run_info(tmp, cfg, "make-demo-data")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("demo data: %d pool examples, targets %s -> %s", len(pool), manifest["splits"], out)
    return out


def pretraining_corpus(seed: int, num_documents: int) -> list[str]:
    """Tulu-format conversations (1-3 turns, ``</s>`` after each answer) of the non-target
    families and filler, for pre-training the tiny base model."""
    tables = make_tables(seed)
    rng = random.Random(f"pretrain-{seed}")
    families = (*OTHER_FAMILIES, FILLER)
    eos_only = SimpleNamespace(eos_token=EOS)
    docs = []
    for d in range(num_documents):
        messages: list[Message] = []
        for _ in range(rng.randint(1, 3)):
            q, a, _ = GENERATORS[rng.choice(families)](rng, tables)
            messages += [Message("user", q), Message("assistant", a)]
        text, _ = render(Example(f"pretrain-{d}", tuple(messages), "<pretraining>", d + 1, "pretrain", {}), eos_only, "tulu")
        docs.append(text)
    return docs
