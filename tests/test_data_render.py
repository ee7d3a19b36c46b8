"""Every record shape renders to the expected Tulu text and label mask (written out by hand).

The expected token ids and labels are built independently of ``iaif.training.data``: the text is cut by
hand into segments that are in or out of the loss, each segment is tokenised on its own, and the
pieces are concatenated after the BOS token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from iaif.training.data import IGNORE_INDEX, DataConfig, load_examples, render, tokenize_example, tokenize_examples

# (record, [(text segment, counts in the loss), ...]) -- the segments joined are the rendered text
CASES = {
    "messages": (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And you?"},
                      {"role": "assistant", "content": "Fine, thanks."}]},
        [("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", False), ("Hello</s>", True),
         ("\n<|user|>\nAnd you?\n<|assistant|>\n", False), ("Fine, thanks.</s>", True)],
    ),
    "alpaca_with_input": (
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        [("<|user|>\nAdd the numbers.\n\n2 and 3\n<|assistant|>\n", False), ("5</s>", True)],
    ),
    "alpaca_without_input": (
        {"instruction": "Name a colour.", "input": "", "output": "red"},
        [("<|user|>\nName a colour.\n<|assistant|>\n", False), ("red</s>", True)],
    ),
    "prompt_completion": (
        {"prompt": "Say a", "completion": "a"},  # the answer also occurs inside "<|assistant|>"
        [("<|user|>\nSay a\n<|assistant|>\n", False), ("a</s>", True)],
    ),
    "question_answer": (
        {"question": "What is 7 minus 2?", "answer": "5"},
        [("<|user|>\nWhat is 7 minus 2?\n<|assistant|>\n", False), ("5</s>", True)],
    ),
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def expected_ids_and_labels(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for text, in_loss in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if in_loss else [IGNORE_INDEX] * len(piece)
    return ids, labels


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("template", ["tulu", "chat"])
@pytest.mark.parametrize("shape", sorted(CASES))
def test_record_shapes_render_and_mask(tok, tmp_path: Path, shape: str, template: str) -> None:
    record, segments = CASES[shape]
    (example,) = load_examples(str(write_jsonl(tmp_path / "pool.jsonl", [record])))
    text, _ = render(example, tok, template)
    assert text == "".join(s for s, _ in segments)
    tokenized = tokenize_example(example, tok, template, max_length=512)
    ids, labels = expected_ids_and_labels(tok, segments)
    assert tokenized.input_ids == ids
    assert tokenized.labels == labels


def test_chat_and_tulu_agree_on_demo_pool(tok, tmp_path: Path) -> None:
    from iaif.demo.demo_data import DemoDataConfig, make_demo_data

    out = make_demo_data(DemoDataConfig(output_dir=str(tmp_path / "demo"), per_target_family=10, per_other_family=5,
                                        num_filler=5, clusters_per_target=1, cluster_size=3, validation_size=4, test_size=4))
    examples = load_examples(str(out / "pool.jsonl"))
    tulu, _ = tokenize_examples(examples, tok, "tulu", max_length=256)
    chat, _ = tokenize_examples(examples, tok, "chat", max_length=256)
    assert [(t.input_ids, t.labels) for t in tulu] == [(t.input_ids, t.labels) for t in chat]


FLAN_TSV = (
    "Is the sky green?\\nOptions:\\n- yes\\n- no\tno\tThe sky is blue on a clear day.\n"
    "\n"
    "What is 2 + 3?\t5\t2 plus 3 makes 5.\n"
)


def test_flan_cot_tsv_renders(tok, tmp_path: Path) -> None:
    path = tmp_path / "mini_cot.tsv"
    path.write_text(FLAN_TSV, encoding="utf-8")
    first, second = load_examples(str(path))
    assert (first.line, second.line) == (1, 3)  # blank line skipped, line numbers kept
    assert first.task == second.task == "mini_cot"
    segments = [("<|user|>\nIs the sky green?\nOptions:\n- yes\n- no\n<|assistant|>\n", False),
                ("The sky is blue on a clear day. So the answer is no.</s>", True)]
    assert render(first, tok, "tulu")[0] == "".join(s for s, _ in segments)
    tokenized = tokenize_example(first, tok, "tulu", max_length=512)
    assert (tokenized.input_ids, tokenized.labels) == expected_ids_and_labels(tok, segments)
    assert second.messages[1].content == "2 plus 3 makes 5. So the answer is 5."


def test_real_flan_cot_lines(shared_data: Path, tok) -> None:
    path = shared_data / "flan_v2_cot" / "qasc_train.tsv"
    examples = load_examples(DataConfig(path=str(path), max_examples=3))
    assert [e.line for e in examples] == [1, 2, 3]
    first = examples[0]
    question = ("What is the process by which living things give rise to offspring?\nOptions:\n- (A) DNA\n"
                "- (B) photosynthesis\n- (C) bird\n- (D) sex\n- (E) subtraction\n- (F) gametes\n- (G) eggs\n- (H) ovum")
    answer = ("Reproduction is the process by which living things give rise to offspring. Sex equals reproduction. "
              "Sex is the process by which living things give rise to offspring. So the answer is (D).")
    segments = [(f"<|user|>\n{question}\n<|assistant|>\n", False), (f"{answer}</s>", True)]
    assert render(first, tok, "tulu")[0] == "".join(s for s, _ in segments)
    tokenized = tokenize_example(first, tok, "tulu", max_length=4096)
    assert (tokenized.input_ids, tokenized.labels) == expected_ids_and_labels(tok, segments)
    assert examples[1].messages[1].content.endswith("So the answer is (H).")


def test_truncation_keeps_the_answer_prefix(tok, tmp_path: Path) -> None:
    record, segments = CASES["messages"]
    (example,) = load_examples(str(write_jsonl(tmp_path / "pool.jsonl", [record])))
    ids, labels = expected_ids_and_labels(tok, segments)
    cut = len(ids) - 3
    tokenized = tokenize_example(example, tok, "tulu", max_length=cut)
    assert tokenized.input_ids == ids[:cut] and tokenized.labels == labels[:cut]
