"""The demo's answer-likelihood tasks (``templates/demo_target_nll.yaml``).

A ``loglikelihood`` request per test question: the Tulu prompt as context, the gold answer as
continuation. lm-eval's hf backend moves the context's trailing whitespace into the continuation
it scores, and the Tulu generation prompt ends in the newline that opens the answer turn
(``<|assistant|>\\n``), so the score is log P("\\n" + answer | prompt up to ``<|assistant|>``):
the answer's tokens plus that one template token, which a model trained on the format predicts
with probability close to 1 (docs/BENCHMARKS.md gives its size on the demo model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from iaif.evaluation.tasks.sources import Subtask

ANSWER_NLL = "answer_nll"


def answer_nll(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval ``process_results``: ``results[0]`` is (log-likelihood, is-greedy) of the continuation;
    the metric is its negative, in nats (summed over the tokens)."""
    loglikelihood, _ = results[0]
    return {ANSWER_NLL: -float(loglikelihood)}


def answer_nll_subtask(sub: Subtask) -> Subtask:
    """The answer-NLL variant of a demo target subtask: the same records, scored by :func:`answer_nll`."""
    return dataclasses.replace(sub, process_results=f"{__name__}.{answer_nll.__name__}")
