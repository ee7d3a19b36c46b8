"""Readers that turn the local evaluation sets (the shared data folder, the demo targets) into the
flat records the task templates in ``templates/`` expect.

Each reader returns a list of :class:`Subtask`: a name, the scored records, optional few-shot
records, and task-specific YAML keys. Bad input raises :class:`iaif.training.data.DataError` naming the
file and line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from iaif.evaluation.tasks.code_exec import read_humaneval
from iaif.training.data import DataError, read_jsonl

Record = dict[str, Any]


@dataclass
class Subtask:
    """One lm-eval task: scored records, few-shot records (None: few-shot from the scored file)."""

    name: str
    records: list[Record]
    fewshot: list[Record] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys added to the generated task YAML (description, num_fewshot, ...)."""
    process_results: str | None = None
    """Dotted path of an lm-eval `process_results` function (written as `!function`)."""


def _read_jsonl(path: Path) -> list[tuple[int, Record]]:
    out = list(read_jsonl(path))
    if not out:
        raise DataError(str(path), None, None, "no records")
    return out


def _need(rec: Record, key: str, path: Path, line: int) -> Any:
    if key not in rec or rec[key] in (None, ""):
        raise DataError(str(path), line, key, "missing")
    return rec[key]


T = TypeVar("T")


def hold_out(records: list[T], every: int | None) -> tuple[list[T], list[T]]:
    """Split a benchmark that has no separate few-shot split into (scored, held out): every ``every``-th
    record (the 0th, the ``every``-th, ...; None: only the 0th) is held out as the few-shot and
    selection-target set and never scored."""
    held = [i for i in range(len(records)) if (i == 0 if every is None else i % every == 0)]
    kept = set(held)
    return [r for i, r in enumerate(records) if i not in kept], [records[i] for i in held]


def _require_dir(path: Path) -> Path:
    if not path.exists():
        raise DataError(str(path), None, None, "not found (is the data folder setting right?)")
    return path


# ------------------------------------------------------------------------------------------
# Shared-data benchmarks
# ------------------------------------------------------------------------------------------


def _mmlu_rows(path: Path) -> list[Record]:
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for lineno, row in enumerate(reader, start=2):
            try:
                answer = int(row["answer"])
                choices = [row[f"choice{i}"] for i in range(4)]
                question = row["question"]
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(str(path), lineno, "answer/choice0-3/question", f"bad MMLU row ({err})") from None
            if not 0 <= answer <= 3:
                raise DataError(str(path), lineno, "answer", f"must be 0-3, got {answer}")
            rows.append({"question": question, "choices": choices, "answer": answer})
    return rows


def read_mmlu(data_dir: Path) -> list[Subtask]:
    """MMLU test per subject, 5-shot from the subject's dev file."""
    root = _require_dir(data_dir / "mmlu")
    subtasks = []
    for test in sorted((root / "test").glob("*_test.csv")):
        subject = test.name[: -len("_test.csv")]
        dev = root / "dev" / f"{subject}_dev.csv"
        nice = subject.replace("_", " ")
        subtasks.append(Subtask(
            subject, _mmlu_rows(test), _mmlu_rows(_require_dir(dev)),
            extra={"description": f"The following are multiple choice questions (with answers) about {nice}.\n\n"},
        ))
    return subtasks


_BBH_QA = re.compile(r"Q: (.*?)\nA: Let's think step by step\.\s*(.*)", re.S)


def read_bbh(data_dir: Path) -> list[Subtask]:
    """BBH per task; the 3 few-shot examples are parsed from cot-prompts/<task>.txt."""
    root = _require_dir(data_dir / "bbh")
    subtasks = []
    for path in sorted((root / "bbh").glob("*.json")):
        with open(path, encoding="utf-8") as fh:
            examples = json.load(fh).get("examples")
        if not examples:
            raise DataError(str(path), None, "examples", "missing or empty")
        records = [{"input": e["input"], "target": e["target"]} for e in examples]
        prompt_path = _require_dir(root / "cot-prompts" / f"{path.stem}.txt")
        text = prompt_path.read_text(encoding="utf-8").split("-----\n", 1)[-1]
        description, *blocks = text.strip().split("\n\nQ: ")
        shots = []
        for block in blocks:
            match = _BBH_QA.match("Q: " + block)
            if not match:
                raise DataError(str(prompt_path), None, None, "few-shot block is not 'Q: ...\\nA: Let's think step by step.\\n...'")
            shots.append({"input": match.group(1), "target": match.group(2).strip()})
        if len(shots) != 3:
            raise DataError(str(prompt_path), None, None, f"expected 3 few-shot examples, found {len(shots)}")
        subtasks.append(Subtask(path.stem, records, shots, extra={"description": description.strip() + "\n\n"}))
    return subtasks


def _squad_passages(path: Path) -> list[list[Record]]:
    """The questions of a SQuAD-format file grouped by passage (context text, first-seen order; TyDiQA
    repeats a passage as several one-question paragraphs)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh).get("data")
    if not data:
        raise DataError(str(path), None, "data", "missing or empty")
    passages: dict[str, list[Record]] = {}
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if not answers:
                    raise DataError(str(path), None, f"qas[{qa.get('id')}].answers", "empty")
                passages.setdefault(para["context"], []).append(
                    {"id": qa["id"], "context": para["context"], "question": qa["question"], "answers": answers})
    return list(passages.values())


def _qa_subtask(name: str, path: Path, every: int | None, scorer: str) -> Subtask:
    """Extractive QA with held-out passages (:func:`hold_out` over passages): the first question of each
    held-out passage is a few-shot / target example, and none of its questions is scored (no scored
    question shares a passage with an example)."""
    scored, held = hold_out(_squad_passages(path), every)
    return Subtask(name, [q for passage in scored for q in passage], [passage[0] for passage in held], process_results=scorer)


TYDIQA_LANGUAGES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id",
                    "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te"}
_QA_SCORER = "lm_eval.tasks.tydiqa.utils.process_results_{}"


SQUAD_HELD_OUT_EVERY = 20
"""SQuAD (XQuAD-en, 240 passages): every 20th passage is held out: 12 examples; none of their questions is scored."""


def read_tydiqa(data_dir: Path) -> list[Subtask]:
    """TyDiQA-GoldP dev per language, F1. The first dev question of each language is held out with every
    question on its passage, never scored: the 1-shot example and the selection target (9 in all, as
    LESS). ``train_partial`` has only 3 of the 9 languages, so the examples come from dev."""
    root = _require_dir(data_dir / "tydiqa_goldp" / "dev")
    return [_qa_subtask(code, _require_dir(root / f"{lang}_tydiqa_dev.json"), None, _QA_SCORER.format(code))
            for lang, code in TYDIQA_LANGUAGES.items()]


def read_squad(data_dir: Path) -> list[Subtask]:
    """SQuAD v1.1 dev subset (XQuAD English), F1; every ``SQUAD_HELD_OUT_EVERY``-th passage held out."""
    path = _require_dir(data_dir / "squad_v1.1_dev_subset_xquad_en" / "xquad.en.json")
    return [_qa_subtask("", path, SQUAD_HELD_OUT_EVERY, _QA_SCORER.format("en"))]


def read_gsm8k(data_dir: Path) -> list[Subtask]:
    """GSM8K test; few-shot examples sampled from train."""
    root = _require_dir(data_dir / "gsm8k")

    def load(path: Path) -> list[Record]:
        return [{"question": _need(r, "question", path, i), "answer": _need(r, "answer", path, i)}
                for i, r in _read_jsonl(path)]

    return [Subtask("", load(root / "test.jsonl"), load(root / "train.jsonl"))]


def _letters(n: int) -> str:
    return "ABCDEFGH"[:n]


ARC_HELD_OUT_EVERY = 50
"""ARC-Challenge (1,172 test questions, no other split here): every 50th held out, 24 examples."""
HELLASWAG_HELD_OUT_EVERY = 400
"""HellaSwag (10,042 validation items): every 400th held out, 26 examples."""
PIQA_HELD_OUT_EVERY = 75
"""PIQA (1,838 validation questions; the train questions are not in the data folder): every 75th held out, 25."""


def _multiple_choice(records: list[Record], path: Path, every: int) -> list[Subtask]:
    scored, held = hold_out(_check_gold(records, path), every)
    return [Subtask("", scored, held)]


def read_arc_challenge(data_dir: Path) -> list[Subtask]:
    """ARC-Challenge test (already {query, choices, gold}); every ``ARC_HELD_OUT_EVERY``-th question held out."""
    path = _require_dir(data_dir / "arc" / "arc_challenge.jsonl")
    records = []
    for i, r in _read_jsonl(path):
        query = _need(r, "query", path, i)
        records.append({"query": f"{query}\nAnswer:", "choices": _need(r, "choices", path, i), "gold": int(r.get("gold", -1))})
    return _multiple_choice(records, path, ARC_HELD_OUT_EVERY)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(data_dir: Path) -> list[Subtask]:
    """HellaSwag validation (6 lines per item: context, label, 4 endings); every
    ``HELLASWAG_HELD_OUT_EVERY``-th item held out."""
    path = _require_dir(data_dir / "hellaswag" / "hellaswag_val_full.txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(str(path), len(lines), None, "expected 6 lines per item")
    records = []
    for start in range(0, len(lines), 6):
        ctx, label, *endings = lines[start : start + 6]
        if not label.strip().isdigit():
            raise DataError(str(path), start + 2, "label", f"expected 0-3, got '{label}'")
        records.append({"query": _hellaswag_clean(ctx), "choices": [_hellaswag_clean(e) for e in endings], "gold": int(label)})
    return _multiple_choice(records, path, HELLASWAG_HELD_OUT_EVERY)


def read_piqa(data_dir: Path) -> list[Subtask]:
    """PIQA validation with the labels from valid-labels.lst; every ``PIQA_HELD_OUT_EVERY``-th held out."""
    root = _require_dir(data_dir / "piqa")
    rows = _read_jsonl(root / "valid.jsonl")
    labels = (root / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(rows):
        raise DataError(str(root / "valid-labels.lst"), None, None, f"{len(labels)} labels for {len(rows)} questions")
    path = root / "valid.jsonl"
    records = [{"query": f"Question: {_need(r, 'goal', path, i)}\nAnswer:",
                "choices": [_need(r, "sol1", path, i), _need(r, "sol2", path, i)], "gold": int(lab)}
               for (i, r), lab in zip(rows, labels)]
    return _multiple_choice(records, path, PIQA_HELD_OUT_EVERY)


def _commonsenseqa_records(path: Path) -> list[Record]:
    records = []
    for i, r in _read_jsonl(path):
        q = _need(r, "question", path, i)
        labels = [c["label"] for c in q["choices"]]
        key = _need(r, "answerKey", path, i)
        if key not in labels:
            raise DataError(str(path), i, "answerKey", f"'{key}' is not one of {labels}")
        choices = [c["text"] for c in q["choices"]]
        records.append({"query": f"Question: {q['stem']}\nAnswer:", "choices": choices, "gold": labels.index(key)})
    return records


def read_commonsenseqa(data_dir: Path) -> list[Subtask]:
    """CommonsenseQA dev (the test file has no answers); few-shot records from train."""
    root = _require_dir(data_dir / "commonsenseqa")
    return [Subtask("", _commonsenseqa_records(_require_dir(root / "dev_rand_split.jsonl")),
                    _commonsenseqa_records(_require_dir(root / "train_rand_split.jsonl")))]


def _aqua_records(path: Path) -> list[Record]:
    records = []
    for i, r in _read_jsonl(path):
        options = _need(r, "options", path, i)
        letters = _letters(len(options))
        correct = _need(r, "correct", path, i).strip()
        if correct not in letters:
            raise DataError(str(path), i, "correct", f"'{correct}' is not one of {list(letters)}")
        shown = " ".join(f"({o.replace(')', ') ', 1)}" for o in options)
        records.append({"query": f"Question: {r['question']}\nAnswer Choices: {shown}\nAnswer:",
                        "choices": list(letters), "gold": letters.index(correct)})
    return records


def read_aqua(data_dir: Path) -> list[Subtask]:
    """AQuA-RAT test: the options are shown, the answer letter is scored; few-shot records from dev."""
    root = _require_dir(data_dir / "aqua_rat")
    return [Subtask("", _aqua_records(_require_dir(root / "test.json")), _aqua_records(_require_dir(root / "dev.json")))]


def _check_gold(records: list[Record], path: Path) -> list[Record]:
    for i, r in enumerate(records, start=1):
        if not 0 <= r["gold"] < len(r["choices"]):
            raise DataError(str(path), i, "gold", f"index {r['gold']} outside the {len(r['choices'])} choices")
    return records


@dataclass(frozen=True)
class Benchmark:
    """A local benchmark: its reader, template, headline metric and how subtasks combine."""

    reader: Callable[[Path], list[Subtask]]
    template: str
    metric: str
    """lm-eval result key of the headline score, ``metric,filter``."""
    weight_by_size: bool = True
    """Group score: mean over all questions (True) or over subtasks (False)."""


BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark(read_mmlu, "mmlu.yaml", "acc,none", weight_by_size=True),
    "bbh": Benchmark(read_bbh, "bbh_cot.yaml", "exact_match,get-answer", weight_by_size=False),
    "tydiqa": Benchmark(read_tydiqa, "extractive_qa.yaml", "f1,none", weight_by_size=False),
    "squad": Benchmark(read_squad, "extractive_qa.yaml", "f1,none"),
    "gsm8k": Benchmark(read_gsm8k, "gsm8k.yaml", "exact_match,strict-match"),
    "arc_challenge": Benchmark(read_arc_challenge, "multiple_choice.yaml", "acc_norm,none"),
    "hellaswag": Benchmark(read_hellaswag, "multiple_choice.yaml", "acc_norm,none"),
    "piqa": Benchmark(read_piqa, "multiple_choice.yaml", "acc_norm,none"),
    "commonsenseqa": Benchmark(read_commonsenseqa, "multiple_choice.yaml", "acc,none"),
    "aqua": Benchmark(read_aqua, "multiple_choice.yaml", "acc,none"),
    "humaneval": Benchmark(read_humaneval, "humaneval.yaml", "pass@1,none"),
}
CODE_EXECUTION_TASKS = frozenset({"humaneval"})
"""Benchmarks scored by running model-written code: built only with ``allow_code_execution``."""


# ------------------------------------------------------------------------------------------
# Demo target tasks (iaif.demo.demo_data)
# ------------------------------------------------------------------------------------------

DEMO_METRIC = "exact_match,none"


def read_demo_target(task_dir: Path, split: str = "test") -> list[Subtask]:
    """``OUT/targets/<task>/<split>.jsonl`` records {id, task, messages, answer} → {id, prompt, answer}.

    The prompt is the single user turn; a system turn becomes the task description."""
    path = _require_dir(task_dir / f"{split}.jsonl")
    records: list[Record] = []
    systems: set[str] = set()
    for i, r in _read_jsonl(path):
        messages = _need(r, "messages", path, i)
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        if len(users) != 1:
            raise DataError(str(path), i, "messages", f"expected exactly one user turn, got {len(users)}")
        systems.update(m.get("content", "") for m in messages if m.get("role") == "system")
        records.append({"id": str(_need(r, "id", path, i)), "prompt": users[0], "answer": str(_need(r, "answer", path, i))})
    if len(systems) > 1:
        raise DataError(str(path), None, "messages", "system turns differ between records; expected one per task")
    extra = {"description": systems.pop()} if systems else {}
    return [Subtask("", records, extra=extra)]
