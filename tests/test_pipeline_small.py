"""The pipeline on a very small config: stage configs composed from pipeline fields + YAML
sections, step skipping on resume, and (when every stage is importable) a full run whose report
numbers equal lm-eval's result files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iaif.config import ConfigError, config_from_dict, config_from_yaml
from iaif.pipeline import PipelineConfig, _compose, run_pipeline

SMALL = {
    "seeds": [0, 1], "fraction": 0.1, "text": {"max_length": 128},
    "demo_data": {"per_target_family": 20, "per_other_family": 10, "num_filler": 10, "clusters_per_target": 2,
                  "cluster_size": 4, "validation_size": 4, "test_size": 6, "num_countries": 10},
    "warmup": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "training": {"num_epochs": 2, "learning_rate": 1e-3, "effective_batch_size": 4, "per_device_batch_size": 4,
                            "warmup_ratio": 0.0}},
    "extract": {"dim": 128},
    "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "training": {"num_epochs": 1, "learning_rate": 1e-3, "effective_batch_size": 4, "per_device_batch_size": 4,
                            "warmup_ratio": 0.0}},
    "eval": {"batch_size": 8, "max_gen_toks": 8, "dtype": "float32", "limit": 4},
}


def _config(tmp_path: Path, tiny_model_dir: Path, **changes) -> PipelineConfig:
    return config_from_dict(PipelineConfig, {**SMALL, "output_dir": str(tmp_path / "run"), "model": str(tiny_model_dir),
                                             "methods": ["interaction", "less", "first-order", "random"], **changes})


def test_stage_config_is_pipeline_values_then_yaml_section():
    cfg = _compose("train", {"data": {"path": "sel.jsonl"}, "model": {"name_or_path": "m"}, "training": {"seed": 3}},
                   {"training": {"num_epochs": 7}, "lora": {"r": 8}})
    assert (cfg.data.path, cfg.model.name_or_path, cfg.training.seed) == ("sel.jsonl", "m", 3)
    assert (cfg.training.num_epochs, cfg.lora.r) == (7, 8)


def test_bad_section_key_names_the_section():
    with pytest.raises(ValueError, match="pipeline section 'train'"):
        _compose("train", {}, {"no_such_field": 1})


@pytest.mark.parametrize(("section", "typo", "where"), [
    ("warmup", {"training": {"num_epoch": 4}}, "warmup.training.num_epoch"),
    ("extract", {"dim": "big"}, "extract.dim"),
    ("demo_data", {"per_target_famly": 3}, "demo_data.per_target_famly"),
])
def test_section_typo_fails_at_load_naming_file_and_key(tmp_path, section, typo, where):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), section: typo}))
    with pytest.raises(ConfigError, match=f"^{path}: {where}: "):
        config_from_yaml(PipelineConfig, path)
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), section: {}}))
    assert getattr(config_from_yaml(PipelineConfig, path), section) == {}


def test_text_block_typo_fails_at_load_naming_file_and_key(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("text: {template: tulu, max_lenght: 64}\n")
    with pytest.raises(ConfigError, match=f"^{path}: text.max_lenght: Key 'max_lenght' not in 'TextFormat'"):
        config_from_yaml(PipelineConfig, path)
    path.write_text("text: {template: plain}\n")
    with pytest.raises(ConfigError, match=f"^{path}: text.template: "):
        config_from_yaml(PipelineConfig, path)
    path.write_text("extract: {text: {max_lenght: 64}}\n")
    with pytest.raises(ConfigError, match=f"^{path}: extract.text.max_lenght: "):
        config_from_yaml(PipelineConfig, path)


def test_pipeline_does_not_import_the_cli():
    code = "import sys, iaif.pipeline; sys.exit('iaif.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_unknown_method_and_step_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_pipeline(PipelineConfig(output_dir=str(tmp_path), methods=["nope"]))
    with pytest.raises(ValueError, match="unknown method"):
        run_pipeline(PipelineConfig(output_dir=str(tmp_path), steps=["nope"]))


def test_demo_config_parses():
    from iaif.pipeline import demo_config

    cfg = demo_config()
    assert set(cfg.methods) == {"interaction", "less", "first-order", "random", "rds", "embed"} and len(cfg.seeds) >= 3


def test_warmup_step_runs_then_is_skipped(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, steps=["warmup"])
    run_pipeline(cfg)
    ckpt = tmp_path / "run" / "warmup" / "checkpoint-epoch2" / "checkpoint.json"
    stamp = ckpt.stat().st_mtime_ns
    written = yaml.safe_load((tmp_path / "run" / "warmup" / "config.yaml").read_text())
    assert written["training"]["num_epochs"] == 2 and written["data"]["path"].endswith("pool.jsonl")
    run_pipeline(cfg)
    assert ckpt.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_full_small_pipeline_report_matches_lm_eval(tmp_path, tiny_model_dir):
    report = run_pipeline(_config(tmp_path, tiny_model_dir))
    results = json.loads((report.parent / "results.json").read_text())
    assert set(results["methods"]) == {"base", "interaction", "less", "first-order", "random"}
    for run in results["runs"]:
        lm = json.loads((Path(run["eval_dir"]) / "lm_eval_results.json").read_text())["results"]
        em, nll = (results["measures"][m]["scores"][run["method"]] for m in ("score", "answer_nll"))
        for task in ("add", "capital", "larger"):
            seed = str(run["seed"])
            assert em[f"demo/{task}"]["per_seed"][seed] == lm[f"iaif_demo_{task}"]["exact_match,none"]
            assert nll[f"demo/{task}"]["per_seed"][seed] == lm[f"iaif_demo_{task}_nll"]["answer_nll,none"]
    assert set(results["selections"]) == {"interaction", "less", "first-order", "random-s0", "random-s1"}
    assert all(d["k"] == sum(d["per_task"].values()) and d["wrong_share"] is not None for d in results["selections"].values())


def test_select_per_target_task(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, methods=["first-order", "random"], seeds=[0],
                  select_per_target=True, steps=["warmup", "extract", "select"])
    with pytest.raises(ValueError, match="select_per_target"):
        run_pipeline(dataclasses.replace(cfg, steps=["select", "train"]))
    run_pipeline(cfg)
    out = tmp_path / "run"
    tasks = ["add", "capital", "larger"]
    for task in tasks:
        for name in ("first-order", "random-s0"):
            sel = yaml.safe_load((out / "select" / task / name / "config.yaml").read_text())
            assert [Path(p).parent.name for p in sel["targets"]] == [task]  # .../targets/<task>/validation.jsonl
    assert not (out / "select" / "first-order").exists()
    # the pipeline's one text block reached every stage that renders text
    written = [out / "warmup", out / "features" / "epoch1" / "pool", out / "features" / "epoch2" / "target-add",
               out / "select" / "add" / "first-order"]
    for folder in written:
        assert yaml.safe_load((folder / "config.yaml").read_text())["text"] == {"template": "tulu", "max_length": 128}
    # the per-task selection is the one `iaif select` makes by hand with that task's targets and stores only
    from iaif.selection.select import SelectConfig, run_select, selected_ids
    from iaif.training.data import DataConfig

    data = out / "demo_data"
    by_hand = run_select(SelectConfig(
        method="first-order", pool=DataConfig(path=str(data / "pool.jsonl")), fraction=cfg.fraction,
        targets=[str(data / "targets" / "capital" / "validation.jsonl")], output_dir=str(tmp_path / "by_hand"),
        pool_stores=[str(out / "features" / f"epoch{e}" / "pool") for e in (1, 2)],
        target_stores=[str(out / "features" / f"epoch{e}" / "target-capital") for e in (1, 2)]))
    assert selected_ids(out / "select" / "capital" / "first-order" / "selected.jsonl") == selected_ids(by_hand / "selected.jsonl")
    per_task = {t: set(selected_ids(out / "select" / t / "first-order" / "selected.jsonl")) for t in tasks}
    assert per_task["add"] != per_task["capital"] and per_task["capital"] != per_task["larger"]
