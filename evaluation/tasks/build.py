"""Write offline lm-eval tasks: JSONL files converted from local data plus task YAMLs that
``include`` the packaged templates and point ``dataset_kwargs.data_files`` at those files.

The output folder (never inside the repository) is then given to ``lm_eval.tasks.TaskManager``
as ``include_path``. Multi-part benchmarks (MMLU subjects, BBH tasks, TyDiQA languages) become an
lm-eval group whose score aggregates its subtasks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iaif.common.atomic import write_jsonl
from iaif.evaluation.tasks import alpaca_eval
from iaif.evaluation.tasks.code_exec import DEFAULT_TIMEOUT_S, with_timeout
from iaif.evaluation.tasks.likelihood import ANSWER_NLL, answer_nll_subtask
from iaif.evaluation.tasks.sources import BENCHMARKS, CODE_EXECUTION_TASKS, DEMO_METRIC, Subtask, read_demo_target

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEMO_NLL_TEMPLATE = "demo_target_nll.yaml"
PREFIX = "iaif_"


def default_data_dir() -> Path:
    """The shared evaluation data folder: ``$IAIF_SHARED_DATA``, else ``../shared/data`` beside the repo."""
    env = os.environ.get("IAIF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class TaskEntry:
    """One requested task as lm-eval sees it, with what the report needs to read its score."""

    name: str
    """Short name used in configs and reports (``mmlu``, ``demo/addition``, ...)."""
    lm_eval_name: str
    """Task or group name passed to lm-eval."""
    metric: str
    """Headline result key ``metric,filter``."""
    num_fewshot: int
    subtasks: list[str] = field(default_factory=list)
    """lm-eval names of the subtasks when the entry is a group."""
    num_examples: int = 0
    measure: str = "score"
    """What the entry measures: ``score`` (the task's headline metric) or ``answer_nll`` (demo tasks)."""
    higher_is_better: bool = True


@dataclass
class BuiltTasks:
    include_path: Path
    entries: list[TaskEntry]


def _write_task_yaml(folder: Path, task: str, template: str, sub: Subtask, num_fewshot: int | None) -> int:
    """Write the subtask's data and YAML; return the number of few-shot examples it uses."""
    folder.mkdir(parents=True, exist_ok=True)
    data_files = {"test": str(folder / f"{task}.test.jsonl")}
    write_jsonl(Path(data_files["test"]), sub.records)
    if sub.fewshot is not None:
        data_files["fewshot"] = str(folder / f"{task}.fewshot.jsonl")
        write_jsonl(Path(data_files["fewshot"]), sub.fewshot)
    config: dict[str, Any] = {
        "include": str(TEMPLATES / template),
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        **({"fewshot_split": "fewshot"} if sub.fewshot is not None else {}),  # never the scored split
        **sub.extra,
    }
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if sub.process_results:
        text += f"process_results: !function {sub.process_results}\n"
    (folder / f"{task}.yaml").write_text(text, encoding="utf-8")
    if "num_fewshot" in config:
        return int(config["num_fewshot"])
    with open(TEMPLATES / template, encoding="utf-8") as fh:
        return int(yaml.safe_load(fh).get("num_fewshot", 0))


def _write_group(folder: Path, group: str, tasks: list[str], metric: str, weight_by_size: bool) -> None:
    name, filt = metric.split(",")
    config = {
        "group": group,
        "task": tasks,
        "aggregate_metric_list": [{"metric": name, "filter_list": [filt], "weight_by_size": weight_by_size}],
        "metadata": {"version": 1.0},
    }
    (folder / f"{group}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _build_one(out: Path, name: str, lm_name: str, subtasks: list[Subtask], template: str, metric: str,
               weight_by_size: bool, num_fewshot: int | None) -> TaskEntry:
    folder = out / lm_name
    if len(subtasks) == 1 and not subtasks[0].name:
        shots = _write_task_yaml(folder, lm_name, template, subtasks[0], num_fewshot)
        return TaskEntry(name, lm_name, metric, shots, num_examples=len(subtasks[0].records))
    names = [f"{lm_name}_{s.name}" for s in subtasks]
    all_shots = {_write_task_yaml(folder, t, template, s, num_fewshot) for t, s in zip(names, subtasks)}
    _write_group(folder, lm_name, names, metric, weight_by_size)
    return TaskEntry(name, lm_name, metric, all_shots.pop(), names, sum(len(s.records) for s in subtasks))


def _build_hub_task(out: Path, name: str) -> TaskEntry:
    """A task whose data lm-eval reads from the Hub (AlpacaEval): the packaged template and its scorer."""
    lm_name = PREFIX + name
    (out / lm_name).mkdir(parents=True, exist_ok=True)
    config = yaml.safe_dump({"include": str(TEMPLATES / alpaca_eval.TEMPLATE), "task": lm_name}, sort_keys=False)
    config += f"process_results: !function {alpaca_eval.__name__}.process_results\n"
    (out / lm_name / f"{lm_name}.yaml").write_text(config, encoding="utf-8")
    return TaskEntry(name, lm_name, f"{alpaca_eval.METRIC},none", 0, measure=alpaca_eval.METRIC, higher_is_better=False)


def build_tasks(
    out_dir: str | Path,
    benchmarks: list[str] = (),  # type: ignore[assignment]
    data_dir: str | Path | None = None,
    demo_targets: str | Path | None = None,
    demo_tasks: list[str] | None = None,
    max_subtasks: int | None = None,
    num_fewshot: dict[str, int] | None = None,
    answer_nll: bool = True,
    code_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> BuiltTasks:
    """Convert local data and write lm-eval task YAMLs under ``out_dir``.

    ``benchmarks``: names from :data:`iaif.evaluation.tasks.sources.BENCHMARKS`, read from ``data_dir``
    (default :func:`default_data_dir`), and ``alpaca_eval`` (generation only, from the Hub; refused offline,
    see :mod:`iaif.evaluation.tasks.alpaca_eval`). ``demo_targets``: a ``targets/`` folder of the demo data;
    ``demo_tasks`` picks some of its tasks (default: all). ``max_subtasks`` keeps the first N
    subtasks of multi-part benchmarks (quick runs). ``num_fewshot`` overrides per short name.
    ``answer_nll``: each demo task also gets a zero-shot ``loglikelihood`` task over the same test
    questions (``iaif_demo_<task>_nll``, measure ``answer_nll``: mean -log P(gold answer | prompt)).
    ``code_timeout_s``: seconds each code-execution task's problem (HumanEval) may run its tests."""
    num_fewshot = num_fewshot or {}
    unknown = sorted(set(benchmarks) - set(BENCHMARKS) - {alpaca_eval.TASK})
    if unknown:
        raise ValueError(f"unknown local benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}, and {alpaca_eval.TASK} (needs network)")
    if alpaca_eval.TASK in benchmarks:
        alpaca_eval.require_hub()  # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    data = Path(data_dir) if data_dir else default_data_dir()
    for name in benchmarks:
        if name == alpaca_eval.TASK:
            entries.append(_build_hub_task(out, name))
            continue
        bench = BENCHMARKS[name]
        subtasks = bench.reader(data)
        if name in CODE_EXECUTION_TASKS:
            subtasks = [with_timeout(s, code_timeout_s) for s in subtasks]
        if max_subtasks is not None and len(subtasks) > 1:
            subtasks = subtasks[:max_subtasks]
        entries.append(_build_one(out, name, PREFIX + name, subtasks, bench.template, bench.metric,
                                  bench.weight_by_size, num_fewshot.get(name)))
        logger.info("task %s: %d subtask(s), %d examples", name, len(subtasks), entries[-1].num_examples)
    if demo_targets is not None:
        root = Path(demo_targets)
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not available:
            raise ValueError(f"{root}: no demo target task folders found")
        chosen = demo_tasks or available
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise ValueError(f"{root}: demo task(s) {missing} not found; have {available}")
        for task in chosen:
            short, records = f"demo/{task}", read_demo_target(root / task)
            entries.append(_build_one(out, short, f"{PREFIX}demo_{task}", records,
                                      "demo_target.yaml", DEMO_METRIC, True, num_fewshot.get(short)))
            if answer_nll:
                nll = _build_one(out, short, f"{PREFIX}demo_{task}_nll", [answer_nll_subtask(s) for s in records],
                                 DEMO_NLL_TEMPLATE, f"{ANSWER_NLL},none", True, None)
                entries.append(dataclasses.replace(nll, measure=ANSWER_NLL, higher_is_better=False))
    if not entries:
        raise ValueError("no tasks requested")
    return BuiltTasks(out, entries)
