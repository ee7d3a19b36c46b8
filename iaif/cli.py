"""The ``iaif`` command: one subcommand per stage.

Each stage is a dataclass config plus a function taking it. They are imported only when the
stage runs, so ``iaif --help`` stays fast. ``python -m iaif STAGE`` and
``accelerate launch -m iaif STAGE`` go through the same ``main``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    config: str  # "module:ConfigClass"
    run: str  # "module:function"
    help: str


STAGES: dict[str, Stage] = {
    "build-tiny-model": Stage("iaif.demo.tiny_model:TinyModelConfig", "iaif.demo.tiny_model:build_tiny_model",
                              "build (or reuse) the small offline Llama-style base model and tokenizer"),
    "make-demo-data": Stage("iaif.demo.demo_data:DemoDataConfig", "iaif.demo.demo_data:make_demo_data",
                            "generate the demo instruction pool and target tasks"),
    "make-targets": Stage("iaif.evaluation.targets:TargetsConfig", "iaif.evaluation.targets:run_make_targets",
                          "selection target sets (MMLU dev, BBH CoT exemplars, TyDiQA 1 per language) from the benchmark data"),
    "warmup": Stage("iaif.training.warmup:WarmupConfig", "iaif.training.warmup:run_warmup",
                    "LoRA warm-up on a random fraction of the pool; one checkpoint per epoch"),
    "extract": Stage("iaif.selection.features.extract:ExtractConfig", "iaif.selection.features.extract:run_extract",
                     "projected per-example LoRA-gradient features into a feature store"),
    "select": Stage("iaif.selection.select:SelectConfig", "iaif.selection.select:run_select",
                    "choose a subset of the pool (interaction, less, first-order, random, rds, embed)"),
    "attribute": Stage("iaif.selection.attribute:AttributeConfig", "iaif.selection.attribute:run_attribute",
                       "group attribution: first-order and interaction-aware estimate of a group"),
    "train": Stage("iaif.training.finetune:TrainConfig", "iaif.training.finetune:run_train",
                   "LoRA / QLoRA fine-tuning on a dataset or a selected subset"),
    "eval": Stage("iaif.evaluation.lm_eval_runner:EvalConfig", "iaif.evaluation.lm_eval_runner:run_eval",
                  "lm-evaluation-harness on a base model plus adapter"),
    "run": Stage("iaif.pipeline:PipelineConfig", "iaif.pipeline:run_pipeline",
                 "the whole pipeline from a config: warm-up, extract, select, train, eval, report"),
    "demo": Stage("iaif.pipeline:PipelineConfig", "iaif.pipeline:run_demo",
                  "the whole pipeline on the embedded default (tiny model, generated data)"),
    "fidelity": Stage("iaif.evaluation.fidelity.benchmark:FidelityConfig", "iaif.evaluation.fidelity.benchmark:run_fidelity",
                      "estimators against leave-group-out retraining on small models"),
    "select-bench": Stage("iaif.evaluation.select_bench.benchmark:SelectBenchConfig",
                          "iaif.evaluation.select_bench.benchmark:run_select_bench",
                          "selection methods on small models: retrain on seed set + picks, held-out target loss"),
}

POSITIONAL_CONFIG_STAGES = {"run"}


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: iaif STAGE [--config FILE.yaml] [--field value ...]", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {stage.help}" for name, stage in STAGES.items()]
    lines += ["", "`iaif STAGE --help` lists a stage's settings."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in ("-V", "--version"):
        from iaif import __version__

        print(__version__)
        return
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        sys.exit(f"iaif: unknown stage '{name}'\n\n{_usage()}")
    if name in POSITIONAL_CONFIG_STAGES and rest and not rest[0].startswith("-"):
        rest = ["--config", rest[0], *rest[1:]]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from iaif.common.progress import on_terminal

    if not on_terminal():  # redirected log: no Hugging Face progress bars (ours write one line every 30 s)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from iaif.config import ConfigError, parse_stage_config
    from iaif.training.lora import hide_bitsandbytes

    hide_bitsandbytes()  # imported only when a 4-bit model is asked for

    stage = STAGES[name]
    try:
        config = parse_stage_config(_load(stage.config), rest, prog=f"iaif {name}", description=stage.help)
    except ConfigError as err:
        sys.exit(f"iaif {name}: {err}")
    try:
        _load(stage.run)(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: a clear message, no traceback
        logging.getLogger("iaif").debug("stage %s failed", name, exc_info=True)
        sys.exit(f"iaif {name}: {err}")
