"""`iaif subsets`: seeded draws, resume without retraining a finished subset, a torn row cut off, one
table whatever the number of processes, a changed recipe refused."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from iaif.common.atomic import append_line
from iaif.common.contracts import SUBSETS_FILE, read_subset_rows
from iaif.evaluation.lds import subsets as subsets_module
from iaif.evaluation.lds.subsets import SubsetsConfig, draw_subset, run_subsets
from iaif.training.data import DataConfig, TextFormat
from iaif.training.finetune import TrainConfig, TrainingSettings
from iaif.training.lora import LoraSettings, ModelConfig


def _write(path: Path, n: int, seed: int, task: str) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            fh.write(json.dumps({"id": f"{task}{i}", "task": task, "prompt": f"What is {a} plus {b}?",
                                 "completion": f"{a + b}"}) + "\n")
    return str(path)


@pytest.fixture()
def cfg(tmp_path: Path, tiny_model_dir: Path) -> SubsetsConfig:
    pool = _write(tmp_path / "pool.jsonl", 12, 0, "p")
    target = _write(tmp_path / "target.jsonl", 3, 1, "t")
    train = TrainConfig(data=DataConfig(path=pool), model=ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"),
                        lora=LoraSettings(r=2, alpha=4, dropout=0.0),
                        training=TrainingSettings(learning_rate=1e-2, num_epochs=1, lr_scheduler_type="constant", warmup_ratio=0.0,
                                                  effective_batch_size=4,
                                                  per_device_batch_size=4, save_steps=-1),
                        text=TextFormat(max_length=48))
    return SubsetsConfig(train=train, targets=[target], size=4, num_subsets=2, output_dir=str(tmp_path / "out"))


def _rows(cfg: SubsetsConfig) -> dict[int, tuple[list[str], float]]:
    return {r.subset: (r.ids, r.target_loss) for r in read_subset_rows(Path(cfg.output_dir) / SUBSETS_FILE)}


def test_draws_depend_on_seed_and_index_only():
    assert draw_subset(50, 5, 3, 7) == draw_subset(50, 5, 3, 7)
    assert draw_subset(50, 5, 3, 7) != draw_subset(50, 5, 3, 8)
    assert len(set(draw_subset(50, 50, 0, 0))) == 50
    with pytest.raises(ValueError, match="subset size"):
        draw_subset(5, 6, 0, 0)


def _family_shares(ids: list[int], families: list[str]) -> dict[str, float]:
    return {f: sum(families[i] == f for i in ids) / len(ids) for f in sorted(set(families))}


def test_mixture_draws_range_from_one_family_to_the_pool_mix():
    families = ["a"] * 100 + ["b"] * 60 + ["c"] * 40
    draw = draw_subset(200, 20, 1, 4, families, 0.3)
    assert draw == draw_subset(200, 20, 1, 4, families, 0.3) and len(set(draw)) == 20
    # tiny alpha: nearly every subset is (almost) one family
    peaked = [max(_family_shares(draw_subset(200, 20, 0, i, families, 0.01), families).values()) for i in range(40)]
    assert sum(share >= 0.9 for share in peaked) >= 32
    # huge alpha: equal family weights, so each family's share tends to 1/3, unlike the pool's 0.5/0.3/0.2
    flat = [_family_shares(draw_subset(200, 20, 0, i, families, 1e6), families) for i in range(200)]
    for f in "abc":
        assert abs(np.mean([s[f] for s in flat]) - 1 / 3) < 0.04
    with pytest.raises(ValueError, match="mixture_alpha"):
        draw_subset(200, 20, 0, 0, families, 0.0)


def test_resume_trains_only_missing_subsets_and_cuts_a_torn_row(cfg, monkeypatch):
    trained: list[int] = []
    real = subsets_module.train_adapter

    def counting(train_cfg, examples, stage):
        trained.append(int(Path(train_cfg.output_dir).name.split("-")[1]))
        return real(train_cfg, examples, stage)

    monkeypatch.setattr(subsets_module, "train_adapter", counting)
    run_subsets(cfg)
    first = _rows(cfg)
    assert trained == [0, 1] and sorted(first) == [-1, 0, 1]
    pool_ids = [json.loads(x)["id"] for x in Path(cfg.train.data.path).read_text().splitlines()]
    assert first[0][0] == [pool_ids[i] for i in draw_subset(12, 4, 0, 0)]
    assert first[-1][1] > first[0][1] > 0  # training on the pool lowers the target loss
    table = Path(cfg.output_dir) / SUBSETS_FILE
    with open(table, "a", encoding="utf-8") as fh:  # a writer killed in the middle of a row
        fh.write('{"subset": 2, "ids": ["p1"')
    run_subsets(replace(cfg, num_subsets=4))
    assert trained == [0, 1, 2, 3]  # 0 and 1 not trained again
    again = _rows(cfg)
    assert sorted(again) == [-1, 0, 1, 2, 3] and {k: again[k] for k in first} == first
    lines = table.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x) for x in lines)
    assert not (Path(cfg.output_dir) / "work").exists() or not any((Path(cfg.output_dir) / "work").iterdir())


def test_sharded_processes_write_the_table_of_one_process(cfg, tmp_path, monkeypatch):
    from accelerate.state import PartialState

    run_subsets(cfg)
    single = _rows(cfg)
    sharded = replace(cfg, output_dir=str(tmp_path / "sharded"))
    for rank in (1, 0):
        PartialState._reset_state()
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        run_subsets(sharded)
        assert "WORLD_SIZE" not in os.environ  # each process trained alone
    rows = read_subset_rows(Path(sharded.output_dir) / SUBSETS_FILE)
    assert [r.subset for r in rows] == [1, -1, 0]  # rank 1 ran first: its subset, then rank 0's base row and subset
    assert {r.subset: (r.ids, r.target_loss) for r in rows} == single


def test_changed_recipe_is_refused(cfg):
    run_subsets(replace(cfg, num_subsets=1))
    changed = replace(cfg, train=replace(cfg.train, training=replace(cfg.train.training, learning_rate=5e-3)))
    with pytest.raises(ValueError, match="rows of another recipe"):
        run_subsets(changed)


def test_append_line_refuses_a_newline(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        append_line(tmp_path / "t.jsonl", "a\nb")
