"""The stage registry: every stage is a dataclass config plus ``run(config) -> Path``.

Each entry's loader imports the stage's module when called, so listing the stages (``iaif --help``)
imports none of them. The imports are plain statements, visible to a type checker, which checks
that each run function takes its config. ``iaif.pipeline`` drives the stages from here and
``iaif.cli`` adds the pipeline's own commands (``run``, ``demo``) on top: the imports point one way,
cli -> pipeline -> stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from iaif.demo.demo_data import DemoDataConfig
    from iaif.demo.tiny_model import TinyModelConfig
    from iaif.evaluation.fidelity.benchmark import FidelityConfig
    from iaif.evaluation.lds.benchmark import LdsConfig
    from iaif.evaluation.lds.subsets import SubsetsConfig
    from iaif.evaluation.lm_eval_runner import EvalConfig
    from iaif.evaluation.select_bench.benchmark import SelectBenchConfig
    from iaif.evaluation.targets import TargetsConfig
    from iaif.selection.airrep.stage import AirRepConfig
    from iaif.selection.attribute import AttributeConfig
    from iaif.selection.features.extract import ExtractConfig
    from iaif.selection.features.memory_plan import PlanConfig
    from iaif.selection.select import SelectConfig
    from iaif.training.finetune import TrainConfig
    from iaif.training.warmup import WarmupConfig

C = TypeVar("C")
Loaded = tuple[type[C], Callable[[C], Path]]


@dataclass(frozen=True)
class Stage(Generic[C]):
    """One subcommand: its help line and a loader returning (config class, run function)."""

    help: str
    load: Callable[[], Loaded[C]]


def _tiny_model() -> Loaded[TinyModelConfig]:
    from iaif.demo.tiny_model import TinyModelConfig, build_tiny_model

    return TinyModelConfig, build_tiny_model


def _demo_data() -> Loaded[DemoDataConfig]:
    from iaif.demo.demo_data import DemoDataConfig, make_demo_data

    return DemoDataConfig, make_demo_data


def _targets() -> Loaded[TargetsConfig]:
    from iaif.evaluation.targets import TargetsConfig, run_make_targets

    return TargetsConfig, run_make_targets


def _warmup() -> Loaded[WarmupConfig]:
    from iaif.training.warmup import WarmupConfig, run_warmup

    return WarmupConfig, run_warmup


def _extract() -> Loaded[ExtractConfig]:
    from iaif.selection.features.extract import ExtractConfig, run_extract

    return ExtractConfig, run_extract


def _plan() -> Loaded[PlanConfig]:
    from iaif.selection.features.memory_plan import PlanConfig, run_plan

    return PlanConfig, run_plan


def _select() -> Loaded[SelectConfig]:
    from iaif.selection.select import SelectConfig, run_select

    return SelectConfig, run_select


def _attribute() -> Loaded[AttributeConfig]:
    from iaif.selection.attribute import AttributeConfig, run_attribute

    return AttributeConfig, run_attribute


def _train() -> Loaded[TrainConfig]:
    from iaif.training.finetune import TrainConfig, run_train

    return TrainConfig, run_train


def _eval() -> Loaded[EvalConfig]:
    from iaif.evaluation.lm_eval_runner import EvalConfig, run_eval

    return EvalConfig, run_eval


def _fidelity() -> Loaded[FidelityConfig]:
    from iaif.evaluation.fidelity.benchmark import FidelityConfig, run_fidelity

    return FidelityConfig, run_fidelity


def _select_bench() -> Loaded[SelectBenchConfig]:
    from iaif.evaluation.select_bench.benchmark import SelectBenchConfig, run_select_bench

    return SelectBenchConfig, run_select_bench


def _subsets() -> Loaded[SubsetsConfig]:
    from iaif.evaluation.lds.subsets import SubsetsConfig, run_subsets

    return SubsetsConfig, run_subsets


def _airrep() -> Loaded[AirRepConfig]:
    from iaif.selection.airrep.stage import AirRepConfig, run_airrep

    return AirRepConfig, run_airrep


def _lds() -> Loaded[LdsConfig]:
    from iaif.evaluation.lds.benchmark import LdsConfig, run_lds

    return LdsConfig, run_lds


STAGES: dict[str, Stage[Any]] = {
    "build-tiny-model": Stage("build (or reuse) the small offline Llama-style base model and tokenizer", _tiny_model),
    "make-demo-data": Stage("generate the demo instruction pool and target tasks", _demo_data),
    "make-targets": Stage("selection target sets (MMLU dev, BBH CoT exemplars, TyDiQA 1 per language) from the benchmark data",
                          _targets),
    "warmup": Stage("LoRA warm-up on a random fraction of the pool; one checkpoint per epoch", _warmup),
    "extract": Stage("projected per-example LoRA-gradient features into a feature store", _extract),
    "plan": Stage("expected peak memory per device of extract or train, and the feature store's size on disk", _plan),
    "select": Stage("choose a subset of the pool (interaction, less, first-order, random, rds, embed)", _select),
    "attribute": Stage("group attribution: first-order and interaction-aware estimate of a group", _attribute),
    "train": Stage("LoRA / QLoRA fine-tuning on a dataset or a selected subset", _train),
    "eval": Stage("lm-evaluation-harness on a base model plus adapter", _eval),
    "fidelity": Stage("estimators against leave-group-out retraining on small models", _fidelity),
    "subsets": Stage("fine-tune one LoRA adapter per random pool subset and record the target loss (LDS data)", _subsets),
    "airrep": Stage("train the AirRep group-attribution model on subset tables", _airrep),
    "lds": Stage("linear datamodeling score of every group estimator on held-out retrained subsets", _lds),
    "select-bench": Stage("selection methods on small models: retrain on seed set + picks, held-out target loss", _select_bench),
}
