"""Bad input gives a clear error naming file, line and field; truncated-away answers and
duplicate ids are reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from iaif.training.data import DataConfig, DataError, load_examples, tokenize_examples

GOOD = {"prompt": "Say hi", "completion": "hi"}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "bad_line, field, problem",
    [
        ('{"prompt": "x", "completion": ', None, "malformed JSON"),
        ('["not", "an", "object"]', None, "expected a JSON object"),
        ('{"instruction": "Do it."}', "output", "missing"),
        ('{"completion": "x"}', "prompt", "missing"),
        ('{"question": "Why?"}', "answer", "missing"),
        ('{"prompt": "x", "completion": "   "}', "completion", "is empty"),
        ('{"instruction": "x", "input": "", "output": ""}', "output", "is empty"),
        ('{"question": "x", "answer": 3}', "answer", "expected a string"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
         "messages[1].content", "assistant answer is empty"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "unknown role"),
        ('{"messages": [{"role": "user"}]}', "messages[0]", "needs 'role' and 'content'"),
        ('{"text": "free text", "label": 1}', None, "unknown record shape"),
    ],
)
def test_bad_record_names_file_line_field(tmp_path: Path, bad_line: str, field: str | None, problem: str) -> None:
    path = write_lines(tmp_path / "pool.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    err = info.value
    assert (err.source, err.line, err.field_name) == (path, 3, field)
    assert str(err).startswith(f"{path}:3:")
    assert problem in str(err)
    if field:
        assert f"field '{field}'" in str(err)


def test_bad_tsv_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "cot.tsv", ["Q?\tyes\tbecause", "only\ttwo", ])
    with pytest.raises(DataError, match=r"cot\.tsv:2: .*3 tab-separated columns"):
        load_examples(path)
    path = write_lines(tmp_path / "cot2.tsv", ["Q?\t\tbecause"])
    with pytest.raises(DataError, match=r"cot2\.tsv:1: field 'answer' is empty"):
        load_examples(path)


def test_bad_json_file_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": ]', encoding="utf-8")
    with pytest.raises(DataError, match=r"pool\.json:2: malformed JSON"):
        load_examples(str(path))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"no such file"):
        load_examples("no_such_pool.jsonl")  # a relative file name, not a Hub id
    with pytest.raises(DataError, match="field 'path'"):
        load_examples(DataConfig())


def test_answer_truncated_to_zero_tokens_is_excluded_and_reported(tiny_model_dir: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = {"id": "long", "prompt": " ".join(["word"] * 200), "completion": "yes"}
    path = write_lines(tmp_path / "pool.jsonl", [json.dumps(GOOD), json.dumps(long_prompt)])
    examples = load_examples(path)
    with caplog.at_level(logging.WARNING, logger="iaif.training.data"):
        kept, excluded = tokenize_examples(examples, tok, "tulu", max_length=32)
    assert [k.id for k in kept] == [examples[0].id]
    assert all(k.num_answer_tokens > 0 for k in kept)
    assert [(e.id, e.source, e.line) for e in excluded] == [("long", path, 2)]
    assert "max_length=32" in excluded[0].reason
    assert f"{path}:2: example 'long' excluded" in caplog.text


def test_duplicate_ids_are_reported_and_disambiguated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", "prompt": "other", "completion": "x"}, GOOD, GOOD]
    path = write_lines(tmp_path / "pool.jsonl", [json.dumps(r) for r in records])
    with caplog.at_level(logging.WARNING, logger="iaif.training.data"):
        examples = load_examples(path)
    ids = [e.id for e in examples]
    assert ids[:3] == ["a", "b", "a~2"]
    assert ids[4] == ids[3] + "~2"  # same content, no id field: same hash
    assert len(set(ids)) == len(ids)
    assert f"{path}:3: duplicate id 'a' (first at line 1)" in caplog.text
    assert f"{path}:5: duplicate id '{ids[3]}' (first at line 4)" in caplog.text
