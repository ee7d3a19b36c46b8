"""Offline lm-eval task builders: every local benchmark converts and loads in lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from iaif.evaluation.tasks import BENCHMARKS, build_tasks
from iaif.training.data import DataError


def _load(built):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(built.include_path), include_defaults=False)
    return tm.load([e.lm_eval_name for e in built.entries])


def _write_demo(root: Path, rows: list[dict]) -> Path:
    (root / "targets" / "add").mkdir(parents=True)
    with open(root / "targets" / "add" / "test.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return root / "targets"


def test_every_benchmark_builds_and_loads(shared_data, tmp_path):
    built = build_tasks(tmp_path, list(BENCHMARKS), data_dir=shared_data, max_subtasks=2)
    loaded = _load(built)
    assert {e.name for e in built.entries} == set(BENCHMARKS)
    shots = {e.name: e.num_fewshot for e in built.entries}
    assert shots["mmlu"] == 5 and shots["bbh"] == 3 and shots["tydiqa"] == 1
    mmlu = next(e for e in built.entries if e.name == "mmlu")
    assert mmlu.subtasks == ["iaif_mmlu_abstract_algebra", "iaif_mmlu_anatomy"]
    assert loaded  # lm-eval parsed every YAML and its data files


def test_converted_records_match_the_source_files(shared_data, tmp_path):
    built = build_tasks(tmp_path, ["mmlu", "piqa", "bbh"], data_dir=shared_data, max_subtasks=1)
    mmlu = [json.loads(x) for x in open(tmp_path / "iaif_mmlu" / "iaif_mmlu_abstract_algebra.test.jsonl")]
    assert len(mmlu) == 100
    first = (shared_data / "mmlu" / "test" / "abstract_algebra_test.csv").read_text().splitlines()[1]
    assert mmlu[0]["question"] in first and str(mmlu[0]["answer"]) == first.rsplit(",", 1)[1]
    shots = [json.loads(x) for x in open(tmp_path / "iaif_mmlu" / "iaif_mmlu_abstract_algebra.fewshot.jsonl")]
    assert len(shots) == 5
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    piqa = [json.loads(x) for x in open(tmp_path / "iaif_piqa" / "iaif_piqa.test.jsonl")]
    held = [json.loads(x) for x in open(tmp_path / "iaif_piqa" / "iaif_piqa.fewshot.jsonl")]
    assert [str(r["gold"]) for r in piqa] == [lab for i, lab in enumerate(labels) if i % 75]  # every 75th held out
    assert [str(r["gold"]) for r in held] == labels[::75] and len(held) == 25
    bbh = [json.loads(x) for x in open(tmp_path / "iaif_bbh" / "iaif_bbh_boolean_expressions.fewshot.jsonl")]
    assert len(bbh) == 3 and all("So the answer is" in r["target"] for r in bbh)
    assert built.entries[0].num_examples == 100


def test_demo_target_task_from_records(tmp_path):
    rows = [{"id": f"a{i}", "task": "add", "answer": str(i + 1),
             "messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(4)]
    built = build_tasks(tmp_path / "tasks", demo_targets=_write_demo(tmp_path, rows))
    entry, nll = built.entries
    assert (entry.name, entry.lm_eval_name, entry.metric) == ("demo/add", "iaif_demo_add", "exact_match,none")
    assert (nll.name, nll.lm_eval_name, nll.metric, nll.measure) == ("demo/add", "iaif_demo_add_nll", "answer_nll,none",
                                                                     "answer_nll")
    assert entry.higher_is_better and not nll.higher_is_better
    assert _load(built)
    expected = [{"id": r["id"], "prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in rows]
    for name in ("iaif_demo_add", "iaif_demo_add_nll"):  # both measures over the same questions
        written = [json.loads(x) for x in open(tmp_path / "tasks" / name / f"{name}.test.jsonl")]
        assert written == expected
    (only,) = build_tasks(tmp_path / "tasks2", demo_targets=tmp_path / "targets", answer_nll=False).entries
    assert only.lm_eval_name == "iaif_demo_add"


def test_bad_demo_record_names_file_line_field(tmp_path):
    rows = [{"id": "a", "task": "add", "answer": "1", "messages": [{"role": "user", "content": "q"}]},
            {"id": "b", "task": "add", "messages": [{"role": "user", "content": "q"}]}]
    with pytest.raises(DataError, match=r"test\.jsonl:2: field 'answer'"):
        build_tasks(tmp_path / "tasks", demo_targets=_write_demo(tmp_path, rows))


def test_unknown_benchmark_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="unknown local benchmark"):
        build_tasks(tmp_path, ["nope"])
    with pytest.raises(DataError, match="not found"):
        build_tasks(tmp_path, ["gsm8k"], data_dir=tmp_path / "absent")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x]


def test_few_shot_records_are_never_scored(shared_data, tmp_path):
    """Every benchmark's few-shot file (the source of the selection targets) shares no record, and for
    extractive QA no passage, with the file it scores; the YAML takes its examples from that file."""
    names = ["arc_challenge", "hellaswag", "piqa", "squad", "commonsenseqa", "aqua", "tydiqa", "gsm8k", "mmlu", "bbh"]
    built = build_tasks(tmp_path, names, data_dir=shared_data, max_subtasks=2)
    for entry in built.entries:
        for task in entry.subtasks or [entry.lm_eval_name]:
            folder = tmp_path / entry.lm_eval_name
            scored, shots = _rows(folder / f"{task}.test.jsonl"), _rows(folder / f"{task}.fewshot.jsonl")
            key = "context" if entry.name in ("squad", "tydiqa") else next(iter(scored[0]))
            assert shots and not {json.dumps(r[key]) for r in scored} & {json.dumps(r[key]) for r in shots}, task
            assert yaml.safe_load((folder / f"{task}.yaml").read_text().split("process_results")[0])["fewshot_split"] == "fewshot"


def test_held_out_sizes_match_hand_counts(shared_data, tmp_path):
    built = build_tasks(tmp_path, ["arc_challenge", "hellaswag", "piqa", "squad", "tydiqa"], data_dir=shared_data)
    sizes = {e.name: e.num_examples for e in built.entries}
    arc_lines = len((shared_data / "arc" / "arc_challenge.jsonl").read_text().splitlines())
    hellaswag_items = len((shared_data / "hellaswag" / "hellaswag_val_full.txt").read_text().splitlines()) // 6
    squad = json.loads((shared_data / "squad_v1.1_dev_subset_xquad_en" / "xquad.en.json").read_text())["data"]
    paragraphs = [len(p["qas"]) for a in squad for p in a["paragraphs"]]
    tydiqa = 0
    for f in (shared_data / "tydiqa_goldp" / "dev").glob("*.json"):  # every question but those on the first passage
        paras = [p for a in json.loads(f.read_text())["data"] for p in a["paragraphs"]]
        tydiqa += sum(len(p["qas"]) for p in paras if p["context"] != paras[0]["context"])
    assert sizes["arc_challenge"] == arc_lines - len(range(0, arc_lines, 50)) == 1172 - 24
    assert sizes["hellaswag"] == hellaswag_items - len(range(0, hellaswag_items, 400)) == 10042 - 26
    assert sizes["piqa"] == 1838 - 25
    assert sizes["squad"] == sum(n for i, n in enumerate(paragraphs) if i % 20)
    assert sizes["tydiqa"] == tydiqa
