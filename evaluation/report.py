"""Comparison report: every selection method × target task, over seeds.

Scores are read straight from lm-eval's result files (``lm_eval_results.json`` of each eval run,
at the metric key recorded in its ``scores.json``), never re-computed. Each eval run may hold
several *measures* per task: ``score`` (the task's headline metric, e.g. exact match) and, for the
demo tasks, ``answer_nll`` (mean -log P(gold answer | prompt) in nats per answer; lower is better).
Writes into the report folder:

- ``report.md`` — per measure a table of mean ± std over seeds per method and task, the mean over
  tasks (per seed, then mean ± std over seeds), the best per task in bold (highest, or lowest where
  lower is better) and the number of tasks each method wins (tied methods all count); then the
  selection diagnostics of :mod:`iaif.evaluation.diagnostics` and the plots;
- ``results.json`` — the same numbers, machine-readable, with per-seed scores and eval settings;
- ``scores.png`` (each measure per task) and ``composition.png`` (picks per task of each selection).

std is the sample standard deviation over seeds (ddof=1; 0 with a single seed).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iaif.evaluation.diagnostics import selection_diagnostics
from iaif.evaluation.lm_eval_runner import RESULTS_FILE, SCORES_FILE
from iaif.evaluation.tasks.likelihood import ANSWER_NLL

REPORT_FILE = "report.md"
RESULTS_JSON = "results.json"
HEADLINE = "score"
MEASURE_TITLES = {
    HEADLINE: "Headline metric (exact match on the demo tasks; higher is better)",
    ANSWER_NLL: "Answer NLL: -log P(gold answer | prompt) in nats per answer, mean over the test questions "
                "(lower is better)",
}


@dataclass(frozen=True)
class EvalRun:
    """One evaluated adapter: the method that chose its data, the seed, its eval folder."""

    method: str
    seed: int
    eval_dir: Path


def read_run_scores(eval_dir: str | Path) -> tuple[dict[tuple[str, str], float], dict[str, bool], dict[str, Any]]:
    """One eval folder: value per (task, measure) read from lm-eval's result file; whether higher is
    better per measure; and the eval settings."""
    eval_dir = Path(eval_dir)
    summary = json.loads((eval_dir / SCORES_FILE).read_text(encoding="utf-8"))
    results = json.loads((eval_dir / RESULTS_FILE).read_text(encoding="utf-8"))["results"]
    scores, higher = {}, {}
    for key, t in summary["tasks"].items():
        measure = t.get("measure", HEADLINE)
        scores[(t.get("name", key), measure)] = float(results[t["lm_eval_name"]][t["metric"]])
        higher[measure] = bool(t.get("higher_is_better", True))
    settings = {k: v for k, v in summary.items() if k not in ("tasks", "chat_template")}
    settings["tasks"] = {key: {"metric": t["metric"], "num_fewshot": t["num_fewshot"], "num_examples": t["num_examples"]}
                         for key, t in summary["tasks"].items()}
    return scores, higher, settings


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(per_seed: dict[int, float]) -> dict[str, Any]:
    mean, std = _mean_std(list(per_seed.values()))
    return {"mean": mean, "std": std, "n": len(per_seed), "per_seed": {str(s): v for s, v in sorted(per_seed.items())}}


def _best(means: dict[str, float], higher_is_better: bool) -> list[str]:
    top = (max if higher_is_better else min)(means.values())
    return [m for m, v in means.items() if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)]


def _measure_table(per: dict[str, dict[str, dict[int, float]]], methods: list[str], higher_is_better: bool) -> dict[str, Any]:
    """Cells per method and task, the mean over tasks, the best per task and the wins of one measure."""
    methods = [m for m in methods if m in per]
    tasks = sorted({t for m in per.values() for t in m})
    table = {m: {t: _cell(per[m][t]) for t in tasks if t in per[m]} for m in methods}
    over_tasks = {}
    for m in methods:
        seeds = set.intersection(*(set(per[m].get(t, {})) for t in tasks))
        if seeds:
            over_tasks[m] = _cell({s: sum(per[m][t][s] for t in tasks) / len(tasks) for s in seeds})
    wins = Counter({m: 0 for m in methods})
    best: dict[str, list[str]] = {}
    for t in tasks:
        best[t] = _best({m: table[m][t]["mean"] for m in methods if t in table[m]}, higher_is_better)
        wins.update(best[t])
    best_mean = _best({m: c["mean"] for m, c in over_tasks.items()}, higher_is_better) if over_tasks else []
    return {"higher_is_better": higher_is_better, "tasks": tasks, "scores": table, "mean_over_tasks": over_tasks,
            "best": best, "best_mean": best_mean, "wins": dict(wins)}


def aggregate(runs: list[EvalRun]) -> dict[str, Any]:
    """Per measure (headline score first), method and task: per-seed values, mean and std; the mean
    over tasks; best and wins per measure; eval settings."""
    per: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    higher: dict[str, bool] = {}
    settings: dict[str, Any] = {}
    for run in runs:
        scores, run_higher, settings = read_run_scores(run.eval_dir)
        higher.update(run_higher)
        for (task, measure), value in scores.items():
            per.setdefault(measure, {}).setdefault(run.method, {}).setdefault(task, {})[run.seed] = value
    methods = list(dict.fromkeys(r.method for r in runs))
    order = sorted(per, key=lambda m: (m != HEADLINE, m))
    return {"methods": methods, "measures": {m: _measure_table(per[m], methods, higher[m]) for m in order},
            "eval_settings": settings}


def _plot_scores(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = agg["measures"]
    width_tasks = max(len(t["tasks"]) for t in measures.values())
    fig, axes = plt.subplots(len(measures), 1, figsize=(max(6, 1.6 * width_tasks + 2), 4 * len(measures)), squeeze=False)
    for ax, (measure, table) in zip(axes[:, 0], measures.items()):
        methods, tasks = list(table["scores"]), table["tasks"]
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
            cells = [table["scores"][m].get(t, {"mean": math.nan, "std": 0.0}) for t in tasks]
            ax.bar(xs, [c["mean"] for c in cells], width, yerr=[c["std"] for c in cells], capsize=2, label=m)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
        direction = "higher" if table["higher_is_better"] else "lower"
        ax.set_ylabel(f"{measure} (mean ± std over seeds; {direction} is better)", fontsize="small")
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


def _measure_lines(measure: str, table: dict[str, Any]) -> list[str]:
    tasks = table["tasks"]
    lines = [f"## {MEASURE_TITLES.get(measure, measure)}", "",
             "| method | " + " | ".join(tasks) + " | mean over tasks | wins |", "|---" * (len(tasks) + 3) + "|"]
    for m, cells in table["scores"].items():
        row = [_fmt(cells.get(t), m in table["best"][t]) for t in tasks]
        row.append(_fmt(table["mean_over_tasks"].get(m), m in table["best_mean"]))
        lines.append(f"| {m} | " + " | ".join(row) + f" | {table['wins'][m]} |")
    return lines + [""]


def _selection_lines(selections: dict[str, dict[str, Any]]) -> list[str]:
    def opt(value: Any, fmt: str = "{}") -> str:
        return "–" if value is None else fmt.format(value)

    lines = ["## Selections", "",
             "Read from each selection's `selected.jsonl` (`iaif.evaluation.diagnostics`): distinct prompts (and the "
             "most picks of one prompt), the share of wrong-answer picks (`meta.wrong`), picks from near-duplicate "
             "clusters (`meta.cluster`; distinct clusters in brackets) and the picks per task. `–`: the pool records "
             "carry no such `meta` field.", "",
             "| selection | picks | distinct prompts (max repeats) | wrong-answer share | cluster picks (clusters) "
             "| per task |", "|---|---|---|---|---|---|"]
    for name, d in selections.items():
        tasks = ", ".join(f"{k}: {v}" for k, v in d["per_task"].items())
        clusters = "–" if d["cluster_picks"] is None else f"{d['cluster_picks']} ({d['clusters']})"
        lines.append(f"| {name} | {d['k']} | {d['distinct_prompts']} ({d['max_prompt_repeats']}) | "
                     f"{opt(d['wrong_share'], '{:.3f}')} | {clusters} | {tasks} |")
    return lines + ["", "![picks per task of each selection](composition.png)", ""]


def _markdown(agg: dict[str, Any], selections: dict[str, dict[str, Any]], title: str) -> str:
    seeds = sorted({s for table in agg["measures"].values() for cells in table["scores"].values()
                    for c in cells.values() for s in c["per_seed"]}, key=int)
    lines = [f"# {title}", "", f"Seeds: {', '.join(seeds)}. Cells: mean ± std (sample std over seeds); mean over "
             "tasks: the mean over the tasks per seed, then mean ± std over seeds. The best mean per column is bold. "
             "Wins: tasks where the method has the best mean (ties count for every tied method).", ""]
    for measure, table in agg["measures"].items():
        lines += _measure_lines(measure, table)
    ev = agg["eval_settings"]
    lines += ["## Evaluation settings", "",
              f"Prompt format `{ev.get('template')}` (chat template applied: {ev.get('apply_chat_template')}, "
              f"few-shot as multi-turn: {ev.get('fewshot_as_multiturn')}), backend `{ev.get('backend')}`, "
              f"limit {ev.get('limit')}, seed {ev.get('seed')}.", "",
              "| task | metric | few-shot | examples |", "|---|---|---|---|"]
    for t, s in ev.get("tasks", {}).items():
        lines.append(f"| {t} | `{s['metric']}` | {s['num_fewshot']} | {s['num_examples']} |")
    lines += ["", "![scores per task](scores.png)", ""]
    if selections:
        lines += _selection_lines(selections)
    return "\n".join(lines)


def write_report(runs: list[EvalRun], selections: Mapping[str, str | Path], out_dir: str | Path,
                 title: str = "iaif comparison") -> Path:
    """Write report.md, results.json and the plots into ``out_dir``; return the report path.
    ``selections``: selection name -> its ``iaif select`` folder (or ``selected.jsonl``)."""
    if not runs:
        raise ValueError("report: no evaluation runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    diagnostics = {name: selection_diagnostics(p).to_dict() for name, p in selections.items()}
    _plot_scores(agg, out / "scores.png")
    if diagnostics:
        _plot_composition(diagnostics, out / "composition.png")
    payload = {**agg, "selections": diagnostics,
               "runs": [{"method": r.method, "seed": r.seed, "eval_dir": str(r.eval_dir)} for r in runs]}
    (out / RESULTS_JSON).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (out / REPORT_FILE).write_text(_markdown(agg, diagnostics, title), encoding="utf-8")
    return out / REPORT_FILE
