"""Generated demo data: deterministic for a seed, the promised layout and structure."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from iaif.demo.demo_data import TARGET_FAMILIES, DemoDataConfig, generate, make_demo_data, make_tables, pretraining_corpus
from iaif.training.data import load_examples

SMALL = dict(per_target_family=60, per_other_family=20, num_filler=30, clusters_per_target=3, cluster_size=5,
             wrong_fraction=0.2, validation_size=8, test_size=20)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(DemoDataConfig(output_dir=str(tmp_path_factory.mktemp("demo") / "data"), **SMALL))


def test_layout_and_sizes(demo: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text())
    pool = read_jsonl(demo / "pool.jsonl")
    expected_size = 3 * (60 + 3 * 5) + 5 * 20 + 30
    assert len(pool) == manifest["pool_size"] == expected_size
    assert manifest["target_tasks"] == list(TARGET_FAMILIES)
    assert Counter(r["task"] for r in pool) == manifest["families"]
    for task in TARGET_FAMILIES:
        assert manifest["families"][task] == 60 + 15
        for split, size in (("validation", 8), ("test", 20)):
            records = read_jsonl(demo / "targets" / task / f"{split}.jsonl")
            assert len(records) == size == manifest["splits"][task][split]
            assert all(r["task"] == task and not r["meta"]["wrong"] for r in records)
    for name in ("config.yaml", "run_info.json"):
        assert (demo / name).is_file()
    assert not list(demo.parent.glob("*.partial"))


def test_records_shape_and_loadable(demo: Path) -> None:
    files = [demo / "pool.jsonl", *sorted((demo / "targets").glob("*/*.jsonl"))]
    for path in files:
        records = read_jsonl(path)
        for r in records:
            assert set(r) == {"id", "task", "messages", "answer", "meta"}
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert r["messages"][1]["content"] == r["answer"] != ""
            assert set(r["meta"]) == {"family", "cluster", "wrong", "correct_answer"}
        examples = load_examples(str(path))  # the data layer reads every file, ids kept
        assert [e.id for e in examples] == [r["id"] for r in records]
        assert len(set(r["id"] for r in records)) == len(records)


def test_answers_are_right_or_marked_wrong(demo: Path) -> None:
    """Recompute every target-family answer from its question and the seed's tables."""
    capitals = make_tables(0).capitals
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["capitals"] == capitals
    records = read_jsonl(demo / "pool.jsonl") + [r for t in TARGET_FAMILIES for s in ("validation", "test")
                                                for r in read_jsonl(demo / "targets" / t / f"{s}.jsonl")]
    checked = Counter()
    for r in records:
        family, q = r["meta"]["family"], r["messages"][0]["content"]
        numbers = [int(tok) for tok in q.replace("?", " ").replace(".", " ").replace(",", " ").split() if tok.isdigit()]
        if family == "capital":
            (country,) = [c for c in capitals if c.lower() in q.lower()]
            truth = capitals[country]
        elif family == "larger":
            truth = str(max(numbers))
        elif family == "add":
            truth = str(sum(numbers))
        else:
            continue
        assert r["meta"]["correct_answer"] == truth, r
        assert (r["answer"] != truth) == r["meta"]["wrong"], r
        checked[r["meta"]["wrong"]] += 1
    assert checked[True] == len(manifest["wrong_ids"]) == 3 * round(0.2 * 60)


def test_clusters_are_near_duplicates_of_validation(demo: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text())
    pool = {r["id"]: r for r in read_jsonl(demo / "pool.jsonl")}
    assert len(manifest["clusters"]) == 3 * 3
    for name, ids in manifest["clusters"].items():
        task = name.split("-c")[0]
        members = [pool[i] for i in ids]
        assert len(members) == 5
        assert all(m["meta"]["cluster"] == name and m["task"] == task and not m["meta"]["wrong"] for m in members)
        assert len({m["answer"] for m in members}) == 1
        assert len({m["messages"][0]["content"] for m in members}) == 5  # paraphrases, not copies
        validation = read_jsonl(demo / "targets" / task / "validation.jsonl")
        # each cluster repeats one validation question's fact
        assert any(v["answer"] == members[0]["answer"]
                   and v["messages"][0]["content"].lower().rstrip("?. ") in members[0]["messages"][0]["content"].lower()
                   for v in validation)
    validation_questions = {r["messages"][0]["content"] for t in TARGET_FAMILIES
                            for r in read_jsonl(demo / "targets" / t / "validation.jsonl")}
    assert not validation_questions & {r["messages"][0]["content"] for r in pool.values()}


def test_deterministic_for_a_seed(tmp_path: Path, demo: Path) -> None:
    again = make_demo_data(DemoDataConfig(output_dir=str(tmp_path / "again"), **SMALL))
    for rel in ["pool.jsonl", "manifest.json", *(f"targets/{t}/{s}.jsonl" for t in TARGET_FAMILIES for s in ("validation", "test"))]:
        assert (again / rel).read_bytes() == (demo / rel).read_bytes(), rel
    other_pool, _, _ = generate(DemoDataConfig(seed=1, **SMALL))
    assert [r["messages"] for r in other_pool] != read_jsonl(demo / "pool.jsonl")


def test_target_subset_and_bad_settings(tmp_path: Path) -> None:
    pool, targets, manifest = generate(DemoDataConfig(target_tasks=["capital"], **SMALL))
    assert list(targets) == ["capital"] and manifest["target_tasks"] == ["capital"]
    assert {r["meta"]["cluster"].split("-c")[0] for r in pool if r["meta"]["cluster"]} == {"capital"}
    with pytest.raises(ValueError, match="target_tasks"):
        generate(DemoDataConfig(target_tasks=["filler"]))
    with pytest.raises(ValueError, match="wrong_fraction"):
        generate(DemoDataConfig(wrong_fraction=1.0))
    with pytest.raises(ValueError, match="cluster_size"):
        generate(DemoDataConfig(cluster_size=24))
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo-data folder"):
        make_demo_data(DemoDataConfig(output_dir=str(tmp_path), **SMALL))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_default_pool_size() -> None:
    pool, targets, _ = generate(DemoDataConfig())
    assert 1500 <= len(pool) <= 2000
    assert all(len(t["validation"]) <= 16 and len(t["test"]) >= 100 for t in targets.values())
    validation_questions = {r["messages"][0]["content"] for t in targets.values() for r in t["validation"]}
    assert not validation_questions & {r["messages"][0]["content"] for r in pool}


def test_pretraining_corpus_has_no_target_tasks() -> None:
    docs = pretraining_corpus(seed=0, num_documents=200)
    assert docs == pretraining_corpus(seed=0, num_documents=200)
    assert all(d.startswith("<|user|>\n") and d.endswith("</s>") for d in docs)
    text = "\n".join(docs)
    for marker in ("capital", "larger", "bigger", "greater", "plus", " + "):
        assert marker not in text
    for question in ("Which is smaller", "minus", "last word", "What color", "How many words"):
        assert question in text  # the non-target families are there


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "iaif", "make-demo-data", "--help"],
                         capture_output=True, text=True, check=True).stdout.replace("-", "_")
    for flag in ("__seed", "__per_target_family", "__wrong_fraction", "__output_dir"):
        assert flag in out
