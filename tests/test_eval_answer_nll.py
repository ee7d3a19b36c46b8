"""The demo's answer-NLL metric (lm-eval ``loglikelihood`` task) against a direct torch computation of
-log P(answer tokens | prompt) with the same model, in the training format (lm-eval scores the newline
that opens the answer turn with the answer: see iaif.evaluation.tasks.likelihood)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iaif.evaluation.lm_eval_runner import SCORES_FILE, EvalConfig, run_eval
from iaif.training.data import Example, Message, render

QUESTIONS = [("Add 3 and 4.", "7"), ("What is 9 plus 9?", "18"), ("What is the capital of Kalomi?", "Zetavo"),
             ("Which is larger, 2 or 8?", "8")]


@pytest.fixture(scope="module")
def eval_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nll")
    folder = root / "targets" / "mixed"
    folder.mkdir(parents=True)
    with open(folder / "test.jsonl", "w") as fh:
        for i, (q, a) in enumerate(QUESTIONS):
            fh.write(json.dumps({"id": f"q{i}", "task": "mixed", "answer": a, "messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    cfg = EvalConfig(model=str(tiny_model_dir), output_dir=str(root / "run"), demo_targets=str(root / "targets"),
                     batch_size=3, dtype="float32", max_gen_toks=4)
    return run_eval(cfg)


def _direct_nll(model, tok, question: str, answer: str) -> tuple[float, int]:
    """-Σ log p of the tokens of "\n" + answer after the Tulu prompt's ``<|assistant|>`` (end-of-sequence
    excluded); and the number of answer tokens."""
    ex = Example("x", (Message("user", question), Message("assistant", answer)), "t", 1, "t", {})
    text, spans = render(ex, tok, "tulu")
    start = spans[0][0]
    assert text[start - 1] == "\n"
    enc = tok(text[: start + len(answer)], return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    positions = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= start - 1]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return -sum(logp[p - 1, ids[0, p]].item() for p in positions), len(positions) - 1


def test_answer_nll_equals_direct_log_likelihood(eval_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = {r["doc"]["id"]: r for r in map(json.loads, open(eval_dir / "samples" / "iaif_demo_mixed_nll.jsonl"))}
    expected, lengths = [], []
    for i, (q, a) in enumerate(QUESTIONS):
        nll, n = _direct_nll(model, tok, q, a)
        expected.append(nll)
        lengths.append(n)
        assert rows[f"q{i}"]["answer_nll"] == pytest.approx(nll, rel=1e-4, abs=1e-4)
    assert max(lengths) > 1  # a multi-token answer: the metric sums over the answer's tokens
    score = json.loads((eval_dir / SCORES_FILE).read_text())["tasks"]["demo/mixed:answer_nll"]
    assert score["score"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert score["lm_eval_name"] == "iaif_demo_mixed_nll" and score["higher_is_better"] is False


def test_answer_nll_task_asks_the_generation_prompt(eval_dir: Path) -> None:
    def prompts(task: str) -> list[str]:
        rows = [json.loads(x) for x in open(eval_dir / "samples" / f"{task}.jsonl")]
        return [r["arguments"]["gen_args_0"]["arg_0"] if isinstance(r["arguments"], dict) else r["arguments"][0][0]
                for r in sorted(rows, key=lambda r: r["doc_id"])]

    assert prompts("iaif_demo_mixed_nll") == prompts("iaif_demo_mixed")
