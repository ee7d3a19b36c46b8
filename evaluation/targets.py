"""Selection targets (the LESS validation sets) from the local benchmark data.

Writes one chat JSONL per benchmark, ``{id, task, benchmark, messages: [user, assistant]}``, that
``iaif select --targets`` and ``iaif run`` (``targets: {task: path}``) read:

- ``mmlu.jsonl``: the 5 dev questions of each subject (285), ``task`` = subject;
- ``bbh.jsonl``: the 3 chain-of-thought exemplars of each task (81), ``task`` = BBH task;
- ``tydiqa.jsonl``: the first dev question of each language (9), ``task`` = language code;
- ``gsm8k.jsonl`` (optional): the first N train questions with their full solution;
- ``humaneval.jsonl`` (optional, needs the humaneval extra): the 9 held-out problems (never scored by
  the humaneval task), the signature and docstring as the user turn, the reference body as the answer.

The records come from the readers of :mod:`iaif.evaluation.tasks.sources` and are formatted with the
same task templates the evaluation uses: the user turn is the task description followed by the
template's ``doc_to_text``, the assistant turn its ``doc_to_target`` (the answer letter for MMLU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml

from iaif.common.atomic import write_jsonl
from iaif.common.provenance import write_run_info
from iaif.evaluation.tasks.build import TEMPLATES, default_data_dir
from iaif.evaluation.tasks.sources import BENCHMARKS, Record, Subtask
from iaif.training.data import DataError

logger = logging.getLogger(__name__)

TargetBenchmark = Literal["mmlu", "bbh", "tydiqa", "gsm8k", "humaneval"]


@dataclass(frozen=True)
class _Pick:
    """Which records of each subtask become targets."""

    few_shot: bool
    """True: the subtask's few-shot records (MMLU dev, BBH CoT prompts, GSM8K train); False: its scored records."""
    count: int | None
    """Keep the first N of them (None: all)."""
    keep_indent: bool = False
    """Keep the answer's leading indentation (code: a function body); only blank lines are trimmed."""


_PICKS: dict[str, _Pick] = {
    "mmlu": _Pick(few_shot=True, count=None),
    "bbh": _Pick(few_shot=True, count=None),
    "tydiqa": _Pick(few_shot=False, count=1),
    "humaneval": _Pick(few_shot=True, count=None, keep_indent=True),
}


@dataclass
class TargetsConfig:
    """Write the LESS-style selection target sets (MMLU, BBH, TyDiQA; optionally GSM8K, HumanEval) as chat JSONL."""

    output_dir: str = "runs/targets"
    """Folder for ``<benchmark>.jsonl``, ``config.yaml`` and ``run_info.json``."""
    data_dir: str | None = None
    """Benchmark data folder (None: ``$IAIF_SHARED_DATA``, else ``../shared/data`` beside the repository)."""
    benchmarks: list[TargetBenchmark] = field(default_factory=lambda: ["mmlu", "bbh", "tydiqa"])
    """Benchmarks to write a target file for."""
    gsm8k_examples: int = 8
    """GSM8K: how many train questions (the first N, with their full solution) become targets."""


def _picks(cfg: TargetsConfig) -> dict[str, _Pick]:
    if cfg.gsm8k_examples < 1:
        raise ValueError(f"gsm8k_examples must be at least 1, got {cfg.gsm8k_examples}")
    return {**_PICKS, "gsm8k": _Pick(few_shot=True, count=cfg.gsm8k_examples)}


class _Formatter:
    """Renders a record to (user, assistant) text with a benchmark's evaluation template."""

    def __init__(self, template: str):
        with open(TEMPLATES / template, encoding="utf-8") as fh:
            spec = yaml.safe_load(fh)
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._text = env.from_string(spec["doc_to_text"])
        target = spec["doc_to_target"]
        self._choices = spec.get("doc_to_choice") if spec.get("output_type") == "multiple_choice" else None
        self._target = env.from_string(target if "{{" in target else "{{" + target + "}}")

    def __call__(self, record: Record, description: str, keep_indent: bool = False) -> tuple[str, str]:
        user = (description + self._text.render(**record)).strip()
        target = self._target.render(**record)
        if self._choices is not None:  # multiple choice: the target is an index into the choice labels
            target = self._choices[int(target)]
        return user, (target.strip("\n").rstrip() if keep_indent else target.strip())


def _benchmark_targets(name: str, subtasks: list[Subtask], pick: _Pick) -> list[dict[str, Any]]:
    """Target records ``{id, task, benchmark, messages}`` of one benchmark's subtasks, in reading order.

    The id ``<benchmark>/<task>/<k>`` names the k-th (0-based) picked record of the subtask."""
    fmt = _Formatter(BENCHMARKS[name].template)
    out = []
    for sub in subtasks:
        task = sub.name or name
        source = sub.fewshot if pick.few_shot else sub.records
        if not source:
            raise DataError(f"{name}/{task}", None, "fewshot" if pick.few_shot else "records", "no records to take targets from")
        chosen = source if pick.count is None else source[: pick.count]
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
    for name, records in built.items():
        write_jsonl(out / f"{name}.jsonl", records)
        logger.info("targets %s: %d examples over %d tasks -> %s", name, len(records),
                    len({r["task"] for r in records}), out / f"{name}.jsonl")
    write_run_info(out, cfg, "make-targets")
    return out
