"""AirRep: permutation-invariant pooling, the ranking loss going down on a toy problem (and ranking
held-out groups), greedy on the pooled score against brute force, the train / evaluation split, and
`iaif select --method airrep` writing the same selected.jsonl contract as the other methods."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from iaif.common.contracts import SubsetRow
from iaif.selection.airrep.model import AirRep, AirRepShape, greedy_pooled
from iaif.selection.airrep.stage import embed, load_airrep, save_airrep
from iaif.selection.airrep.train import AirRepTraining, GroupTable, is_heldout, split_rows, train_airrep
from iaif.selection.select import SelectConfig, run_select
from iaif.training.data import DataConfig, load_examples


def test_group_score_is_invariant_to_the_order_of_members():
    torch.manual_seed(0)
    model = AirRep(AirRepShape(8, 6))
    members = torch.randn(3, 5, 8)
    targets = torch.randn(4, 8)
    perm = torch.randperm(5)
    assert torch.allclose(model.group_scores(members, targets), model.group_scores(members[:, perm], targets), atol=1e-6)
    assert not torch.allclose(model.group_scores(members, targets), model.group_scores(members[:, :4], targets))


def _toy(seed: int, groups: int, n: int = 60, d: int = 8, size: int = 6) -> tuple[torch.Tensor, torch.Tensor, GroupTable]:
    """Pool rows whose true effect on the loss is −⟨x, w⟩ plus a saturation penalty on the group's total."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(n, d, generator=gen)
    targets = torch.randn(3, d, generator=gen) * 0.1 + 1.0
    w = targets.mean(dim=0)
    members = torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(groups)])
    gain = (pool[members] @ w).sum(dim=1)
    effects = -gain + 0.05 * gain.clamp(min=0) ** 2
    return pool, targets, GroupTable(members, effects)


def test_ranking_loss_decreases_and_ranks_held_out_groups():
    pool, targets, table = _toy(0, groups=40)
    model, curve = train_airrep(pool, targets, [table], AirRepTraining(dim=8, steps=150, learning_rate=1e-2))
    assert curve[-1] < 0.6 * curve[0]
    more = _toy(0, groups=80)[2]  # the same pool and 40 other groups
    with torch.no_grad():
        scores = model.group_scores(pool[more.members[40:]], targets)
    assert spearmanr(-scores.numpy(), more.effects[40:].numpy()).statistic > 0.7


def test_greedy_on_the_pooled_score_matches_brute_force():
    torch.manual_seed(1)
    model = AirRep(AirRepShape(5, 4)).eval()
    pool, targets = torch.randn(9, 5), torch.randn(3, 5)
    picks, totals, _ = greedy_pooled(model, pool, targets, 4)
    chosen: list[int] = []
    with torch.no_grad():
        for step in range(4):
            rest = [c for c in range(9) if c not in chosen]
            scores = [float(model.group_scores(pool[chosen + [c]].unsqueeze(0), targets)[0]) for c in rest]
            best = rest[int(np.argmax(scores))]
            assert picks[step] == best and totals[step] == pytest.approx(max(scores), rel=1e-4, abs=1e-5)
            chosen.append(best)


def test_split_is_disjoint_and_stable_when_a_table_grows():
    rows = [SubsetRow(-1, [], 2.0, {}, "h", 0.0)] + [SubsetRow(i, ["a"], 1.0, {}, "h", 0.0) for i in range(30)]
    base, train, held = split_rows(rows, 0.5, 3)
    assert base.subset == -1 and {r.subset for r in train}.isdisjoint({r.subset for r in held})
    assert len(train) + len(held) == 30 and 5 < len(held) < 25
    more = rows + [SubsetRow(i, ["a"], 1.0, {}, "h", 0.0) for i in range(30, 50)]
    assert [r.subset for r in split_rows(more, 0.5, 3)[2] if r.subset < 30] == [r.subset for r in held]
    assert all(is_heldout(r.subset, 0.5, 3) for r in held)


def _files(tmp_path: Path) -> tuple[str, str]:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "task": "t", "messages": [
        {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i % 7}"}]}) + "\n"
        for i in range(12)))
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"id": f"t{j}", "task": "a", "question": f"q {j}", "answer": "answer 3"}) + "\n"
                              for j in range(3)))
    return str(pool), str(target)


def test_select_airrep_writes_the_selection_contract(tmp_path, tiny_model_dir):
    pool, target = _files(tmp_path)
    model_dir = str(tiny_model_dir)
    pool_x = embed(load_examples(DataConfig(path=pool)), model_dir, "tulu", 64, 8, "cpu")
    torch.manual_seed(0)
    model = AirRep(AirRepShape(pool_x.shape[1], 4)).eval()
    path = save_airrep(tmp_path / "airrep" / "airrep.pt", model,
                       {"model": model_dir, "template": "tulu", "max_length": 64, "trained_on": []})
    assert load_airrep(path.parent)[1]["model"] == model_dir
    common = dict(pool=DataConfig(path=pool), targets=[target], k=4, batch_size=8)
    out = run_select(SelectConfig(method="airrep", airrep_model=str(path.parent), output_dir=str(tmp_path / "a"), **common))
    ref = run_select(SelectConfig(method="random", output_dir=str(tmp_path / "r"), **common))
    lines = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ref / "selected.jsonl").read_text().splitlines()]
    originals = {json.loads(x)["id"]: json.loads(x) for x in Path(pool).read_text().splitlines()}
    assert [r["_iaif"]["rank"] for r in lines] == list(range(4)) and len({r["_iaif"]["id"] for r in lines}) == 4
    assert set(lines[0]["_iaif"]) == set(ref_lines[0]["_iaif"])
    for rec in lines:
        meta = rec["_iaif"]
        assert {k: v for k, v in rec.items() if k != "_iaif"} == originals[meta["id"]] and meta["method"] == "airrep"
        assert meta["line"] == int(meta["id"][1:]) + 1 and isinstance(meta["score"], float)
    summary = json.loads((out / "summary.json").read_text())
    assert set(json.loads((ref / "summary.json").read_text())) <= set(summary) and summary["k"] == 4
    assert (out / "config.yaml").is_file() and (out / "run_info.json").is_file()


def test_select_airrep_without_a_model_is_a_one_line_error(tmp_path):
    pool, target = _files(tmp_path)
    with pytest.raises(ValueError, match="airrep_model"):
        run_select(SelectConfig(method="airrep", pool=DataConfig(path=pool), targets=[target], k=2,
                                output_dir=str(tmp_path / "x")))
