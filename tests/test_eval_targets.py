"""`iaif make-targets`: LESS-style selection targets from the shared benchmark data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from iaif.evaluation.targets import TargetsConfig, run_make_targets
from iaif.training.data import DataError, load_examples

ALL = ["mmlu", "bbh", "tydiqa", "gsm8k", "arc_challenge", "hellaswag", "piqa", "squad", "commonsenseqa", "aqua"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def targets(shared_data, tmp_path_factory) -> Path:
    return run_make_targets(TargetsConfig(output_dir=str(tmp_path_factory.mktemp("targets")),
                                          data_dir=str(shared_data), benchmarks=ALL, gsm8k_examples=4))


def test_counts_and_tasks(targets):
    expected = {"mmlu": (285, 57, 5), "bbh": (81, 27, 3), "tydiqa": (9, 9, 1), "gsm8k": (4, 1, 4),
                "arc_challenge": (24, 1, 24), "hellaswag": (26, 1, 26), "piqa": (25, 1, 25), "squad": (12, 1, 12),
                "commonsenseqa": (25, 1, 25), "aqua": (25, 1, 25)}
    sizes = json.loads((targets / "sizes.json").read_text())
    assert sizes == {name: {"examples": n, "tasks": t, "file": f"{name}.jsonl"} for name, (n, t, _) in expected.items()}
    for name, (n, tasks, per_task) in expected.items():
        recs = _records(targets / f"{name}.jsonl")
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
            assert r["benchmark"] == name
        assert (len(recs), len(counts), set(counts.values())) == (n, tasks, {per_task})
    assert (targets / "run_info.json").is_file() and (targets / "config.yaml").is_file()


def test_every_file_loads_as_chat_examples(targets):
    for name in ALL:
        examples = load_examples(str(targets / f"{name}.jsonl"))
        recs = _records(targets / f"{name}.jsonl")
        assert [e.id for e in examples] == [r["id"] for r in recs]
        assert [e.task for e in examples] == [r["task"] for r in recs]
        assert all([m.role for m in e.messages] == ["user", "assistant"] for e in examples)


def test_mmlu_record_matches_the_csv_row(targets, shared_data):
    with open(shared_data / "mmlu" / "dev" / "college_physics_dev.csv", encoding="utf-8", newline="") as fh:
        row = list(csv.reader(fh))[1 + 2]  # header, then the third dev question
    rec = next(r for r in _records(targets / "mmlu.jsonl") if r["id"] == "mmlu/college_physics/2")
    user, answer = (m["content"] for m in rec["messages"])
    assert rec["task"] == "college_physics"
    assert user == ("The following are multiple choice questions (with answers) about college physics.\n\n"
                    f"{row[0].strip()}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:")
    assert answer == "ABCD"[int(row[5])]


def test_bbh_record_matches_the_cot_prompt(targets, shared_data):
    text = (shared_data / "bbh" / "cot-prompts" / "date_understanding.txt").read_text(encoding="utf-8")
    blocks = text.split("\n\n")  # canary + instruction, then "Q: ...\nA: Let's think step by step. ..." blocks
    second = [b for b in blocks if b.startswith("Q: ")][1]
    question, cot = second.split("\nA: Let's think step by step.", 1)
    rec = next(r for r in _records(targets / "bbh.jsonl") if r["id"] == "bbh/date_understanding/1")
    user, answer = (m["content"] for m in rec["messages"])
    assert user == f"Infer the date from context.\n\n{question}\nA: Let's think step by step."
    assert answer == cot.strip() and answer.endswith(".") and "So the answer is" in answer


def test_tydiqa_record_is_the_first_dev_question(targets, shared_data):
    with open(shared_data / "tydiqa_goldp" / "dev" / "swahili_tydiqa_dev.json", encoding="utf-8") as fh:
        para = json.load(fh)["data"][0]["paragraphs"][0]
    qa = para["qas"][0]
    rec = next(r for r in _records(targets / "tydiqa.jsonl") if r["task"] == "sw")
    user, answer = (m["content"] for m in rec["messages"])
    assert rec["id"] == "tydiqa/sw/0"
    assert user == f"Context: {para['context']}\n\nQuestion: {qa['question']}\n\nAnswer:".strip()
    assert answer == qa["answers"][0]["text"].strip()


def test_gsm8k_record_keeps_the_full_solution(targets, shared_data):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    src = json.loads(lines[3])
    rec = _records(targets / "gsm8k.jsonl")[3]
    assert rec["messages"][0]["content"] == f"Question: {src['question']}\nAnswer:"
    assert rec["messages"][1]["content"] == src["answer"].strip() and "####" in src["answer"]


def test_arc_record_is_every_50th_question_with_the_gold_choice(targets, shared_data):
    lines = (shared_data / "arc" / "arc_challenge.jsonl").read_text(encoding="utf-8").splitlines()
    recs = _records(targets / "arc_challenge.jsonl")
    for k in (0, 1, 23):
        src = json.loads(lines[50 * k])
        user, answer = (m["content"] for m in recs[k]["messages"])
        assert (user, answer) == (f"{src['query']}\nAnswer:", src["choices"][src["gold"]])


def test_hellaswag_and_piqa_records_are_the_held_out_items(targets, shared_data):
    lines = (shared_data / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    ctx, label, *endings = lines[6 * 400 * 2 : 6 * 400 * 2 + 6]  # item 800: the third held-out one
    user, answer = (m["content"] for m in _records(targets / "hellaswag.jsonl")[2]["messages"])
    assert user.split()[-1] == ctx.split()[-1] and answer == endings[int(label)].strip()
    goals = (shared_data / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    src = json.loads(goals[75 * 4])
    user, answer = (m["content"] for m in _records(targets / "piqa.jsonl")[4]["messages"])
    assert (user, answer) == (f"Question: {src['goal']}\nAnswer:", src[f"sol{int(labels[75 * 4]) + 1}"])


def test_squad_record_is_the_first_question_of_every_20th_passage(targets, shared_data):
    data = json.loads((shared_data / "squad_v1.1_dev_subset_xquad_en" / "xquad.en.json").read_text(encoding="utf-8"))["data"]
    paragraphs = [p for a in data for p in a["paragraphs"]]
    recs = _records(targets / "squad.jsonl")
    for k, rec in enumerate(recs):
        para = paragraphs[20 * k]
        user, answer = (m["content"] for m in rec["messages"])
        assert user == f"Context: {para['context']}\n\nQuestion: {para['qas'][0]['question']}\n\nAnswer:".strip()
        assert answer == para["qas"][0]["answers"][0]["text"].strip()


def test_commonsenseqa_from_train_and_aqua_from_dev(targets, shared_data):
    train = json.loads((shared_data / "commonsenseqa" / "train_rand_split.jsonl").read_text().splitlines()[7])
    user, answer = (m["content"] for m in _records(targets / "commonsenseqa.jsonl")[7]["messages"])
    gold = next(c["text"] for c in train["question"]["choices"] if c["label"] == train["answerKey"])
    assert (user, answer) == (f"Question: {train['question']['stem']}\nAnswer:", gold)
    dev = json.loads((shared_data / "aqua_rat" / "dev.json").read_text().splitlines()[3])
    user, answer = (m["content"] for m in _records(targets / "aqua.jsonl")[3]["messages"])
    assert user.startswith(f"Question: {dev['question']}\nAnswer Choices: (A) ") and answer == dev["correct"]
    test_questions = {json.loads(x)["question"] for x in (shared_data / "aqua_rat" / "test.json").read_text().splitlines()}
    assert not any(r["messages"][0]["content"].split("\nAnswer Choices")[0][len("Question: "):] in test_questions
                   for r in _records(targets / "aqua.jsonl"))


def test_ids_and_content_are_stable_across_runs(targets, shared_data, tmp_path):
    again = run_make_targets(TargetsConfig(output_dir=str(tmp_path), data_dir=str(shared_data),
                                           benchmarks=ALL, gsm8k_examples=4))
    for name in ALL:
        assert (again / f"{name}.jsonl").read_bytes() == (targets / f"{name}.jsonl").read_bytes()
    ids = [r["id"] for name in ALL for r in _records(targets / f"{name}.jsonl")]
    assert len(ids) == len(set(ids))


def test_bad_data_folder_names_it_and_writes_nothing(tmp_path):
    missing, out = tmp_path / "no_such_data", tmp_path / "out"
    with pytest.raises(DataError, match="no_such_data"):
        run_make_targets(TargetsConfig(output_dir=str(out), data_dir=str(missing)))
    partial = tmp_path / "partial"
    (partial / "mmlu").mkdir(parents=True)  # an MMLU folder without subjects, no BBH / TyDiQA data
    with pytest.raises(DataError, match=r"partial: no mmlu data found"):
        run_make_targets(TargetsConfig(output_dir=str(out), data_dir=str(partial)))
    with pytest.raises(DataError, match=r"partial/tydiqa_goldp/dev: not found"):
        run_make_targets(TargetsConfig(output_dir=str(out), data_dir=str(partial), benchmarks=["tydiqa", "bbh"]))
    assert not out.exists()
