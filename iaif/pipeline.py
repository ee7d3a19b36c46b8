"""``iaif run CONFIG`` and ``iaif demo``: the whole pipeline, each step in its own folder.

Steps, in order (``OUT`` = ``output_dir``):

1. ``setup``   — demo only: build the tiny base model and generate the demo data (``OUT/demo_data``);
2. ``warmup``  — LoRA warm-up on a random fraction of the pool (``OUT/warmup/checkpoint-epoch{E}``);
3. ``extract`` — per checkpoint: Adam features of the pool and plain-gradient features of each
   target task (``OUT/features/epoch{E}/{pool,target-<task>}``);
4. ``select``  — every method at the same budget (``OUT/select/<method>[-s<seed>]``; only the
   seeded methods, e.g. random, make one selection per seed; with ``select_per_target`` one per
   target task, ``OUT/select/<task>/<method>[-s<seed>]``);
5. ``train``   — one adapter per method and seed (``OUT/train/<method>-s<seed>``);
6. ``eval``    — lm-eval on the base model and every adapter (``OUT/eval/<method>-s<seed>``, ``OUT/eval/base``):
   the headline metric of every task and, on the demo tasks, the answer NLL of the gold answers;
7. ``report``  — ``OUT/report/report.md``, ``results.json`` and plots: a table per measure (mean ± std over
   seeds, mean over tasks, best per task) and the diagnostics of every selection (``iaif.evaluation.diagnostics``).

A step whose outputs exist is skipped (resume after an interruption: rerun the same command).
Each stage's config is built from the pipeline-level fields below, then the YAML section of the
same name (``warmup:``, ``extract:``, ``select:``, ``train:``, ``eval:``) is merged on top, so
every stage setting stays reachable; the resolved stage config is written into the step's folder
(replayable with ``iaif STAGE --config``). Under ``accelerate launch`` the distributed steps
(warm-up, extract, select, train, eval) run on every process (select shards the interaction-aware
greedy and runs the other methods on the main process); report runs on the main process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from iaif.common.contracts import ADAPTER_DIR, SELECTED_FILE, CheckpointStores, done_marker
from iaif.common.dist import is_main_process, wait_for_everyone
from iaif.common.provenance import write_run_info
from iaif.config import ConfigError, config_from_dict, omegaconf_error_text
from iaif.selection.select import Method
from iaif.stages import STAGES
from iaif.training.data import TextFormat

logger = logging.getLogger(__name__)

ALL_METHODS: list[Method] = list(get_args(Method))
DEFAULT_METHODS: list[Method] = [m for m in ALL_METHODS if m != "airrep"]
"""airrep needs a model trained on retrained subsets (iaif subsets, iaif airrep): named only on request."""
SEEDED_METHODS = {"random"}
STEPS = ["setup", "warmup", "extract", "select", "train", "eval", "report"]


@dataclass
class PipelineConfig:
    """The whole pipeline: warm-up, extract, select (every method), train (per method and seed), eval, report."""

    output_dir: str = "runs/pipeline"
    """Root folder; every step writes into its own subfolder."""
    model: str = ""
    """Base model (Hub id or local folder). Demo: filled in with the tiny model."""
    pool: str = ""
    """Candidate pool file (any format the data layer reads). Demo: the generated pool."""
    targets: dict[str, str] = field(default_factory=dict)
    """Target task name -> validation file used for selection. Demo: the generated validation sets."""
    methods: list[Method] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Selection methods to compare (interaction, less, first-order, random, rds, embed)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Fine-tuning seeds (and selection seeds of the seeded methods)."""
    fraction: float = 0.05
    """Selection budget as a fraction of the pool (LESS: 5%); the same for every method."""
    k: int | None = None
    """Selection budget as a number of examples (overrides fraction)."""
    text: TextFormat = field(default_factory=TextFormat)
    """Prompt template (tulu or chat: the tokenizer's) and token limit, fed to every stage that renders
    text (warm-up, extract, select's rds/embed, train) and the template to eval."""
    eval_tasks: list[str] = field(default_factory=list)
    """Local benchmarks to evaluate on (mmlu, bbh, tydiqa, gsm8k, ...); the demo adds its target tasks."""
    eval_base: bool = True
    """Also evaluate the base model without an adapter (the `base` row of the report)."""
    select_per_target: bool = False
    """Select once per target task (``OUT/select/<task>/<method>``) instead of once for all of them; a
    selection-only analysis (e.g. which pool source each task draws on): train and eval need the joint selection."""
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    """Steps to run (e.g. [warmup] for a separate multi-GPU job); the others must already be done when needed."""
    tiny_model: dict[str, Any] | None = None
    """Demo: settings of iaif.demo.tiny_model.TinyModelConfig; when set, the tiny model is built and used as `model`."""
    demo_data: dict[str, Any] | None = None
    """Demo: settings of iaif.demo.demo_data.DemoDataConfig; when set, the data are generated and used as pool, targets and eval tasks."""
    warmup: dict[str, Any] = field(default_factory=dict)
    """Overrides of iaif.training.warmup.WarmupConfig (e.g. {training: {num_epochs: 4}, fraction: 0.05})."""
    pool_feature: Literal["adam", "grad"] = "adam"
    """Pool features: the checkpoint's Adam update direction (LESS) or the plain gradient (the g_a of
    u_a = (1/n) H⁻¹ g_a); stored in features/epoch{E}/pool or pool-grad."""
    extract: dict[str, Any] = field(default_factory=dict)
    """Overrides of iaif.selection.features.extract.ExtractConfig (e.g. {dim: 8192, projection: factorised})."""
    select: dict[str, Any] = field(default_factory=dict)
    """Overrides of iaif.selection.select.SelectConfig shared by every method."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of iaif.training.finetune.TrainConfig (e.g. {training: {num_epochs: 4}})."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of iaif.evaluation.lm_eval_runner.EvalConfig (e.g. {batch_size: 16, backend: vllm})."""

    def __post_init__(self) -> None:
        for section in SECTION_STAGES:
            check_section(section, getattr(self, section) or {})


SECTION_STAGES: dict[str, str] = {
    "tiny_model": "build-tiny-model", "demo_data": "make-demo-data",
    "warmup": "warmup", "extract": "extract", "select": "select", "train": "train", "eval": "eval",
}
"""Pipeline section -> the stage (``iaif.stages``) whose config it feeds; each is checked against it at load."""


def check_section(section: str, values: dict[str, Any]) -> None:
    """Check a section's keys and value types against the config of the stage it feeds; a typo is
    a ``ConfigError`` naming ``section.key`` (the caller adds the file)."""
    if not values:
        return
    cls, _ = STAGES[SECTION_STAGES[section]].load()
    try:
        OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(values))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{omegaconf_error_text(err, section)} ({cls.__name__})") from None


def _compose(stage: str, base: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The stage's config: pipeline-derived values, then the YAML section merged on top."""
    cls, _ = STAGES[stage].load()
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides)))
    return config_from_dict(cls, merged, origin=f"pipeline section '{stage}'")  # type: ignore[arg-type]


def _run_stage(stage: str, cfg: Any) -> Path:
    return STAGES[stage].load()[1](cfg)


@dataclass
class _Resolved:
    model: str
    pool: str
    targets: dict[str, str]
    demo_targets: str | None


def _setup(cfg: PipelineConfig, out: Path) -> _Resolved:
    model, pool, targets, demo_targets = cfg.model, cfg.pool, dict(cfg.targets), None
    if cfg.tiny_model is not None:
        from iaif.demo.tiny_model import TinyModelConfig, build_tiny_model

        tiny = config_from_dict(TinyModelConfig, cfg.tiny_model, "tiny_model")  # cached by its settings
        if is_main_process():
            build_tiny_model(tiny)
        wait_for_everyone()
        model = str(tiny.resolved_output_dir())
    if cfg.demo_data is not None:
        from iaif.demo.demo_data import DemoDataConfig, make_demo_data

        demo = config_from_dict(DemoDataConfig, {"output_dir": str(out / "demo_data"), **cfg.demo_data}, "demo_data")
        data_dir = Path(demo.output_dir)
        if is_main_process() and not done_marker("make-demo-data", data_dir).is_file():
            make_demo_data(demo)
        wait_for_everyone()
        pool = str(data_dir / "pool.jsonl")
        demo_targets = str(data_dir / "targets")
        targets = {**{t: str(data_dir / "targets" / t / "validation.jsonl") for t in demo.target_tasks}, **targets}
    if not model or not pool or not targets:
        raise ValueError("run: `model`, `pool` and `targets` are required (or `tiny_model` / `demo_data` for the demo)")
    return _Resolved(model, pool, targets, demo_targets)


def _budget(cfg: PipelineConfig) -> dict[str, Any]:
    return {"k": cfg.k} if cfg.k is not None else {"fraction": cfg.fraction}


def _done(path: Path) -> bool:
    if path.exists():
        logger.info("skip: %s exists", path)
        return True
    return False


def _warmup(cfg: PipelineConfig, res: _Resolved, out: Path) -> list[Path]:
    from iaif.training.checkpoint import CheckpointError, list_checkpoints

    folder = out / "warmup"
    try:
        return list_checkpoints(folder)
    except CheckpointError:
        if "warmup" not in cfg.steps:
            raise
    base = {"data": {"path": res.pool}, "model": {"name_or_path": res.model}, "output_dir": str(folder),
            "text": dataclasses.asdict(cfg.text)}
    _run_stage("warmup", _compose("warmup", base, cfg.warmup))
    return list_checkpoints(folder)


@dataclass
class _Stores:
    """One checkpoint's feature stores: the pool store and one target store per task."""

    checkpoint: Path
    adapter_hash: str
    pool: str
    targets: dict[str, str]

    def for_tasks(self, tasks: list[str]) -> CheckpointStores:
        """The checkpoint's stores for a selection on ``tasks`` (``iaif select``'s ``checkpoints`` entry)."""
        return CheckpointStores(pool=self.pool, targets=[self.targets[t] for t in tasks], checkpoint=str(self.checkpoint),
                                adapter_hash=self.adapter_hash)


def _extract(cfg: PipelineConfig, res: _Resolved, out: Path, checkpoints: list[Path]) -> list[_Stores]:
    """The feature stores of every checkpoint (extracted unless done)."""
    from iaif.training.checkpoint import recorded_adapter_hash

    stores = []
    pool_folder = "pool" if cfg.pool_feature == "adam" else f"pool-{cfg.pool_feature}"
    for ckpt in checkpoints:
        where = out / "features" / ckpt.name.replace("checkpoint-", "")
        found = _Stores(ckpt, recorded_adapter_hash(ckpt), str(where / pool_folder),
                        {t: str(where / f"target-{t}") for t in res.targets})
        stores.append(found)
        jobs: list[tuple[str | None, str, str, str]] = [(None, found.pool, res.pool, cfg.pool_feature)]
        jobs += [(t, found.targets[t], data, "grad") for t, data in res.targets.items()]
        for task, folder, data, feature in jobs:
            if _done(done_marker("extract", folder)):
                continue
            if "extract" not in cfg.steps:
                raise FileNotFoundError(f"{folder}: feature store missing and step 'extract' not requested")
            base: dict[str, Any] = {"model": {"name_or_path": res.model}, "checkpoint": str(ckpt), "data": {"path": data},
                    "feature": feature, "text": dataclasses.asdict(cfg.text), "output_dir": folder}
            if task is not None:
                base["data"]["task"] = task
            _run_stage("extract", _compose("extract", base, cfg.extract))
    return stores


def _selection_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}" if method in SEEDED_METHODS else method


def _select(cfg: PipelineConfig, res: _Resolved, out: Path, stores: list[_Stores]) -> dict[str, Path]:
    """One selection per method (per seed for the seeded ones), for all target tasks together or
    (``select_per_target``) per task; returns name (``<task>/<name>`` per task) -> folder."""
    chosen: dict[str, Path] = {}
    groups = {t: [t] for t in res.targets} if cfg.select_per_target else {"": list(res.targets)}
    for group, tasks in groups.items():
        for method in cfg.methods:
            for seed in (cfg.seeds if method in SEEDED_METHODS else cfg.seeds[:1]):
                name = str(Path(group, _selection_name(method, seed)))
                folder = out / "select" / name
                chosen[name] = folder
                if _done(done_marker("select", folder)):
                    continue
                if "select" not in cfg.steps:
                    raise FileNotFoundError(f"{folder}: selection missing and step 'select' not requested")
                base = {"method": method, "seed": seed, "pool": {"path": res.pool}, "model": res.model,
                        "checkpoints": [dataclasses.asdict(s.for_tasks(tasks)) for s in stores],
                        "targets": [res.targets[t] for t in tasks], "text": dataclasses.asdict(cfg.text),
                        "output_dir": str(folder), **_budget(cfg)}
                if cfg.tiny_model is not None:  # offline: no sentence-transformers model, embed with the tiny LM (mean pooling)
                    base["embedder"] = res.model
                _run_stage("select", _compose("select", base, cfg.select))  # every process: it shards the greedy
                wait_for_everyone()
    return chosen


def _train(cfg: PipelineConfig, res: _Resolved, out: Path, selections: dict[str, Path]) -> dict[tuple[str, int], Path]:
    adapters: dict[tuple[str, int], Path] = {}
    for method in cfg.methods:
        for seed in cfg.seeds:
            folder = out / "train" / f"{method}-s{seed}"
            adapters[(method, seed)] = folder / ADAPTER_DIR
            if _done(done_marker("train", folder)):
                continue
            if "train" not in cfg.steps:
                raise FileNotFoundError(f"{folder}: adapter missing and step 'train' not requested")
            data = selections[_selection_name(method, seed)] / SELECTED_FILE
            base = {"data": {"path": str(data)}, "model": {"name_or_path": res.model}, "output_dir": str(folder),
                    "training": {"seed": seed}, "text": dataclasses.asdict(cfg.text)}
            _run_stage("train", _compose("train", base, cfg.train))
    return adapters


def _eval(cfg: PipelineConfig, res: _Resolved, out: Path, adapters: dict[tuple[str, int], Path]) -> list[Any]:
    from iaif.evaluation.report import EvalRun

    jobs: list[tuple[str, int, Path | None]] = [("base", seed, None) for seed in cfg.seeds[:1] if cfg.eval_base]
    jobs += [(m, s, a) for (m, s), a in adapters.items()]
    runs = []
    for method, seed, adapter in jobs:
        folder = out / "eval" / (method if adapter is None else f"{method}-s{seed}")
        runs.append(EvalRun(method, seed, folder))
        if _done(done_marker("eval", folder)):
            continue
        if "eval" not in cfg.steps:
            raise FileNotFoundError(f"{folder}: evaluation missing and step 'eval' not requested")
        base = {"model": res.model, "adapter": str(adapter) if adapter else None, "output_dir": str(folder),
                "tasks": list(cfg.eval_tasks), "demo_targets": res.demo_targets, "seed": seed,
                "template": cfg.text.template}
        _run_stage("eval", _compose("eval", base, cfg.eval))
    return runs


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every step; return the report path (or the output folder if no report step)."""
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS)) + sorted(set(cfg.steps) - set(STEPS))
    if unknown:
        raise ValueError(f"run: unknown method(s)/step(s) {unknown}; methods {ALL_METHODS}, steps {STEPS}")
    if not cfg.seeds:
        raise ValueError("run: `seeds` is empty")
    if cfg.select_per_target and max(STEPS.index(s) for s in cfg.steps) > STEPS.index("select"):
        raise ValueError("run: `select_per_target` makes per-task selections; train/eval/report need the joint one "
                         "(use --steps up to select)")
    out = Path(cfg.output_dir)
    if is_main_process():
        write_run_info(out, cfg, "run")
    start = time.perf_counter()
    last = max(STEPS.index(s) for s in cfg.steps)

    def finished(step: str, what: str) -> bool:
        logger.info("[%.0fs] %s: %s", time.perf_counter() - start, step, what)
        return STEPS.index(step) >= last

    res = _setup(cfg, out)
    if finished("setup", f"model {res.model}, pool {res.pool}, targets {sorted(res.targets)}"):
        return out
    checkpoints = _warmup(cfg, res, out)
    if finished("warmup", f"{len(checkpoints)} checkpoint(s)"):
        return out
    stores = _extract(cfg, res, out, checkpoints)
    if finished("extract", f"{sum(1 + len(s.targets) for s in stores)} feature store(s)"):
        return out
    selections = _select(cfg, res, out, stores)
    if finished("select", f"{len(selections)} selection(s)"):
        return out
    adapters = _train(cfg, res, out, selections)
    if finished("train", f"{len(adapters)} adapter(s)"):
        return out
    runs = _eval(cfg, res, out, adapters)
    if finished("eval", f"{len(runs)} evaluation(s)") or not is_main_process():
        return out
    from iaif.evaluation.report import write_report

    report = write_report(runs, selections, out / "report", title=f"iaif comparison: {Path(cfg.output_dir).name}")
    finished("report", str(report))
    return report


def demo_config_path() -> Path:
    """``demo.yaml`` as shipped in the package (``iaif.configs``), from a checkout or an installed wheel."""
    return Path(str(resources.files("iaif.configs") / "demo.yaml"))


def demo_config() -> PipelineConfig:
    """The embedded default: ``configs/demo.yaml`` (tiny model, generated data, every method, 3 seeds)."""
    from iaif.config import config_from_yaml

    return config_from_yaml(PipelineConfig, demo_config_path())


def run_demo(cfg: PipelineConfig) -> Path:
    """``iaif demo``: the pipeline on configs/demo.yaml; fields given to ``iaif demo`` (flags or
    --config) that differ from the built-in defaults override it."""
    default = PipelineConfig()
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
    return run_pipeline(dataclasses.replace(demo_config(), **changed))
