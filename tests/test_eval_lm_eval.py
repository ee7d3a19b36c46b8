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
    assert results["n-samples"]["iaif_demo_add_nll"]["effective"] == 2
    assert results["n-shot"]["iaif_mmlu"] == 5 and results["n-shot"]["iaif_gsm8k"] == 8
    scores = json.loads((eval_dir / SCORES_FILE).read_text())
    assert scores["template"] == "tulu" and scores["apply_chat_template"] and "<|assistant|>" in scores["chat_template"]
    assert set(scores["tasks"]) == {"gsm8k", "mmlu", "demo/add", "demo/add:answer_nll"}
    assert scores["tasks"]["demo/add:answer_nll"]["higher_is_better"] is False
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


def _fake_eval(folder: Path, scores: dict[str, float], nll: dict[str, float] | None = None) -> Path:
    """An eval folder in the runner's format with given lm-eval results (for the statistics tests):
    headline accuracy per task and, optionally, answer NLL per task."""
    folder.mkdir(parents=True)
    tasks = {t: {"lm_eval_name": f"x_{t}", "metric": "acc,none", "num_fewshot": 0, "num_examples": 10} for t in scores}
    results = {f"x_{t}": {"acc,none": v} for t, v in scores.items()}
    for t, v in (nll or {}).items():
        tasks[f"{t}:answer_nll"] = {"name": t, "lm_eval_name": f"x_{t}_nll", "metric": "answer_nll,none", "num_fewshot": 0,
                                    "num_examples": 10, "measure": "answer_nll", "higher_is_better": False}
        results[f"x_{t}_nll"] = {"answer_nll,none": v}
    (folder / SCORES_FILE).write_text(json.dumps({"template": "tulu", "tasks": tasks}))
    (folder / RESULTS_FILE).write_text(json.dumps({"results": results}))
    return folder


def test_report_numbers_equal_lm_eval_result_files(eval_dir, tmp_path):
    runs = [EvalRun("interaction", 0, eval_dir), EvalRun("random", 0, eval_dir)]
    selection = tmp_path / "select"
    selection.mkdir()
    (selection / "selected.jsonl").write_text("".join(json.dumps(
        {"id": f"p{i}", "prompt": "Add 1 and 2." if i < 3 else "Say hi.", "completion": "3" if i < 3 else "hi",
         "_iaif": {"task": "add" if i < 3 else "filler"}}) + "\n" for i in range(4)))
    report = write_report(runs, {"interaction": selection}, tmp_path / "report")
    data = json.loads((report.parent / "results.json").read_text())
    expected = _independent_scores(eval_dir)
    nll = json.loads((eval_dir / RESULTS_FILE).read_text())["results"]["iaif_demo_add_nll"]["answer_nll,none"]
    for method in ("interaction", "random"):
        for task, value in expected.items():
            assert data["measures"]["score"]["scores"][method][task]["mean"] == value
        assert data["measures"]["answer_nll"]["scores"][method]["demo/add"]["mean"] == nll
    text = report.read_text()
    assert f"{expected['mmlu']:.4f}" in text and f"{nll:.4f}" in text and "Answer NLL" in text
    assert "| interaction | 4 | 2 (3) | – | – | add: 3, filler: 1 |" in text  # no `meta`: those columns are empty
    assert (report.parent / "scores.png").stat().st_size > 0 and (report.parent / "composition.png").stat().st_size > 0


def test_report_mean_std_and_wins(tmp_path):
    runs = [EvalRun("a", 0, _fake_eval(tmp_path / "a0", {"t1": 0.2, "t2": 0.5})),
            EvalRun("a", 1, _fake_eval(tmp_path / "a1", {"t1": 0.4, "t2": 0.5})),
            EvalRun("b", 0, _fake_eval(tmp_path / "b0", {"t1": 0.1, "t2": 0.5})),
            EvalRun("b", 1, _fake_eval(tmp_path / "b1", {"t1": 0.1, "t2": 0.5}))]
    table = aggregate(runs)["measures"]["score"]
    assert table["scores"]["a"]["t1"]["mean"] == pytest.approx(0.3)
    assert table["scores"]["a"]["t1"]["std"] == pytest.approx(((0.1**2 + 0.1**2) / 1) ** 0.5)
    assert table["wins"] == {"a": 2, "b": 1}  # t2 is a tie: both win it


def test_report_answer_nll_lower_is_better_and_mean_over_tasks(tmp_path):
    runs = [EvalRun("a", 0, _fake_eval(tmp_path / "a0", {"t1": 0.2, "t2": 0.6}, {"t1": 1.0, "t2": 3.0})),
            EvalRun("a", 1, _fake_eval(tmp_path / "a1", {"t1": 0.4, "t2": 0.4}, {"t1": 2.0, "t2": 1.0})),
            EvalRun("b", 0, _fake_eval(tmp_path / "b0", {"t1": 0.1, "t2": 0.9}, {"t1": 0.5, "t2": 4.0})),
            EvalRun("b", 1, _fake_eval(tmp_path / "b1", {"t1": 0.1, "t2": 0.9}, {"t1": 0.5, "t2": 4.0}))]
    agg = aggregate(runs)
    nll, em = agg["measures"]["answer_nll"], agg["measures"]["score"]
    assert list(agg["measures"]) == ["score", "answer_nll"] and not nll["higher_is_better"]
    assert nll["best"] == {"t1": ["b"], "t2": ["a"]}  # the lowest NLL wins
    # mean over tasks per seed (a: 2.0 and 1.5; b: 2.25 twice), then mean and sample std over the seeds
    assert nll["mean_over_tasks"]["a"]["mean"] == pytest.approx(1.75)
    assert nll["mean_over_tasks"]["a"]["std"] == pytest.approx((2 * 0.25**2) ** 0.5)
    assert nll["best_mean"] == ["a"] and em["best_mean"] == ["b"]  # em means over tasks: a 0.4, b 0.5
    report = write_report(runs, {}, tmp_path / "report")
    text = report.read_text()
    assert "## Answer NLL" in text and "## Headline metric" in text
    assert "| a | 1.5000 ± 0.7071 | **2.0000 ± 1.4142** | **1.7500 ± 0.3536** | 1 |" in text
