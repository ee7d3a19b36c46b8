"""Example ids are stable across runs and record shapes; provenance is kept."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from iaif.training.data import DataConfig, load_examples

RECORDS = [
    {"prompt": "Say hi", "completion": "hi"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"id": 17, "question": "Why?", "answer": "Because."},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], "_iaif": {"rank": 1}},
]


def write(path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return str(path)


def test_ids_from_field_or_content_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.jsonl")
    examples = load_examples(path)
    # sha256 of the canonical [[role, content], ...] JSON, computed here by hand
    canon = '[["user","Say hi"],["assistant","hi"]]'
    content_hash = hashlib.sha256(canon.encode()).hexdigest()[:16]
    assert content_hash == "b246db1f56f950aa"  # pinned: must not change between versions
    # the same content in three shapes has the same id (disambiguated as duplicates)
    assert [e.id for e in examples] == [content_hash, content_hash + "~2", "17", content_hash + "~3"]
    assert [(e.source, e.line, e.task) for e in examples] == [(path, i, "pool") for i in (1, 2, 3, 4)]
    assert examples[2].record["id"] == 17


def test_ids_stable_across_processes(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.jsonl")
    code = f"from iaif.training.data import load_examples; print([e.id for e in load_examples({path!r})])"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert runs == {str([e.id for e in load_examples(path)]) + "\n"}


def test_task_and_max_examples(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"task": "greet", **RECORDS[0]}) + "\n" + json.dumps(RECORDS[2]) + "\n", encoding="utf-8")
    assert [e.task for e in load_examples(str(path))] == ["greet", "pool"]
    assert [e.task for e in load_examples(DataConfig(path=str(path), task="t"))] == ["t", "t"]
    assert len(load_examples(DataConfig(path=str(path), max_examples=1))) == 1


def test_other_containers_give_same_examples(tmp_path: Path) -> None:
    import datasets

    jsonl = load_examples(write(tmp_path / "pool.jsonl"))
    simple = RECORDS[:2]
    (tmp_path / "list.json").write_text(json.dumps({"data": simple}), encoding="utf-8")
    columns = sorted({k for r in simple for k in r})  # columnar: absent fields become None
    table = datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in simple])
    table.to_parquet(str(tmp_path / "pool.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    for source in ("list.json", "pool.parquet", "disk"):
        loaded = load_examples(str(tmp_path / source))
        assert [(e.id, e.messages, e.line) for e in loaded] == [(e.id, e.messages, e.line) for e in jsonl[:2]], source
