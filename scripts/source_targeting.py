"""Real text: does each selection method over-select the pool source that matches the target?

Pool: the first ``--per-source`` examples of each FLAN-v2 CoT training file and the first
``--alpaca`` of Alpaca (alpaca_subset5k), each record tagged with its source as ``task``.
Targets: ``--targets-per-task`` benchmark questions with answers per task, each with a matching pool
source (GSM8K test -> flan_gsm8k, AQuA-RAT dev -> flan_aqua, CommonsenseQA dev -> flan_ecqa,
StrategyQA -> flan_strategyqa); a target whose question also occurs in its matching FLAN file is
skipped. Both are read from the shared data folder ($IAIF_SHARED_DATA, else ../shared/data) and
written where the config's ``pool`` and ``targets`` point (under runs/, never into the repository).

Then ``iaif run CONFIG --steps setup warmup extract select`` (the config selects once per target
task), timed per step, and the table: per target task and method, the share of the picks that come
from the matched source, its share of the pool, and their ratio.

    python scripts/source_targeting.py                       # everything (reuses finished steps)
    python scripts/source_targeting.py --redo-select         # new selection defaults: rerun select only
    python scripts/source_targeting.py --output-dir runs/x   # a fresh run (warm-up and features too)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from iaif.common.atomic import write_jsonl
from iaif.common.progress import log_to_stderr
from iaif.config import config_from_yaml
from iaif.evaluation.tasks.build import default_data_dir
from iaif.pipeline import PipelineConfig, run_pipeline
from iaif.training.data import DataConfig, load_examples, read_jsonl

FLAN_SOURCES = ["aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa"]
MATCHED_SOURCE = {"gsm8k": "flan_gsm8k", "aqua": "flan_aqua", "commonsenseqa": "flan_ecqa",
                  "strategyqa": "flan_strategyqa"}
METHODS = ["interaction", "first-order", "less", "random", "rds", "embed"]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _flan_questions(data: Path, source: str) -> set[str]:
    """Normalised question stems (the text before FLAN's "Options:" list) of a whole FLAN file."""
    exs = load_examples(DataConfig(path=str(data / "flan_v2_cot" / f"{source}_train.tsv")))
    return {_norm(e.prompt.split("\nOptions:")[0]) for e in exs}


def _choices(labels: list[str], texts: list[str]) -> str:
    return " ".join(f"({la}) {t}" for la, t in zip(labels, texts))


def _benchmark_records(data: Path, task: str) -> list[tuple[str, str, str]]:
    """(question stem, user turn, assistant turn) of a benchmark, in file order."""
    out = []
    if task == "gsm8k":
        for _, r in read_jsonl(data / "gsm8k" / "test.jsonl"):
            out.append((r["question"], r["question"], r["answer"]))
    elif task == "aqua":
        for _, r in read_jsonl(data / "aqua_rat" / "dev.json"):
            opts = [o.split(")", 1) for o in r["options"]]
            user = f"{r['question']}\nAnswer Choices: {_choices([a for a, _ in opts], [b for _, b in opts])}"
            out.append((r["question"], user, r["rationale"]))
    elif task == "commonsenseqa":
        for _, r in read_jsonl(data / "commonsenseqa" / "dev_rand_split.jsonl"):
            q = r["question"]
            labels, texts = [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]]
            answer = f"The answer is ({r['answerKey']}) {texts[labels.index(r['answerKey'])]}."
            out.append((q["stem"], f"{q['stem']}\nAnswer Choices: {_choices(labels, texts)}", answer))
    elif task == "strategyqa":
        for r in json.loads((data / "zero_shot_cot_extras" / "StrategyQA" / "task.json").read_text())["examples"]:
            out.append((r["input"], r["input"], r["target"]))
    else:
        raise ValueError(f"no benchmark reader for target task '{task}'")
    return out


def prepare(cfg: PipelineConfig, data: Path, per_source: int, alpaca: int, per_task: int) -> dict[str, Any]:
    """Write the pool and the target files the config names (when missing); return their sizes and how
    many benchmark questions were skipped because their matched FLAN file holds them."""
    info: dict[str, Any] = {"pool": {}, "targets": {}}
    if not Path(cfg.pool).is_file():
        records = []
        parts = [(f"flan_{s}", data / "flan_v2_cot" / f"{s}_train.tsv", per_source) for s in FLAN_SOURCES]
        parts.append(("alpaca", data / "alpaca_subset5k" / "alpaca_5000.json", alpaca))
        for name, path, n in parts:
            for ex in load_examples(DataConfig(path=str(path), max_examples=n)):
                records.append({**ex.record, "task": name, "origin": f"{path.relative_to(data)}:{ex.line}"})
        write_jsonl(cfg.pool, records)
    info["pool"] = dict(Counter(e.task for e in load_examples(cfg.pool)))
    for task, path in cfg.targets.items():
        seen = _flan_questions(data, MATCHED_SOURCE[task].removeprefix("flan_"))
        rows, skipped = [], 0
        for stem, user, answer in _benchmark_records(data, task):
            if _norm(stem) in seen:
                skipped += 1
                continue
            rows.append({"id": f"{task}/{len(rows)}", "task": task,
                         "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
            if len(rows) == per_task:
                break
        if not Path(path).is_file():
            write_jsonl(path, rows)
        info["targets"][task] = {"examples": len(load_examples(path)), "skipped_in_pool_source_file": skipped}
    return info


def run_steps(cfg: PipelineConfig) -> dict[str, float]:
    """Run setup, warm-up, extract, select one after another; wall seconds of each (0 when reused)."""
    times = {}
    for i, step in enumerate(["setup", "warmup", "extract", "select"]):
        start = time.perf_counter()
        run_pipeline(dataclasses.replace(cfg, steps=["setup", "warmup", "extract", "select"][: i + 1]))
        times[step] = round(time.perf_counter() - start, 1)
    return times


def source_table(cfg: PipelineConfig) -> tuple[str, dict[str, Any]]:
    """Markdown table + data: per target task and method, matched-source share of picks vs of the pool."""
    pool = Counter(e.task for e in load_examples(cfg.pool))
    total = sum(pool.values())
    out = Path(cfg.output_dir)
    data: dict[str, Any] = {"pool": dict(pool), "tasks": {}}
    methods = [m for m in METHODS if m in cfg.methods]
    head = "| target task (matched source, pool share) | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 1)]
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for task in cfg.targets:
        source = MATCHED_SOURCE[task]
        share = pool[source] / total
        cells, data["tasks"][task] = [], {"source": source, "pool_share": share}
        for method in methods:
            folder = out / "select" / task / (f"{method}-s{cfg.seeds[0]}" if method == "random" else method)
            summary = json.loads((folder / "summary.json").read_text())
            picks = summary["counts_per_task"]
            pick_share = picks.get(source, 0) / summary["k"]
            ratios[method].append(pick_share / share)
            data["tasks"][task][method] = {"picks": picks, "k": summary["k"], "share": pick_share, "ratio": pick_share / share}
            cells.append(f"{pick_share:.2f} ({pick_share / share:.1f}×)")
        lines.append(f"| {task} ({source}, {share:.3f}) | " + " | ".join(cells) + " |")
    means = {m: sum(r) / len(r) for m, r in ratios.items()}
    lines.append("| mean ratio | " + " | ".join(f"{means[m]:.2f}×" for m in methods) + " |")
    data["mean_ratio"] = means
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/realtext_sources.yaml")
    parser.add_argument("--output-dir", default=None, help="pipeline output folder (default: the config's)")
    parser.add_argument("--redo-select", action="store_true", help="delete the selections first (e.g. new defaults)")
    parser.add_argument("--per-source", type=int, default=300, help="examples from each FLAN CoT file")
    parser.add_argument("--alpaca", type=int, default=600, help="examples from Alpaca")
    parser.add_argument("--targets-per-task", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log_to_stderr()
    cfg = config_from_yaml(PipelineConfig, args.config)
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    data = default_data_dir()
    if not data.is_dir():
        raise SystemExit(f"shared data folder not found at {data} (set IAIF_SHARED_DATA)")
    prepared = prepare(cfg, data, args.per_source, args.alpaca, args.targets_per_task)
    if args.redo_select:
        shutil.rmtree(Path(cfg.output_dir) / "select", ignore_errors=True)
    times = run_steps(cfg)
    table, result = source_table(cfg)
    result.update(prepared=prepared, wall_seconds=times, config=args.config, output_dir=cfg.output_dir)
    Path(cfg.output_dir, "source_targeting.json").write_text(json.dumps(result, indent=2))
    Path(cfg.output_dir, "source_targeting.md").write_text(table + "\n")
    print(json.dumps({"pool": prepared["pool"], "targets": prepared["targets"], "wall_seconds": times}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
