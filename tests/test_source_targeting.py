"""scripts/source_targeting.py: the real-text pool and targets (from the shared data folder) and the
matched-source table (against hand counts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from iaif.pipeline import PipelineConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "source_targeting.py"
spec = importlib.util.spec_from_file_location("source_targeting", SCRIPT)
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)  # type: ignore[union-attr]


def _config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(output_dir=str(tmp_path / "run"), pool=str(tmp_path / "data" / "pool.jsonl"),
                          targets={t: str(tmp_path / "data" / f"{t}.jsonl") for t in st.MATCHED_SOURCE},
                          methods=["interaction", "random"], seeds=[3])


def test_pool_and_targets_from_shared_data(shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    info = st.prepare(cfg, shared_data, per_source=4, alpaca=6, per_task=3)
    assert info["pool"] == {**{f"flan_{s}": 4 for s in st.FLAN_SOURCES}, "alpaca": 6}
    first = json.loads(Path(cfg.pool).read_text().splitlines()[0])
    assert first["task"] == "flan_aqua" and first["origin"] == "flan_v2_cot/aqua_train.tsv:1"
    for task, path in cfg.targets.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(rows) == 3 and {r["task"] for r in rows} == {task}
        # no target question occurs in its matched FLAN file (raw text, newlines as FLAN escapes them)
        raw = st._norm((shared_data / "flan_v2_cot" / f"{st.MATCHED_SOURCE[task][5:]}_train.tsv").read_text())
        for r in rows:
            stem = r["messages"][0]["content"].split("\nAnswer Choices:")[0]
            assert st._norm(stem) not in raw, (task, stem)
    assert info["targets"]["strategyqa"]["skipped_in_pool_source_file"] > 0  # the two StrategyQA copies overlap


def test_table_against_hand_counts(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    pool = [{"task": s, "question": f"q{s}{i}", "answer": "a"} for s, n in (("flan_gsm8k", 10), ("alpaca", 30)) for i in range(n)]
    pool += [{"task": f"flan_{s}", "question": f"q{s}", "answer": "a"} for s in ("aqua", "ecqa", "strategyqa")]
    Path(cfg.pool).parent.mkdir(parents=True)
    Path(cfg.pool).write_text("".join(json.dumps(r) + "\n" for r in pool))
    for task, source in st.MATCHED_SOURCE.items():
        for name, counts in (("interaction", {source: 3, "alpaca": 1}), ("random-s3", {"alpaca": 4})):
            folder = Path(cfg.output_dir) / "select" / task / name
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({"k": 4, "counts_per_task": counts}))
    table, data = st.source_table(cfg)
    gsm = data["tasks"]["gsm8k"]
    assert gsm["pool_share"] == 10 / 43 and gsm["interaction"]["share"] == 0.75
    assert gsm["interaction"]["ratio"] == 0.75 / (10 / 43) and gsm["random"]["ratio"] == 0.0
    assert data["tasks"]["aqua"]["interaction"]["ratio"] == 0.75 * 43
    assert "| gsm8k (flan_gsm8k, 0.233) | 0.75 (3.2×) | 0.00 (0.0×) |" in table
