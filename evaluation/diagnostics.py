"""What a selection picked, read from its ``selected.jsonl`` (the records as the pool had them plus
the ``_iaif`` field written by ``iaif select``).

For every selection: its size, the number of distinct prompts (the conversation before the final
answer, whitespace-normalised: the same question picked twice counts once) and how often the most
repeated prompt was picked, and the picks per task (``_iaif.task``). When every record carries a
``meta`` object as the demo pool's do (:mod:`iaif.demo.demo_data`): the share of picks whose
``meta.wrong`` is true (a wrong answer) and the number of picks that belong to a near-duplicate
cluster (``meta.cluster`` not null) with the number of distinct clusters they come from. A pool
without those ``meta`` keys gets ``None`` there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iaif.selection.select import META_FIELD, SELECTED_FILE
from iaif.training.data import DataError, read_jsonl, record_to_messages


@dataclass
class SelectionDiagnostics:
    """Counts over one selection's picks."""

    k: int
    distinct_prompts: int
    max_prompt_repeats: int
    per_task: dict[str, int]
    wrong_share: float | None
    """Share of picks with ``meta.wrong`` true (None: the records have no ``meta.wrong``)."""
    cluster_picks: int | None
    """Picks with a non-null ``meta.cluster`` (None: the records have no ``meta.cluster``)."""
    clusters: int | None
    """Distinct near-duplicate clusters among those picks."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt(rec: dict[str, Any], path: str, line: int) -> str:
    messages = record_to_messages(rec, path, line)
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
    return "\n".join(f"{m.role}: {' '.join(m.content.split())}" for m in messages[:last])


def _meta_values(records: list[dict[str, Any]], key: str) -> list[Any] | None:
    """``meta[key]`` of every record, or None when some record lacks it."""
    values = []
    for rec in records:
        meta = rec.get("meta")
        if not isinstance(meta, dict) or key not in meta:
            return None
        values.append(meta[key])
    return values


def selection_diagnostics(path: str | Path) -> SelectionDiagnostics:
    """Diagnostics of ``path`` (a ``selected.jsonl`` or the selection folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTED_FILE
    rows = list(read_jsonl(path))
    if not rows:
        raise DataError(str(path), None, None, "no selected records")
    prompts: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    for line, rec in rows:
        info = rec.get(META_FIELD)
        if not isinstance(info, dict) or "task" not in info:
            raise DataError(str(path), line, f"{META_FIELD}.task", "missing (not an `iaif select` output?)")
        tasks[str(info["task"])] += 1
        prompts[_prompt(rec, str(path), line)] += 1
    records = [rec for _, rec in rows]
    wrong = _meta_values(records, "wrong")
    cluster = _meta_values(records, "cluster")
    picked = None if cluster is None else [c for c in cluster if c is not None]
    return SelectionDiagnostics(
        k=len(rows),
        distinct_prompts=len(prompts),
        max_prompt_repeats=max(prompts.values()),
        per_task=dict(sorted(tasks.items())),
        wrong_share=None if wrong is None else sum(bool(w) for w in wrong) / len(wrong),
        cluster_picks=None if picked is None else len(picked),
        clusters=None if picked is None else len(set(picked)),
    )
