"""Selection ablation on the demo's validation split, by two-fold cross-validation.

The demo selects with each target task's validation examples and is scored on the test split. To choose
selection settings without ever touching the test split, this script splits every task's validation set
into two folds (seeded): each variant selects with the target examples of one fold, is fine-tuned with the
demo recipe for every seed, and is scored on the *other* fold (exact match and, where the evaluation
produces it, answer NLL); the two directions are averaged. Each (variant, fold) is one `iaif run` of the
demo config with the variant's `select` settings, reusing the warm-up checkpoints and feature stores of a
finished demo run (linked, never recomputed), so the features, the recipe and the evaluation are exactly
the pipeline's. Finished steps are reused: rerun the same command to resume.

    iaif demo --steps setup warmup extract --output_dir runs/demo      # features once
    python scripts/ablate_selection.py --run-dir runs/demo --output-dir runs/ablation

Writes OUTPUT/ablation.md, OUTPUT/ablation.json, and the settings and provenance (config.yaml, run_info.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
from pathlib import Path
from typing import Any

import yaml

from iaif.common.atomic import write_jsonl
from iaif.common.progress import log_to_stderr
from iaif.common.provenance import write_run_info
from iaif.evaluation.lm_eval_runner import SCORES_FILE
from iaif.pipeline import PipelineConfig, demo_config, run_pipeline

logger = logging.getLogger("ablate_selection")
DEFAULT_VARIANTS = Path(__file__).resolve().parents[1] / "configs" / "ablation" / "demo_selection.yaml"


def split_folds(validation: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Two disjoint halves of one task's validation records (seeded shuffle)."""
    order = list(range(len(validation)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return [validation[i] for i in sorted(order[:half])], [validation[i] for i in sorted(order[half:])]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_folds(data_dir: Path, out: Path, seed: int) -> list[tuple[Path, Path]]:
    """Per fold f: (folder of selection targets <task>.jsonl, demo-targets folder whose <task>/test.jsonl
    is the other half). Returns [(select_dir, eval_dir)] for fold 0 and fold 1."""
    tasks = sorted(p.name for p in (data_dir / "targets").iterdir() if p.is_dir())
    folds = [(out / "folds" / f"fold{f}" / "select", out / "folds" / f"fold{f}" / "eval") for f in (0, 1)]
    for task in tasks:
        halves = split_folds(_read_jsonl(data_dir / "targets" / task / "validation.jsonl"), seed)
        for f, (sel_dir, eval_dir) in enumerate(folds):
            write_jsonl(sel_dir / f"{task}.jsonl", halves[f])
            write_jsonl(eval_dir / task / "test.jsonl", halves[1 - f])
    return folds


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=True)


def run_variant(base: PipelineConfig, run_dir: Path, out: Path, variant: dict[str, Any], fold: int,
                select_dir: Path, eval_dir: Path) -> Path:
    """One `iaif run` of the demo config for a variant on a fold; returns its output folder."""
    folder = out / variant["name"] / f"fold{fold}"
    for shared in ("warmup", "features"):
        _link(run_dir / shared, folder / shared)
    targets = {p.stem: str(p) for p in sorted(select_dir.glob("*.jsonl"))}
    cfg = dataclasses.replace(
        base, output_dir=str(folder), methods=[variant["method"]], targets=targets, eval_base=False,
        pool_feature=variant.get("pool_feature", base.pool_feature),
        demo_data={**(base.demo_data or {}), "output_dir": str(run_dir / "demo_data")},
        select={**base.select, **variant.get("select", {})},
        eval={**base.eval, "demo_targets": str(eval_dir)})
    run_pipeline(cfg)
    return folder


def collect(folder: Path) -> dict[str, dict[str, list[float]]]:
    """{metric key: {task: [score per seed]}} from the run's evaluations."""
    found: dict[str, dict[str, list[float]]] = {}
    for scores in sorted((folder / "eval").glob(f"*/{SCORES_FILE}")):
        for name, row in json.loads(scores.read_text(encoding="utf-8"))["tasks"].items():
            found.setdefault(row["metric"], {}).setdefault(name, []).append(float(row["score"]))
    return found


def summarise(results: dict[str, list[dict[str, dict[str, list[float]]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant, metric and task: the mean over folds and seeds (and 'mean' over tasks)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, folds in results.items():
        per_metric: dict[str, dict[str, float]] = {}
        metrics = {m for f in folds for m in f}
        for metric in sorted(metrics):
            tasks = sorted({t for f in folds for t in f.get(metric, {})})
            cells = {t: statistics.fmean([v for f in folds for v in f.get(metric, {}).get(t, [])]) for t in tasks}
            cells["mean"] = statistics.fmean(cells.values())
            per_metric[metric] = cells
        table[name] = per_metric
    return table


def write_table(table: dict[str, dict[str, dict[str, float]]], variants: list[dict[str, Any]], out: Path) -> Path:
    lines = ["# Selection ablation (demo validation split, two-fold cross-validation)", ""]
    settings = {v["name"]: v for v in variants}
    for metric in sorted({m for v in table.values() for m in v}):
        tasks = sorted({t for v in table.values() for t in v.get(metric, {}) if t != "mean"})
        lines += [f"## {metric}", "", "| variant | method | settings | " + " | ".join(tasks) + " | mean |",
                  "|---|---|---|" + "---|" * (len(tasks) + 1)]
        for name, per in table.items():
            cells = per.get(metric, {})
            shown = {**settings[name].get("select", {}), **({"pool_feature": settings[name]["pool_feature"]}
                                                              if "pool_feature" in settings[name] else {})}
            sel = json.dumps(shown, sort_keys=True)
            lines.append(f"| {name} | {settings[name]['method']} | `{sel}` | "
                         + " | ".join(f"{cells.get(t, float('nan')):.3f}" for t in [*tasks, "mean"]) + " |")
        lines.append("")
    path = out / "ablation.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a demo run with warm-up and features (iaif demo --steps setup warmup extract)")
    ap.add_argument("--output-dir", default="runs/ablation")
    ap.add_argument("--variants", default=str(DEFAULT_VARIANTS), help="YAML list of {name, method, select: {...}}")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="fine-tuning seeds (default: the demo's)")
    ap.add_argument("--fold-seed", type=int, default=0)
    args = ap.parse_args()
    log_to_stderr()
    run_dir, out = Path(args.run_dir), Path(args.output_dir)
    if not (run_dir / "features").is_dir() or not (run_dir / "demo_data" / "manifest.json").is_file():
        raise SystemExit(f"{run_dir}: no demo run with features; run `iaif demo --steps setup warmup extract "
                         f"--output_dir {run_dir}` first")
    variants = yaml.safe_load(Path(args.variants).read_text(encoding="utf-8"))
    if args.only:
        unknown = set(args.only) - {v["name"] for v in variants}
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)} in {args.variants}")
        variants = [v for v in variants if v["name"] in args.only]
    base = demo_config()
    if args.seeds:
        base = dataclasses.replace(base, seeds=args.seeds)
    write_run_info(out, {**vars(args), "variants": variants, "seeds": base.seeds}, "ablate-selection")
    folds = make_folds(run_dir / "demo_data", out, args.fold_seed)
    results: dict[str, list[dict[str, dict[str, list[float]]]]] = {}
    for variant in variants:
        for fold, (select_dir, eval_dir) in enumerate(folds):
            logger.info("variant %s, fold %d", variant["name"], fold)
            results.setdefault(variant["name"], []).append(collect(run_variant(base, run_dir, out, variant, fold,
                                                                                select_dir, eval_dir)))
    table = summarise(results)
    (out / "ablation.json").write_text(json.dumps({"variants": variants, "table": table, "seeds": base.seeds},
                                                  indent=2), encoding="utf-8")
    print(write_table(table, variants, out).read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
