"""A real lm-eval run with the tiny model on local tasks (GSM8K, MMLU from the shared data, and a
demo target task), and the comparison report read back against lm-eval's own result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iaif.evaluation.lm_eval_runner import RESULTS_FILE, SCORES_FILE, EvalConfig, run_eval
from iaif.evaluation.report import EvalRun, aggregate, write_report


def _demo_targets(root: Path) -> Path:
    folder = root / "targets" / "add"
    folder.mkdir(parents=True)
    with open(folder / "test.jsonl", "w") as fh:
        for i in range(3):
            fh.write(json.dumps({"id": f"t{i}", "task": "add", "answer": str(i + 2), "messages": [
                {"role": "user", "content": f"Add {i} and 2."}, {"role": "assistant", "content": str(i + 2)}]}) + "\n")
    return root / "targets"


@pytest.fixture(scope="module")
def eval_dir(tiny_model_dir, shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(model=str(tiny_model_dir), output_dir=str(root / "run"), tasks=["gsm8k", "mmlu"],
                     data_dir=str(shared_data), demo_targets=str(_demo_targets(root)), max_subtasks=2, limit=2,
                     batch_size=4, dtype="float32", max_gen_toks=16)
    return run_eval(cfg)


def test_lm_eval_completes_on_real_local_tasks(eval_dir):
    results = json.loads((eval_dir / RESULTS_FILE).read_text())
    for task in ("iaif_gsm8k", "iaif_mmlu_abstract_algebra", "iaif_mmlu_anatomy", "iaif_demo_add"):
        assert results["n-samples"][task]["effective"] == 2
    assert results["n-shot"]["iaif_mmlu"] == 5 and results["n-shot"]["iaif_gsm8k"] == 8
    scores = json.loads((eval_dir / SCORES_FILE).read_text())
    assert scores["template"] == "tulu" and scores["apply_chat_template"] and "<|assistant|>" in scores["chat_template"]
    assert set(scores["tasks"]) == {"gsm8k", "mmlu", "demo/add"}
    assert (eval_dir / "config.yaml").is_file() and (eval_dir / "run_info.json").is_file()


def test_mmlu_group_score_is_the_mean_over_its_questions(eval_dir):
    rows = [json.loads(x) for t in ("abstract_algebra", "anatomy")
            for x in open(eval_dir / "samples" / f"iaif_mmlu_{t}.jsonl")]
    scores = json.loads((eval_dir / SCORES_FILE).read_text())
    assert scores["tasks"]["mmlu"]["score"] == pytest.approx(sum(r["acc"] for r in rows) / len(rows))


def test_demo_prompt_is_the_training_format(eval_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    from iaif.training.data import Example, Message, render

    row = json.loads(open(eval_dir / "samples" / "iaif_demo_add.jsonl").readline())
    prompt = row["arguments"]["gen_args_0"]["arg_0"] if isinstance(row["arguments"], dict) else row["arguments"][0][0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = Example("t0", (Message("user", "Add 0 and 2."), Message("assistant", "2")), "x", 1, "add", {})
    text, spans = render(ex, tok, "tulu")
    assert prompt == text[: spans[0][0]]


def _independent_scores(eval_dir: Path) -> dict[str, float]:
    """Headline scores straight from lm-eval's result JSON, without the package's readers."""
    results = json.loads((eval_dir / RESULTS_FILE).read_text())["results"]
    return {"gsm8k": results["iaif_gsm8k"]["exact_match,strict-match"], "mmlu": results["iaif_mmlu"]["acc,none"],
            "demo/add": results["iaif_demo_add"]["exact_match,none"]}


def _fake_eval(folder: Path, scores: dict[str, float]) -> Path:
    """An eval folder in the runner's format with given lm-eval results (for the statistics test)."""
    folder.mkdir(parents=True)
    tasks = {t: {"lm_eval_name": f"x_{t}", "metric": "acc,none", "num_fewshot": 0, "num_examples": 10} for t in scores}
    (folder / SCORES_FILE).write_text(json.dumps({"template": "tulu", "tasks": tasks}))
    (folder / RESULTS_FILE).write_text(json.dumps({"results": {f"x_{t}": {"acc,none": v} for t, v in scores.items()}}))
    return folder


def test_report_numbers_equal_lm_eval_result_files(eval_dir, tmp_path):
    runs = [EvalRun("interaction", 0, eval_dir), EvalRun("random", 0, eval_dir)]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"k": 4, "counts_per_source": {"pool.jsonl": 4}, "counts_per_task": {"add": 3, "filler": 1},
                                   "duplicate_rate": 0.25}))
    report = write_report(runs, {"interaction": summary}, tmp_path / "report")
    data = json.loads((report.parent / "results.json").read_text())
    expected = _independent_scores(eval_dir)
    for method in ("interaction", "random"):
        for task, value in expected.items():
            assert data["scores"][method][task]["mean"] == value
    text = report.read_text()
    assert f"{expected['mmlu']:.4f}" in text and "0.250" in text
    assert (report.parent / "scores.png").stat().st_size > 0 and (report.parent / "composition.png").stat().st_size > 0


def test_report_mean_std_and_wins(tmp_path):
    runs = [EvalRun("a", 0, _fake_eval(tmp_path / "a0", {"t1": 0.2, "t2": 0.5})),
            EvalRun("a", 1, _fake_eval(tmp_path / "a1", {"t1": 0.4, "t2": 0.5})),
            EvalRun("b", 0, _fake_eval(tmp_path / "b0", {"t1": 0.1, "t2": 0.5})),
            EvalRun("b", 1, _fake_eval(tmp_path / "b1", {"t1": 0.1, "t2": 0.5}))]
    agg = aggregate(runs)
    assert agg["scores"]["a"]["t1"]["mean"] == pytest.approx(0.3)
    assert agg["scores"]["a"]["t1"]["std"] == pytest.approx(((0.1**2 + 0.1**2) / 1) ** 0.5)
    assert agg["wins"] == {"a": 2, "b": 1}  # t2 is a tie: both win it
