"""``iaif attribute --group FILE``: group attribution of a set of pool examples (METHOD.md §1).

Prints and writes (``attribution.json``) the group's first-order estimate Σ_{a∈S} I(a), its
interaction-aware estimate Σ I + ½ Σ_{a,b∈S} κ(a, b) (predicted change of the mean target loss when
the group is removed, in the features' units), and the largest pairwise interactions with their ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import tyro

from iaif.common.atomic import remove_stale_temps, write_json
from iaif.common.contracts import CheckpointStores
from iaif.common.provenance import write_run_info
from iaif.selection.curvature import Curvature, FeatureSource, influence_terms
from iaif.selection.estimators import pairwise_kappa, quadratic_part
from iaif.selection.select import load_targets, selected_ids

logger = logging.getLogger(__name__)
ATTRIBUTION_FILE = "attribution.json"
WHOLE = "all"
"""The one target group: f is the mean loss over all target examples."""


@dataclass
class AttributeConfig:
    """Settings of `iaif attribute`."""

    group: str = ""
    """File of pool ids: one per line, or JSONL records with `id` (a selected.jsonl works)."""
    targets: list[str] = field(default_factory=list)
    """Target data files (the target f is the mean loss over all their examples)."""
    checkpoints: Annotated[list[CheckpointStores], tyro.conf.Suppress] = field(default_factory=list)
    """YAML only: the feature stores of each checkpoint, as in `iaif select`; or give the flat lists below."""
    pool_stores: list[str] = field(default_factory=list)
    """Pool feature stores, one per checkpoint."""
    target_stores: list[str] = field(default_factory=list)
    """Target feature stores (paired with pool stores by checkpoint)."""
    sampled_target_stores: list[str] = field(default_factory=list)
    """Sampled-label target stores for curvature=gn."""
    curvature: Curvature = "ef"
    """ef | gn | identity, as in `iaif select`."""
    top_pairs: int = 10
    """How many of the largest pairwise interactions (by |κ|) to report."""
    output_dir: str = "runs/attribute"
    """Folder for attribution.json, config.yaml, run_info.json."""
    device: str = "cpu"
    """cpu or cuda[:i]."""
    chunk_rows: int = 16384
    """Rows per chunk when reading features."""
    airrep_model: str = ""
    """Also report AirRep's pooled group score (the folder or airrep.pt of `iaif airrep`; needs pool)."""
    pool: str = ""
    """The pool file holding the group's examples (for airrep_model)."""


def attribute_group(scores: torch.Tensor, curv: torch.Tensor, ids: list[str], scale: float | None,
                    top_pairs: int) -> dict[str, Any]:
    """First-order sum, interaction-aware estimate and the largest |κ| pairs of a group, from its
    individual influences ``scores`` [|S|] and curvature features ``curv`` [|S|, q]."""
    first = float(scores.sum())
    inter = quadratic_part(curv.sum(dim=0), scale)
    pairs: list[tuple[float, int, int]] = []
    for start in range(0, len(ids), 1024):
        block = pairwise_kappa(curv[start : start + 1024], curv, scale)
        rows, cols = torch.triu_indices(block.shape[0], block.shape[1], offset=start + 1)
        vals = block[rows, cols]
        take = torch.topk(vals.abs(), min(top_pairs, vals.numel())).indices
        pairs += [(float(vals[t]), start + int(rows[t]), int(cols[t])) for t in take]
    pairs.sort(key=lambda p: -abs(p[0]))
    return {
        "size": len(ids), "first_order": first, "interaction": inter, "interaction_aware": first + inter,
        "top_pairs": [{"a": ids[a], "b": ids[b], "kappa": v} for v, a, b in pairs[:top_pairs]],
    }


def run_attribute(cfg: AttributeConfig) -> Path:
    """Attribute the group of ``cfg.group``; print the report and write ``attribution.json``."""
    from iaif.selection.checks import check_settings, open_checked_stores

    if not cfg.group:
        raise ValueError("group: give the group file (pool ids, one per line, or JSONL records with 'id')")
    check_settings(cfg)
    ids = selected_ids(cfg.group)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.group}: ids repeat in the group")
    targets = load_targets(cfg.targets)
    stores, ckpts = open_checked_stores(cfg, targets)
    src = FeatureSource(ckpts, stores, cfg.chunk_rows, cfg.device)
    terms = influence_terms(cfg.curvature, src, ids, [t.id for t in targets], [WHOLE] * len(targets))
    report = attribute_group(terms.scores[WHOLE], terms.curv, ids, terms.scale, cfg.top_pairs)
    report["curvature"] = cfg.curvature
    if cfg.airrep_model:
        from iaif.selection.airrep.method import airrep_group_score

        report["airrep"] = airrep_group_score(cfg.airrep_model, cfg.pool, ids, cfg.targets, device=cfg.device)
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "attribute")
    remove_stale_temps(out, [ATTRIBUTION_FILE])
    write_json(out / ATTRIBUTION_FILE, report, indent=2)
    print(f"group of {report['size']} examples ({cfg.group}), curvature {cfg.curvature}")
    print(f"  first-order estimate (sum of individual influences): {report['first_order']:.6g}")
    print(f"  interaction part (½ Σ κ):                             {report['interaction']:.6g}")
    print(f"  interaction-aware estimate:                          {report['interaction_aware']:.6g}")
    if "airrep" in report:
        print(f"  AirRep pooled group score (loss lowered by training on it): {report['airrep']:.6g}")
    print("  largest pairwise interactions κ(a, b):")
    for p in report["top_pairs"]:
        print(f"    {p['kappa']:+.6g}  {p['a']}  {p['b']}")
    return out
