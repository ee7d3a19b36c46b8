"""Comparison report: every selection method × target task, over seeds.

Scores are read straight from lm-eval's result files (``lm_eval_results.json`` of each eval run,
at the headline metric key recorded in its ``scores.json``), never re-computed. Writes into the
report folder:

- ``report.md`` — a table of mean ± std over seeds per method and task, the number of tasks each
  method wins (highest mean; tied methods all count), the selection statistics (composition per
  source and per task, duplicate rate, from each selection's ``summary.json``) and the plots;
- ``results.json`` — the same numbers, machine-readable, with per-seed scores and eval settings;
- ``scores.png`` (scores per task) and ``composition.png`` (composition of each selection).

std is the sample standard deviation over seeds (ddof=1; 0 with a single seed).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iaif.evaluation.lm_eval_runner import RESULTS_FILE, SCORES_FILE

REPORT_FILE = "report.md"
RESULTS_JSON = "results.json"


@dataclass(frozen=True)
class EvalRun:
    """One evaluated adapter: the method that chose its data, the seed, its eval folder."""

    method: str
    seed: int
    eval_dir: Path


def read_run_scores(eval_dir: str | Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Headline score per task of one eval folder, read from lm-eval's result file; and settings."""
    eval_dir = Path(eval_dir)
    summary = json.loads((eval_dir / SCORES_FILE).read_text(encoding="utf-8"))
    results = json.loads((eval_dir / RESULTS_FILE).read_text(encoding="utf-8"))["results"]
    scores = {name: float(results[t["lm_eval_name"]][t["metric"]]) for name, t in summary["tasks"].items()}
    settings = {k: v for k, v in summary.items() if k not in ("tasks", "chat_template")}
    settings["tasks"] = {name: {"metric": t["metric"], "num_fewshot": t["num_fewshot"], "num_examples": t["num_examples"]}
                         for name, t in summary["tasks"].items()}
    return scores, settings


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[EvalRun]) -> dict[str, Any]:
    """Per method and task: per-seed scores, mean and std; wins per method; eval settings."""
    per: dict[str, dict[str, dict[int, float]]] = {}
    settings: dict[str, Any] = {}
    for run in runs:
        scores, settings = read_run_scores(run.eval_dir)
        for task, score in scores.items():
            per.setdefault(run.method, {}).setdefault(task, {})[run.seed] = score
    methods = list(dict.fromkeys(r.method for r in runs))
    tasks = sorted({t for m in per.values() for t in m})
    table: dict[str, dict[str, dict[str, Any]]] = {m: {t: dict(zip(("mean", "std"), _mean_std(list(per[m][t].values()))),
                     n=len(per[m][t]), per_seed={str(s): v for s, v in sorted(per[m][t].items())})
                 for t in tasks if t in per[m]} for m in methods}
    wins = Counter({m: 0 for m in methods})
    best: dict[str, list[str]] = {}
    for t in tasks:
        means = {m: table[m][t]["mean"] for m in methods if t in table[m]}
        top = max(means.values())
        best[t] = [m for m, v in means.items() if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)]
        wins.update(best[t])
    return {"methods": methods, "tasks": tasks, "scores": table, "wins": dict(wins), "best": best, "eval_settings": settings}


def selection_stats(summary_path: str | Path) -> dict[str, Any]:
    """Composition per source and per task, size and duplicate rate of one selection summary."""
    summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    return {
        "k": summary.get("k"),
        "per_source": summary.get("counts_per_source", {}),
        "per_task": summary.get("counts_per_task", {}),
        "duplicate_rate": summary.get("duplicate_rate"),
        "objective": summary.get("objective"),
    }


def _plot_scores(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, tasks = agg["methods"], agg["tasks"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
        cells = [agg["scores"][m].get(t, {"mean": math.nan, "std": 0.0}) for t in tasks]
        ax.bar(xs, [c["mean"] for c in cells], width, yerr=[c["std"] for c in cells], capsize=2, label=m)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.legend(fontsize="small", ncol=min(len(methods), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_composition(selections: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(selections)
    parts = sorted({p for s in selections.values() for p in s["per_task"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4))
    bottom = [0.0] * len(names)
    for p in parts:
        heights = [float(selections[n]["per_task"].get(p, 0)) for n in names]
        ax.bar(names, heights, bottom=bottom, label=p)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("selected examples per pool task")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(cell: dict[str, Any] | None, bold: bool) -> str:
    if cell is None:
        return "–"
    text = f"{cell['mean']:.4f} ± {cell['std']:.4f}"
    return f"**{text}**" if bold else text


def _markdown(agg: dict[str, Any], selections: dict[str, dict[str, Any]], title: str) -> str:
    methods, tasks = agg["methods"], agg["tasks"]
    seeds = sorted({s for m in methods for t in tasks for s in agg["scores"][m].get(t, {}).get("per_seed", {})})
    lines = [f"# {title}", "", f"Seeds: {', '.join(seeds)}. Cells: mean ± std (sample std over seeds) of each task's "
             "headline lm-eval metric; the best mean per task is bold. Wins: tasks where the method has the best mean "
             "(ties count for every tied method).", ""]
    lines.append("| method | " + " | ".join(tasks) + " | wins |")
    lines.append("|---" * (len(tasks) + 2) + "|")
    for m in methods:
        cells = [_fmt(agg["scores"][m].get(t), m in agg["best"][t]) for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {agg['wins'][m]} |")
    ev = agg["eval_settings"]
    lines += ["", "## Evaluation settings", "",
              f"Prompt format `{ev.get('template')}` (chat template applied: {ev.get('apply_chat_template')}, "
              f"few-shot as multi-turn: {ev.get('fewshot_as_multiturn')}), backend `{ev.get('backend')}`, "
              f"limit {ev.get('limit')}, seed {ev.get('seed')}.", "",
              "| task | metric | few-shot | examples |", "|---|---|---|---|"]
    for t, s in ev.get("tasks", {}).items():
        lines.append(f"| {t} | `{s['metric']}` | {s['num_fewshot']} | {s['num_examples']} |")
    lines += ["", "![scores per task](scores.png)", ""]
    if selections:
        lines += ["## Selections", "", "| selection | size | duplicate rate | per source | per task |", "|---|---|---|---|---|"]
        for name, s in selections.items():
            src = ", ".join(f"{Path(k).name}: {v}" for k, v in sorted(s["per_source"].items()))
            tsk = ", ".join(f"{k}: {v}" for k, v in sorted(s["per_task"].items()))
            dup = "–" if s["duplicate_rate"] is None else f"{s['duplicate_rate']:.3f}"
            lines.append(f"| {name} | {s['k']} | {dup} | {src} | {tsk} |")
        lines += ["", "![composition of each selection](composition.png)", ""]
    return "\n".join(lines)


def write_report(runs: list[EvalRun], selection_summaries: dict[str, str | Path], out_dir: str | Path,
                 title: str = "iaif comparison") -> Path:
    """Write report.md, results.json and the plots into ``out_dir``; return the report path."""
    if not runs:
        raise ValueError("report: no evaluation runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    selections = {name: selection_stats(p) for name, p in selection_summaries.items()}
    _plot_scores(agg, out / "scores.png")
    if selections:
        _plot_composition(selections, out / "composition.png")
    payload = {**agg, "selections": selections,
               "runs": [{"method": r.method, "seed": r.seed, "eval_dir": str(r.eval_dir)} for r in runs]}
    (out / RESULTS_JSON).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (out / REPORT_FILE).write_text(_markdown(agg, selections, title), encoding="utf-8")
    return out / REPORT_FILE
