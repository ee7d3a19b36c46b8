"""Fidelity results: correlation table (markdown), one scatter plot per pair, results JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

from iaif.common.atomic import write_json  # noqa: E402
from iaif.evaluation.fidelity.estimate import ESTIMATORS  # noqa: E402

SUBSETS = ("random", "coherent", "all")
LABELS = {"first_order": "first-order", "interaction_exact": "interaction (exact H_f)",
          "interaction_ef": "interaction (EF)", "basu": "Basu et al."}


@dataclass
class PairResult:
    """Everything measured on one dataset-model pair."""

    name: str
    description: str
    kinds: list[str]
    sizes: list[int]
    actual: np.ndarray
    """[G] true f(θ_{-S}) − f(θ*) (mean over seeds)"""
    estimates: np.ndarray
    """[G, len(ESTIMATORS)] predicted change (mean over seeds)"""
    info: dict = field(default_factory=dict)
    """n, m, parameters, seeds, IHVP method, seconds per phase"""

    def mask(self, subset: str) -> np.ndarray:
        coherent = np.array([k != "random" for k in self.kinds])
        return {"random": ~coherent, "coherent": coherent, "all": np.ones_like(coherent)}[subset]

    def correlations(self) -> dict[str, dict[str, dict[str, float]]]:
        """{estimator: {subset: {"spearman", "pearson"}}} (NaN when a subset has < 3 groups)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for j, est in enumerate(ESTIMATORS):
            out[est] = {}
            for subset in SUBSETS:
                m = self.mask(subset)
                a, e = self.actual[m], self.estimates[m, j]
                ok = m.sum() >= 3 and np.ptp(a) > 0 and np.ptp(e) > 0
                out[est][subset] = {"spearman": float(spearmanr(e, a).statistic) if ok else float("nan"),
                                    "pearson": float(pearsonr(e, a).statistic) if ok else float("nan")}
        return out


def markdown_table(results: list[PairResult]) -> str:
    """One row per pair × estimator: Spearman and Pearson on random, coherent and all groups."""
    columns = [f"Spearman {s}" for s in SUBSETS] + [f"Pearson {s}" for s in SUBSETS]
    head = "| pair | estimator | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(SUBSETS))]
    for res in results:
        corr = res.correlations()
        for est in ESTIMATORS:
            cells = [f"{corr[est][s]['spearman']:.3f}" for s in SUBSETS] + [f"{corr[est][s]['pearson']:.3f}" for s in SUBSETS]
            lines.append(f"| {res.name} | {LABELS[est]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(res: PairResult, convex: bool) -> dict[str, dict[str, float | bool]]:
    """The issue's targets on all groups: interaction (exact) ≥ first-order + 0.1, ≥ Basu, ≥ 0.95 (convex)."""
    s = {est: res.correlations()[est]["all"]["spearman"] for est in ESTIMATORS}
    ia = s["interaction_exact"]
    checks: dict[str, dict[str, float | bool]] = {
        "gain_over_first_order": {"value": ia - s["first_order"], "target": 0.1, "met": ia - s["first_order"] >= 0.1},
        "ahead_of_basu": {"value": ia - s["basu"], "target": 0.0, "met": ia > s["basu"]},
    }
    if convex:
        checks["convex_spearman"] = {"value": ia, "target": 0.95, "met": ia >= 0.95}
    return checks


def scatter_plot(res: PairResult, path: Path) -> Path:
    """Estimated vs actual change (symlog axes), one panel per estimator, random (o) and coherent (^) groups."""
    fig, axes = plt.subplots(1, len(ESTIMATORS), figsize=(4 * len(ESTIMATORS), 4), squeeze=False)
    corr = res.correlations()
    lo = min(res.actual.min(), res.estimates.min())
    hi = max(res.actual.max(), res.estimates.max())
    linthresh = max(float(np.percentile(np.abs(res.actual), 10)), 1e-12)  # Δf spans decades: symlog axes
    for j, (ax, est) in enumerate(zip(axes[0], ESTIMATORS)):
        for subset, marker in (("random", "o"), ("coherent", "^")):
            m = res.mask(subset)
            ax.scatter(res.actual[m], res.estimates[m, j], s=14, marker=marker, alpha=0.7, label=subset)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_title(f"{LABELS[est]}\nSpearman {corr[est]['all']['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("actual Δf (retraining)")
        if j == 0:
            ax.set_ylabel("estimated Δf")
            ax.legend(fontsize=8)
    fig.suptitle(res.description, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: list[PairResult], convex: dict[str, bool], out_dir: Path) -> dict:
    """``results.json`` (per pair: groups, actual, estimates, correlations, target checks, info)."""
    pairs: dict[str, Any] = {}
    payload = {"estimators": list(ESTIMATORS), "pairs": pairs}
    for res in results:
        pairs[res.name] = {
            "description": res.description,
            "correlations": res.correlations(),
            "targets": target_checks(res, convex[res.name]),
            "info": res.info,
            "groups": [{"kind": k, "size": int(s), "actual": float(a), **{e: float(v) for e, v in zip(ESTIMATORS, row)}}
                       for k, s, a, row in zip(res.kinds, res.sizes, res.actual, res.estimates)],
        }
    write_json(out_dir / "results.json", payload, indent=1, default=_jsonable)
    return payload


def _jsonable(obj: object) -> object:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)
