"""Selection-benchmark results: mean ± std over seeds, markdown tables, the goal check, one PNG per
dataset × model × target (held-out test loss against budget, one line per method)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Row = dict[str, Any]
INTERACTION = ("interaction-exact", "interaction-ef")
GOAL_MIN_BUDGET = 0.02


def aggregate(rows: Sequence[Row]) -> dict[tuple, dict[str, float]]:
    """{(dataset, model, target, method, budget): mean/std over seeds of test loss, test accuracy, val loss,
    and the mean class-spread diagnostics of the picks}."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["target"], r["method"], r["budget"])].append(r)
    out = {}
    for key, rs in groups.items():
        loss, acc, val = (np.array([r[f] for r in rs]) for f in ("test_loss", "test_acc", "val_loss"))
        out[key] = {"loss_mean": float(loss.mean()), "loss_std": float(loss.std()), "acc_mean": float(acc.mean()),
                    "acc_std": float(acc.std()), "val_loss_mean": float(val.mean()), "seeds": len(rs),
                    "k": int(rs[0]["k"])}
        for diag in ("max_class_share", "heavy_class_share", "base_wrong_share"):
            vals = [r[diag] for r in rs if r.get(diag) is not None]
            if vals:
                out[key][f"{diag}_mean"] = float(np.mean(vals))
    return out


def _settings(agg: dict[tuple, dict[str, float]]) -> list[tuple[str, str, str]]:
    return sorted({k[:3] for k in agg}, key=lambda s: (s[0], s[1], s[2]))


REFERENCES = ("base", "all-pool")


def _budgets(agg: dict, setting: tuple) -> list[float]:
    return sorted({k[4] for k in agg if k[:3] == setting and k[3] not in REFERENCES})


def _methods(agg: dict, setting: tuple) -> list[str]:
    seen: list[str] = []
    for k in agg:
        if k[:3] == setting and k[3] not in seen:
            seen.append(k[3])
    return seen


def markdown_tables(agg: dict[tuple, dict[str, float]]) -> str:
    """Per dataset × model × target: methods × budgets, test loss mean ± std (mean accuracy); best loss bold."""
    parts = []
    for setting in _settings(agg):
        budgets = _budgets(agg, setting)
        methods = [m for m in _methods(agg, setting) if m not in REFERENCES]
        ref = {m: agg.get(setting + (m, b)) for m, b in (("base", 0.0), ("all-pool", 1.0))}
        head = f"**{setting[0]} / {setting[1]} / {setting[2]} target**"
        extra = ", ".join(f"{m} {v['loss_mean']:.4f} ({100 * v['acc_mean']:.1f}%)" for m, v in ref.items() if v)
        ks = [agg[(setting + (methods[0], b))]["k"] for b in budgets]
        lines = [f"{head} (test loss, mean ± std over seeds, accuracy in brackets; {extra})", "",
                 "| method | " + " | ".join(f"{100 * b:g}% (k={k})" for b, k in zip(budgets, ks)) + " |",
                 "|---|" + "---|" * len(budgets)]
        best = {b: min(agg[(setting + (m, b))]["loss_mean"] for m in methods) for b in budgets}
        for m in methods:
            cells = []
            for b in budgets:
                v = agg[(setting + (m, b))]
                cell = f"{v['loss_mean']:.4f} ± {v['loss_std']:.4f} ({100 * v['acc_mean']:.1f}%)"
                cells.append(f"**{cell}**" if v["loss_mean"] == best[b] else cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def goal_check(agg: dict[tuple, dict[str, float]]) -> dict[str, Any]:
    """Issue 16's goal per interaction method: lower mean test loss than first-order and random at every
    budget ≥ 2 %, on every dataset (each model × target counted separately)."""
    out: dict[str, Any] = {}
    for method in INTERACTION:
        cells = []
        for setting in _settings(agg):
            for b in _budgets(agg, setting):
                if b < GOAL_MIN_BUDGET or (setting + (method, b)) not in agg:
                    continue
                mine = agg[(setting + (method, b))]["loss_mean"]
                rivals = {r: agg[(setting + (r, b))]["loss_mean"] for r in ("first-order", "random") if (setting + (r, b)) in agg}
                cells.append({"dataset": setting[0], "model": setting[1], "target": setting[2], "budget": b,
                              "loss": mine, **{f"{r}_loss": v for r, v in rivals.items()},
                              "met": all(mine < v for v in rivals.values())})
        if cells:
            out[method] = {"met": sum(c["met"] for c in cells), "cells": len(cells), "all_met": all(c["met"] for c in cells),
                           "detail": cells}
    return out


def plot(agg: dict[tuple, dict[str, float]], setting: tuple[str, str, str], path) -> None:
    """Held-out test loss against budget, one line per method, error bars = std over seeds."""
    budgets = _budgets(agg, setting)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in _methods(agg, setting):
        if m in REFERENCES:
            continue
        mean = [agg[(setting + (m, b))]["loss_mean"] for b in budgets]
        std = [agg[(setting + (m, b))]["loss_std"] for b in budgets]
        ax.errorbar([100 * b for b in budgets], mean, yerr=std, marker="o", capsize=3, label=m)
    for m, b, style in (("base", 0.0, ":"), ("all-pool", 1.0, "--")):
        if (setting + (m, b)) in agg:
            label = "base (seed set only)" if m == "base" else "all pool"
            ax.axhline(agg[(setting + (m, b))]["loss_mean"], color="grey", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}" for b in budgets])
    ax.set_xlabel("budget (% of the pool)")
    ax.set_ylabel("held-out target test loss")
    ax.set_title(f"{setting[0]} / {setting[1]} / {setting[2]} target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnostics_table(agg: dict[tuple, dict[str, float]]) -> str:
    """How the picks spread, at the smallest and largest budget (means over seeds): share misclassified
    by the base model, share of the largest class, share of the shifted target's heavy classes."""
    fields = (("base_wrong_share", "misclassified by base"), ("max_class_share", "largest class"),
              ("heavy_class_share", "heavy classes"))
    lines, head_done = [], False
    for setting in _settings(agg):
        budgets = _budgets(agg, setting)
        ends = [budgets[0], budgets[-1]] if len(budgets) > 1 else budgets
        if not head_done:
            cols = [f"{label} {100 * b:g}%" for _, label in fields for b in ends]
            lines += ["| setting | method | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            head_done = True
        for m in _methods(agg, setting):
            if m in REFERENCES:
                continue
            cells = [f"{agg[(setting + (m, b))][f + '_mean']:.2f}" if f + "_mean" in agg[(setting + (m, b))] else "–"
                     for f, _ in fields for b in ends]
            lines.append(f"| {'/'.join(setting)} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
