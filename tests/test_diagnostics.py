"""Selection diagnostics against hand counts on small hand-made ``selected.jsonl`` files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iaif.evaluation.diagnostics import selection_diagnostics
from iaif.training.data import DataError


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _demo_record(rid: str, task: str, q: str, a: str, cluster: str | None = None, wrong: bool = False) -> dict:
    return {"id": rid, "task": task, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "answer": a, "meta": {"family": task, "cluster": cluster, "wrong": wrong, "correct_answer": a},
            "_iaif": {"rank": 0, "id": rid, "task": task}}


def test_demo_selection_counts_by_hand(tmp_path: Path) -> None:
    records = [
        _demo_record("a", "capital", "What is the capital of Kalo?", "Zeta"),
        _demo_record("b", "capital", "What is the capital of  Kalo?", "Mivo", wrong=True),   # same prompt as a (spaces)
        _demo_record("c", "capital", "What is the capital of Kalo?", "Zeta"),                # same prompt again
        _demo_record("d", "capital", "Question: What is the capital of Ru?", "Pe", cluster="capital-c00"),
        _demo_record("e", "capital", "What is the capital of Ru? Thanks!", "Pe", cluster="capital-c00"),
        _demo_record("f", "add", "What is 2 plus 2?", "5", wrong=True),
        _demo_record("g", "add", "Add 1 and 1.", "2", cluster="add-c01"),
        _demo_record("h", "filler", "Describe a rainy day briefly.", "It rains."),
    ]
    d = selection_diagnostics(_write(tmp_path / "selected.jsonl", records))
    assert d.k == 8
    assert d.distinct_prompts == 6 and d.max_prompt_repeats == 3  # {a, b, c} share one prompt
    assert d.per_task == {"add": 2, "capital": 5, "filler": 1}
    assert d.wrong_share == pytest.approx(2 / 8)
    assert (d.cluster_picks, d.clusters) == (3, 2)
    assert selection_diagnostics(tmp_path).to_dict() == d.to_dict()  # the selection folder works too


def test_pool_without_meta_gets_prompt_and_task_counts_only(tmp_path: Path) -> None:
    records = [{"instruction": "Say hi.", "output": "hi", "_iaif": {"task": "alpaca"}},
               {"instruction": "Say hi.", "output": "hello", "_iaif": {"task": "alpaca"}},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                             {"role": "assistant", "content": "hi"}], "_iaif": {"task": "chat"},
                "meta": {"wrong": False}}]
    d = selection_diagnostics(_write(tmp_path / "selected.jsonl", records))
    assert (d.k, d.distinct_prompts, d.max_prompt_repeats) == (3, 2, 2)  # the system turn makes the third differ
    assert d.per_task == {"alpaca": 2, "chat": 1}
    assert (d.wrong_share, d.cluster_picks, d.clusters) == (None, None, None)


def test_record_without_selection_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "selected.jsonl", [_demo_record("a", "add", "Add 1 and 1.", "2"),
                                                {"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"selected\.jsonl.*2.*_iaif\.task"):
        selection_diagnostics(path)
