"""AlpacaEval: refused offline with an error naming the task; where the Hub is reachable the task only
generates (its metric is the output length) and its samples convert to the judge's input format."""

from __future__ import annotations

import json

import pytest

from iaif.evaluation.lm_eval_runner import EvalConfig, run_eval
from iaif.evaluation.tasks import alpaca_eval, build_tasks


def test_offline_request_is_a_clear_error_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"task 'alpaca_eval' needs network: .*tatsu-lab/alpaca_eval.*HF_HUB_OFFLINE is set"):
        build_tasks(tmp_path / "tasks", ["alpaca_eval", "gsm8k"])
    assert not (tmp_path / "tasks").exists()
    cfg = EvalConfig(model="unused", tasks=["alpaca_eval"], output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="alpaca_eval"):
        run_eval(cfg)


def test_unreachable_hub_is_the_same_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub

    def refuse(self, repo_id, **kwargs):
        raise ConnectionError(f"no route to {repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse)
    with pytest.raises(ValueError, match=r"task 'alpaca_eval' needs network: .*not reachable .*ConnectionError"):
        alpaca_eval.require_hub()


def test_task_yaml_is_generation_only_and_names_the_hub_dataset(monkeypatch, tmp_path):
    monkeypatch.setattr(alpaca_eval, "require_hub", lambda: None)  # as on a host that reaches the Hub
    (entry,) = build_tasks(tmp_path, ["alpaca_eval"]).entries
    assert (entry.lm_eval_name, entry.metric, entry.measure) == ("iaif_alpaca_eval", "output_words,none", "output_words")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert "iaif_alpaca_eval" in tm.all_tasks  # indexed without downloading anything
    text = (tmp_path / "iaif_alpaca_eval" / "iaif_alpaca_eval.yaml").read_text()
    assert "process_results: !function iaif.evaluation.tasks.alpaca_eval.process_results" in text
    assert alpaca_eval.process_results({}, ["Paris is the capital.\n"]) == {"output_words": 4.0}


def test_samples_convert_to_alpaca_eval_model_outputs(tmp_path):
    rows = [{"doc": {"instruction": "Name a colour.", "output": "Blue.", "dataset": "helpful_base"}, "resps": [[" Red. "]]},
            {"doc": {"instruction": "Say hi.", "output": "Hi!", "dataset": "oasst"}, "resps": [["hello"]]}]
    samples = tmp_path / "iaif_alpaca_eval.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    alpaca_eval.main([str(samples), str(tmp_path / "out.json"), "--generator", "m"])
    assert json.loads((tmp_path / "out.json").read_text()) == [
        {"instruction": "Name a colour.", "output": "Red.", "generator": "m", "dataset": "helpful_base"},
        {"instruction": "Say hi.", "output": "hello", "generator": "m", "dataset": "oasst"}]
