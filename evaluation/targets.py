"""Selection targets (the LESS validation sets) from the local benchmark data.

Writes one chat JSONL per benchmark, ``{id, task, benchmark, messages: [user, assistant]}``, that
``iaif select --targets`` and ``iaif run`` (``targets: {task: path}``) read:

- ``mmlu.jsonl``: the 5 dev questions of each subject (285), ``task`` = subject;
- ``bbh.jsonl``: the 3 chain-of-thought exemplars of each task (81), ``task`` = BBH task;
- ``tydiqa.jsonl``: the first dev question of each language (9; held out with its passage, never scored),
  ``task`` = language code;
- ``gsm8k.jsonl``: the first N train questions with their full solution (``gsm8k_examples``, 8);
- ``arc_challenge.jsonl`` (24), ``hellaswag.jsonl`` (26), ``piqa.jsonl`` (25): the questions held out of the
  single labelled split (every 50th / 400th / 75th), never scored, the gold choice's text as the answer;
- ``squad.jsonl`` (12): the first question of every 20th XQuAD-en passage (no question on those
  passages is scored);
- ``commonsenseqa.jsonl`` (25): the first train questions; ``aqua.jsonl`` (25): the first dev questions
  (the answer letter, as scored);
- ``humaneval.jsonl`` (needs the humaneval extra): the 9 held-out problems (never scored by
  the humaneval task), the signature and docstring as the user turn, the reference body as the answer.

None is taken from the records a task scores: each comes from the benchmark's few-shot records
(:attr:`Subtask.fewshot`: a separate split, or records held out of the evaluated one). ``sizes.json``
records the number of examples and tasks per file.

The records come from the readers of :mod:`iaif.evaluation.tasks.sources` and are formatted with the
same task templates the evaluation uses: the user turn is the task description followed by the
template's ``doc_to_text``, the assistant turn its ``doc_to_target`` (the answer letter for MMLU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml

from iaif.common.atomic import write_json, write_jsonl
from iaif.common.provenance import write_run_info
from iaif.evaluation.tasks.build import TEMPLATES, default_data_dir
from iaif.evaluation.tasks.sources import BENCHMARKS, Record, Subtask
from iaif.training.data import DataError

logger = logging.getLogger(__name__)

TargetBenchmark = Literal["mmlu", "bbh", "tydiqa", "gsm8k", "arc_challenge", "hellaswag", "piqa", "squad",
                          "commonsenseqa", "aqua", "humaneval"]
SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class _Pick:
    """Which records of each subtask become targets."""

    count: int | None
    """Keep the first N of them (None: all)."""
    keep_indent: bool = False
    """Keep the answer's leading indentation (code: a function body); only blank lines are trimmed."""


_PICKS: dict[str, _Pick] = {
    "mmlu": _Pick(count=None),
    "bbh": _Pick(count=None),
    "tydiqa": _Pick(count=None),
    "arc_challenge": _Pick(count=None),
    "hellaswag": _Pick(count=None),
    "piqa": _Pick(count=None),
    "squad": _Pick(count=None),
    "commonsenseqa": _Pick(count=25),
    "aqua": _Pick(count=25),
    "humaneval": _Pick(count=None, keep_indent=True),
}
OFFLINE_DEFAULT: list[TargetBenchmark] = ["mmlu", "bbh", "tydiqa", "gsm8k", "arc_challenge", "hellaswag", "piqa", "squad",
                                          "commonsenseqa", "aqua"]
"""Every benchmark read from the data folder (humaneval needs the extra, so it is asked for by name)."""


@dataclass
class TargetsConfig:
    """Write the LESS-style selection target sets (every offline benchmark; HumanEval with its extra) as chat JSONL."""

    output_dir: str = "runs/targets"
    """Folder for ``<benchmark>.jsonl``, ``config.yaml`` and ``run_info.json``."""
    data_dir: str | None = None
    """Benchmark data folder (None: ``$IAIF_SHARED_DATA``, else ``../shared/data`` beside the repository)."""
    benchmarks: list[TargetBenchmark] = field(default_factory=lambda: list(OFFLINE_DEFAULT))
    """Benchmarks to write a target file for (default: all but humaneval, which needs the humaneval extra)."""
    gsm8k_examples: int = 8
    """GSM8K: how many train questions (the first N, with their full solution) become targets."""


def _picks(cfg: TargetsConfig) -> dict[str, _Pick]:
    if cfg.gsm8k_examples < 1:
        raise ValueError(f"gsm8k_examples must be at least 1, got {cfg.gsm8k_examples}")
    return {**_PICKS, "gsm8k": _Pick(count=cfg.gsm8k_examples)}


class _Formatter:
    """Renders a record to (user, assistant) text with a benchmark's evaluation template."""

    def __init__(self, template: str):
        with open(TEMPLATES / template, encoding="utf-8") as fh:
            spec = yaml.safe_load(fh)
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._text = env.from_string(spec["doc_to_text"])
        target = spec["doc_to_target"]
        self._choices = self._choice_reader(env, spec)
        self._target = env.from_string(target if "{{" in target else "{{" + target + "}}")

    @staticmethod
    def _choice_reader(env: jinja2.Environment, spec: dict[str, Any]) -> Callable[[Record], list[str]] | None:
        """Multiple choice: the record's choices, fixed labels (MMLU's letters) or a record field ("{{choices}}")."""
        if spec.get("output_type") != "multiple_choice":
            return None
        choices = spec["doc_to_choice"]
        if isinstance(choices, str):
            expression = env.compile_expression(choices.strip("{} "))

            def from_record(record: Record) -> list[str]:
                value = expression(**record)
                if value is None:
                    raise DataError(str(record)[:80], None, "choices", "missing")
                return [str(v) for v in value]

            return from_record
        return lambda record: list(choices)

    def __call__(self, record: Record, description: str, keep_indent: bool = False) -> tuple[str, str]:
        user = (description + self._text.render(**record)).strip()
        target = self._target.render(**record)
        if self._choices is not None:  # multiple choice: the target is an index into the choices
            target = self._choices(record)[int(target)]
        return user, (target.strip("\n").rstrip() if keep_indent else target.strip())


def _benchmark_targets(name: str, subtasks: list[Subtask], pick: _Pick) -> list[dict[str, Any]]:
    """Target records ``{id, task, benchmark, messages}`` of one benchmark's subtasks, in reading order.

    The id ``<benchmark>/<task>/<k>`` names the k-th (0-based) picked record of the subtask."""
    fmt = _Formatter(BENCHMARKS[name].template)
    out = []
    for sub in subtasks:
        task = sub.name or name
        if not sub.fewshot:
            raise DataError(f"{name}/{task}", None, "fewshot", "no few-shot records to take targets from")
        chosen = sub.fewshot if pick.count is None else sub.fewshot[: pick.count]
        for k, rec in enumerate(chosen):
            user, answer = fmt(rec, sub.extra.get("description", ""), pick.keep_indent)
            out.append({"id": f"{name}/{task}/{k}", "task": task, "benchmark": name,
                        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


def run_make_targets(cfg: TargetsConfig) -> Path:
    """Read the benchmark data, write ``<benchmark>.jsonl`` per requested benchmark; return the folder.

    Every file is built in memory before any is written, so bad data leaves nothing half-written."""
    data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if not data.is_dir():
        raise DataError(str(data), None, None,
                        "benchmark data folder not found (set data_dir or $IAIF_SHARED_DATA)")
    if not cfg.benchmarks:
        raise ValueError("benchmarks is empty; name at least one of " + ", ".join(_picks(cfg)))
    picks = _picks(cfg)
    unknown = sorted(set(cfg.benchmarks) - set(picks))
    if unknown:
        raise ValueError(f"unknown target benchmark(s) {unknown}; known: {sorted(picks)}")
    built = {}
    for name in dict.fromkeys(cfg.benchmarks):
        subtasks = BENCHMARKS[name].reader(data)
        if not subtasks:
            raise DataError(str(data), None, None, f"no {name} data found in the benchmark data folder")
        built[name] = _benchmark_targets(name, subtasks, picks[name])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, records in built.items():
        write_jsonl(out / f"{name}.jsonl", records)
        sizes[name] = {"examples": len(records), "tasks": len({r["task"] for r in records}), "file": f"{name}.jsonl"}
        logger.info("targets %-13s %4d examples over %2d task(s) -> %s", name, len(records), sizes[name]["tasks"],
                    out / f"{name}.jsonl")
    write_json(out / SIZES_FILE, sizes, indent=2)
    write_run_info(out, cfg, "make-targets")
    return out
