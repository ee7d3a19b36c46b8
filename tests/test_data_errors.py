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
    assert "'a' at lines 1, 3" in caplog.text and f"'{ids[3]}' at lines 4, 5" in caplog.text


def test_duplicate_ids_are_reported_once_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [{"id": f"x{i % 3}", "prompt": f"p{i}", "completion": "c"} for i in range(300)]
    path = write_lines(tmp_path / "pool.jsonl", [json.dumps(r) for r in records])
    with caplog.at_level(logging.WARNING, logger="iaif.training.data"):
        examples = load_examples(path)
    warnings = [r for r in caplog.records if "repeat" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(f"{path}: 3 id(s) repeat (300 record(s) in all), e.g. 'x0' at lines 1, 4, 7")
    assert len({e.id for e in examples}) == 300


def test_renamed_duplicate_never_takes_an_id_of_the_file(tmp_path: Path) -> None:
    records = [{"id": "a", **GOOD}, {"id": "a", **GOOD}, {"id": "a~2", **GOOD}, {"id": "a", **GOOD}]
    ids = [e.id for e in load_examples(write_lines(tmp_path / "pool.jsonl", [json.dumps(r) for r in records]))]
    assert len(set(ids)) == 4 and ids[:2] == ["a", "a~2"]


@pytest.mark.parametrize("name, lines", [
    ("pool.jsonl", [json.dumps(GOOD), '{"prompt": "caf\xff", "completion": "x"}']),
    ("pool.json", ["[" + json.dumps(GOOD) + ",", '{"prompt": "caf\xff", "completion": "x"}]']),
    ("cot.tsv", ["Q?\tyes\tbecause", "caf\xff\tno\tbecause"]),
])
def test_non_utf8_byte_names_file_and_line(tmp_path: Path, name: str, lines: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"{name}:2: not UTF-8 text \(byte 0xff at column \d+\)"):
        load_examples(str(path))


def test_malformed_json_message_reads_cleanly(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pool.jsonl", ['{"prompt": "unterminated'])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value) == f"{path}:1: malformed JSON: unterminated string starting at column 12"
    assert "at at" not in str(err.value)


@pytest.mark.parametrize("name", ["pool.csv", "data.txt", "./pool"])
def test_missing_local_path_with_unknown_suffix_is_not_taken_for_a_hub_id(tmp_path: Path, name: str, monkeypatch) -> None:
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the Hub"))
    with pytest.raises(DataError, match=f"^{name}: no such file or folder$"):
        load_examples(name)


def test_missing_path_that_could_be_a_hub_id_says_local_path_first(tmp_path: Path, monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'data/pool' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_examples("data/pool")
    assert str(err.value) == ("data/pool: no such local file or folder, and not a reachable Hub dataset id either "
                              "(ConnectionError: Couldn't reach 'data/pool' on the Hub (OfflineModeIsEnabled))")
