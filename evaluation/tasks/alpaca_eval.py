"""AlpacaEval where the Hugging Face Hub is reachable; refused offline.

AlpacaEval needs the network twice: its instructions are a Hub dataset (``tatsu-lab/alpaca_eval``) and
its score is a judge model's preference between the model's output and a reference output (the
``alpaca_eval`` package, by default GPT-4 Turbo through the OpenAI API). iaif's ``alpaca_eval`` task
(``templates/alpaca_eval.yaml``) therefore only generates: lm-eval writes the outputs into
``samples/iaif_alpaca_eval.jsonl`` (its metric is the mean output length in words, not a win rate), and
``python -m iaif.evaluation.tasks.alpaca_eval SAMPLES OUT.json --generator NAME`` writes them in the
judge's input format for ``alpaca_eval --model_outputs OUT.json``. Offline, asking for the task is a
one-line error that names it; nothing stands in for the data or the judge.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from iaif.common.atomic import write_json

TASK = "alpaca_eval"
TEMPLATE = "alpaca_eval.yaml"
HUB_DATASET = "tatsu-lab/alpaca_eval"
METRIC = "output_words"
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _unavailable(reason: str) -> ValueError:
    return ValueError(f"task '{TASK}' needs network: its instructions are on the Hugging Face Hub ({HUB_DATASET}) and its "
                      f"score is an API judge's win rate (pip install alpaca-eval; OPENAI_API_KEY); {reason}")


def require_hub(timeout_s: float = 10.0) -> None:
    """Raise a ``ValueError`` naming the task unless the Hub dataset can be reached."""
    for flag in _OFFLINE_FLAGS:
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            raise _unavailable(f"{flag} is set")
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(HUB_DATASET, timeout=timeout_s)
    except Exception as err:  # connection, DNS, proxy or HTTP errors all mean: not reachable from here
        raise _unavailable(f"the Hub is not reachable from this machine ({type(err).__name__})") from None


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval hook: the output's length in words (the win rate needs the judge, see the module)."""
    return {METRIC: float(len(results[0].split()))}


def model_outputs(samples: Path, generator: str) -> list[dict[str, str]]:
    """The logged lm-eval samples of the task as AlpacaEval model outputs ``{instruction, output, generator, dataset}``."""
    rows = []
    for line in samples.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            doc = row["doc"]
            rows.append({"instruction": doc["instruction"], "output": row["resps"][0][0].strip(),
                         "generator": generator, "dataset": doc.get("dataset", "")})
    if not rows:
        raise ValueError(f"{samples}: no samples")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iaif.evaluation.tasks.alpaca_eval",
                                     description="lm-eval samples of iaif's alpaca_eval task -> AlpacaEval model_outputs JSON")
    parser.add_argument("samples", type=Path, help="samples/iaif_alpaca_eval.jsonl of an `iaif eval` run")
    parser.add_argument("output", type=Path, help="model_outputs JSON for `alpaca_eval --model_outputs`")
    parser.add_argument("--generator", default="iaif", help="model name recorded in each output")
    args = parser.parse_args(argv)
    write_json(args.output, model_outputs(args.samples, args.generator), indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
