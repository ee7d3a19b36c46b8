"""`iaif select` / `iaif attribute` end to end on small feature stores written in the store format."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iaif.cli import main
from iaif.common.contracts import CheckpointStores
from iaif.config import ConfigError, config_from_yaml
from iaif.selection.attribute import AttributeConfig, run_attribute
from iaif.selection.estimators import ef_group_estimate
from iaif.selection.features.fingerprint import dataset_fingerprint, write_digests
from iaif.selection.features.store import StoreMismatchError
from iaif.selection.influence import FeatureError, pair_stores
from iaif.selection.select import SelectConfig, duplicate_rate, run_select
from iaif.training.data import DataConfig, TextFormat, TokenizedExample, load_examples, tokenize_examples
from iaif.training.lora import ModelConfig, load_tokenizer

DIM = 6
REPO = Path(__file__).resolve().parents[1]


MAX_LENGTH = 64


def _tokenized(data: str, model: str) -> list[TokenizedExample]:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
    return tokenize_examples(load_examples(data), tokenizer, "tulu", MAX_LENGTH)[0]


def _store(path: Path, ids: list[str], feats: np.ndarray, adapter: str, lr_weight: float,
           data: list[TokenizedExample] | None = None, model: str = "tiny", **meta) -> str:
    """A store in extract's format; ``data``: the tokenised examples its rows come from (fingerprint, digests)."""
    path.mkdir(parents=True)
    np.save(path / "features.npy", feats.astype(np.float16))
    (path / "ids.json").write_text(json.dumps(ids))
    base = {"model": model, "model_revision": None, "template_hash": "h", "projection": "rademacher",
            "projection_seed": 0, "dim": DIM, "projection_version": 1, "dataset_fingerprint": dataset_fingerprint(data or []),
            "dtype": "float16", "adapter_hash": adapter, "lr_weight": lr_weight, "precision": "fp32",
            "checkpoint": f"ckpt-{adapter}", "feature": "adam" if path.parent.name == "pool" else "grad",
            "dataset": path.parent.name, "num_examples": len(ids), "num_excluded": 0, "template": "tulu",
            "max_length": MAX_LENGTH, "lora_parameters": DIM, "normalised": False, "sampled_labels": 0, "sample_seed": None,
            "tool_version": "test"}
    if data is not None:
        write_digests(path, data)
    (path / "meta.json").write_text(json.dumps({**base, **meta}))
    return str(path)


@pytest.fixture()
def setup(tmp_path: Path, tiny_model_dir: Path) -> dict:
    model = str(tiny_model_dir)
    rng = np.random.default_rng(0)
    pool = []
    for i in range(30):
        rec = {"id": f"p{i}", "task": "fam1" if i % 2 else "fam2", "messages": [
            {"role": "user", "content": f"question {i % 25}"}, {"role": "assistant", "content": f"answer {i % 25}"}],
            "meta": {"cluster": "c1" if i in (3, 4) else None}}
        pool.append(rec)
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool))
    target_files = []
    for task in ("a", "b"):
        f = tmp_path / f"{task}.jsonl"
        f.write_text("".join(json.dumps({"id": f"{task}{j}", "task": task, "question": "q", "answer": "x"}) + "\n"
                             for j in range(3)))
        target_files.append(str(f))
    pool_ids = [r["id"] for r in pool if r["id"] != "p29"]  # p29: excluded at extraction (e.g. truncated answer)
    tok_pool = [t for t in _tokenized(str(pool_file), model) if t.id != "p29"]
    tok_targets = [t for f in target_files for t in _tokenized(f, model)]
    tids = [f"{t}{j}" for t in ("a", "b") for j in range(3)]
    pf = [rng.normal(size=(len(pool_ids), DIM)) + 0.5 for _ in range(2)]
    for f in pf:
        f[1] = f[0]  # p0 and p1 identical features
    tf = [rng.normal(size=(6, DIM)) + 0.5 for _ in range(2)]
    stores = tmp_path / "stores"
    pool_stores = [_store(stores / "pool" / f"c{c}", pool_ids, pf[c], f"ad{c}", w, tok_pool, model)
                   for c, w in enumerate((0.6, 0.4))]
    for folder in pool_stores:
        (Path(folder) / "excluded.json").write_text(json.dumps([{"id": "p29", "source": str(pool_file), "line": 30,
                                                                  "reason": "no answer tokens"}]))
    target_stores = [_store(stores / "tgt" / f"c{c}", tids, tf[c], f"ad{c}", w, tok_targets, model)
                     for c, w in enumerate((0.6, 0.4))]
    return {"tmp": tmp_path, "pool": str(pool_file), "targets": target_files, "pool_stores": pool_stores,
            "target_stores": target_stores, "pf": pf, "tf": tf, "pool_ids": pool_ids, "tids": tids, "model": model,
            "tok_pool": tok_pool, "tok_targets": tok_targets}


def _cfg(s: dict, **kw) -> SelectConfig:
    base = dict(pool=DataConfig(path=s["pool"]), targets=s["targets"], pool_stores=s["pool_stores"],
                target_stores=s["target_stores"], output_dir=str(s["tmp"] / "out"), k=6)
    return SelectConfig(**{**base, **kw})


def _phi(s: dict, rows: list[str], normalise: bool = True) -> torch.Tensor:
    """Φ by hand: lr-weighted cosines (normalise) or dot products of the stored fp16 features."""
    def norm(x):
        x = torch.tensor(x.astype(np.float16).astype(np.float32))
        return x / x.norm(dim=1, keepdim=True) if normalise else x
    idx = [s["pool_ids"].index(r) for r in rows]
    return sum(w * norm(s["pf"][c])[idx] @ norm(s["tf"][c]).T for c, w in enumerate((0.6, 0.4)))


def _read(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    return lines, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["interaction", "first-order", "less", "random"])
def test_select_writes_records_and_summary(setup, method):
    out = run_select(_cfg(setup, method=method, combine="round-robin" if method == "interaction" else "sum"))
    lines, summary = _read(out)
    originals = {json.loads(x)["id"]: json.loads(x) for x in Path(setup["pool"]).read_text().splitlines()}
    assert len(lines) == 6 and [r["_iaif"]["rank"] for r in lines] == list(range(6))
    for rec in lines:
        meta = rec["_iaif"]
        assert {k: v for k, v in rec.items() if k != "_iaif"} == originals[meta["id"]] and meta["method"] == method
        assert meta["source"] == setup["pool"] and meta["line"] == int(meta["id"][1:]) + 1
    assert summary["k"] == 6 and sum(summary["counts_per_task"].values()) == 6
    assert (out / "run_info.json").is_file() and (out / "config.yaml").is_file()
    if method != "random":
        assert summary["pool_size"] == 29 and summary["pool_without_features"] == 1
        assert "p29" not in {r["_iaif"]["id"] for r in lines}


@pytest.mark.parametrize("normalise", [False, True])
def test_first_order_is_top_k_of_mean_influence(setup, normalise):
    out = run_select(_cfg(setup, method="first-order", normalise=normalise))
    lines, summary = _read(out)
    phi = _phi(setup, setup["pool_ids"], normalise)
    score = phi[:, :3].mean(1) + phi[:, 3:].mean(1)  # sum of per-task first-order scores
    expected = [setup["pool_ids"][i] for i in torch.topk(score, 6).indices]
    assert [r["_iaif"]["id"] for r in lines] == expected
    assert summary["objective"] == pytest.approx(float(score[torch.topk(score, 6).indices].sum()), rel=1e-4)


def test_cli_select_and_fraction(setup):
    out = setup["tmp"] / "cli"
    main(["select", "--method", "interaction", "--pool.path", setup["pool"], "--targets", *setup["targets"],
          "--pool_stores", *setup["pool_stores"], "--target_stores", *setup["target_stores"],
          "--fraction", "0.2", "--output_dir", str(out)])
    lines, summary = _read(out)
    assert len(lines) == 6  # ceil(0.2 · 29)
    assert set(summary["lambda"]) == {"a", "b"}
    for r in lines:
        m = r["_iaif"]
        assert m["score"] == pytest.approx(m["first_order"] - m["interaction"], abs=1e-6)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("greedy", ["exact", "stochastic"])
def test_select_under_two_processes_writes_the_one_process_selection(setup, greedy):
    """Candidates split over 2 processes (8-row chunks: 16 and 13 of the 29), gloo on CPU."""
    args = ["select", "--method", "interaction", "--pool.path", setup["pool"], "--targets", *setup["targets"],
            "--pool_stores", *setup["pool_stores"], "--target_stores", *setup["target_stores"], "--k", "12",
            "--chunk_rows", "8", "--combine", "round-robin", "--greedy", greedy, "--epsilon", "0.3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    outs = {}
    for world, prefix in ((1, [sys.executable]), (2, launch)):
        outs[world] = setup["tmp"] / f"out{world}"
        run = subprocess.run([*prefix, "-m", "iaif", *args, "--output_dir", str(outs[world])], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    assert (outs[1] / "selected.jsonl").read_text() == (outs[2] / "selected.jsonl").read_text()
    one, two = (json.loads((outs[w] / "summary.json").read_text()) for w in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["lambda"] == two["lambda"] and one["objective"] == two["objective"]
    assert len(_read(outs[1])[0]) == 12


def test_attribute_matches_ef_group_estimate(setup, capsys):
    group = setup["tmp"] / "group.txt"
    group.write_text("p0\np1\np5\n")
    out = run_attribute(AttributeConfig(group=str(group), targets=setup["targets"], pool_stores=setup["pool_stores"],
                                        target_stores=setup["target_stores"], output_dir=str(setup["tmp"] / "attr"),
                                        top_pairs=2))
    report = json.loads((out / "attribution.json").read_text())
    est = ef_group_estimate(_phi(setup, ["p0", "p1", "p5"]))
    assert report["first_order"] == pytest.approx(est.first_order, rel=1e-4)
    assert report["interaction_aware"] == pytest.approx(est.total, rel=1e-4)
    assert {report["top_pairs"][0]["a"], report["top_pairs"][0]["b"]} == {"p0", "p1"}  # identical features
    assert "interaction-aware estimate" in capsys.readouterr().out


def test_duplicate_rate_counts_content_and_clusters(setup):
    ex = {e.id: e for e in load_examples(setup["pool"])}
    assert duplicate_rate([ex["p0"], ex["p25"], ex["p3"], ex["p4"], ex["p7"]]) == pytest.approx(4 / 5)


def _assert_nothing_written(setup):
    out = setup["tmp"] / "out"
    assert not (out / "selected.jsonl").exists() and not (out / "summary.json").exists()


def test_k_larger_than_pool(setup):
    with pytest.raises(ValueError, match="k=40 does not fit a pool of 29"):
        run_select(_cfg(setup, k=40))
    _assert_nothing_written(setup)


def test_empty_pool(setup):
    empty = setup["tmp"] / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        run_select(_cfg(setup, pool=DataConfig(path=str(empty))))
    _assert_nothing_written(setup)


def test_stores_of_other_projection(setup):
    odd = _store(setup["tmp"] / "odd" / "c0", setup["tids"], setup["tf"][0], "ad0", 0.6, projection_seed=1)
    with pytest.raises(StoreMismatchError, match="projection_seed"):
        run_select(_cfg(setup, target_stores=[odd, setup["target_stores"][1]]))
    _assert_nothing_written(setup)


def _pairs(s: dict, targets: tuple[int, int] = (0, 1)) -> list[CheckpointStores]:
    return [CheckpointStores(pool=s["pool_stores"][c], targets=[s["target_stores"][t]]) for c, t in enumerate(targets)]


def test_flat_store_lists_are_paired_by_adapter_hash(setup):
    expected = [CheckpointStores(pool=setup["pool_stores"][c], targets=[setup["target_stores"][c]], adapter_hash=f"ad{c}")
                for c in (0, 1)]
    assert pair_stores(setup["pool_stores"], setup["target_stores"][::-1]) == expected
    odd = _store(setup["tmp"] / "odd" / "c9", setup["tids"], setup["tf"][0], "ad9", 0.6)
    with pytest.raises(StoreMismatchError, match=f"{odd}: target store from a checkpoint without a pool store"):
        pair_stores(setup["pool_stores"], [*setup["target_stores"], odd])


def test_checkpoints_list_selects_as_the_flat_lists_and_replays_from_yaml(setup):
    flat = run_select(_cfg(setup, method="interaction", output_dir=str(setup["tmp"] / "flat")))
    paired = run_select(_cfg(setup, method="interaction", pool_stores=[], target_stores=[], checkpoints=_pairs(setup),
                             output_dir=str(setup["tmp"] / "paired")))
    assert (paired / "selected.jsonl").read_bytes() == (flat / "selected.jsonl").read_bytes()
    main(["select", "--config", str(paired / "config.yaml"), "--output_dir", str(setup["tmp"] / "replay")])
    assert (setup["tmp"] / "replay" / "selected.jsonl").read_bytes() == (flat / "selected.jsonl").read_bytes()


def test_checkpoints_and_flat_lists_together_is_an_error(setup):
    with pytest.raises(ValueError, match="either as `checkpoints` .* or as --pool_stores / --target_stores, not both"):
        run_select(_cfg(setup, checkpoints=_pairs(setup)))


def test_stores_paired_with_another_checkpoint_are_named(setup):
    pool0, tgt1 = setup["pool_stores"][0], setup["target_stores"][1]
    with pytest.raises(StoreMismatchError, match=f"{tgt1}: made from adapter 'ad1', paired with checkpoint {pool0} "):
        run_select(_cfg(setup, pool_stores=[], target_stores=[], checkpoints=_pairs(setup, (1, 0))))
    pairs = _pairs(setup)
    pairs[0].adapter_hash, pairs[0].checkpoint = "ad7", "warmup/checkpoint-epoch1"
    with pytest.raises(StoreMismatchError, match=f"{pool0}: made from adapter 'ad0', paired with checkpoint "
                                                 "warmup/checkpoint-epoch1 \\(adapter_hash 'ad7'\\)"):
        run_select(_cfg(setup, pool_stores=[], target_stores=[], checkpoints=pairs))
    _assert_nothing_written(setup)


def test_checkpoints_typo_fails_at_load_naming_file_and_key(tmp_path):
    path = tmp_path / "select.yaml"
    path.write_text("checkpoints:\n  - pool: a\n    target: [b]\n")
    with pytest.raises(ConfigError, match=f"^{path}: target: Key 'target' not in 'CheckpointStores'"):
        config_from_yaml(SelectConfig, path)


def test_targets_without_features(setup):
    with pytest.raises(FeatureError, match="no target store from the same checkpoint"):
        run_select(_cfg(setup, target_stores=setup["target_stores"][:1]))
    extra = setup["tmp"] / "c.jsonl"
    extra.write_text(json.dumps({"id": "c0", "task": "c", "question": "q", "answer": "x"}) + "\n")
    with pytest.raises(FeatureError, match="no features for 1 example"):
        run_select(_cfg(setup, targets=[*setup["targets"], str(extra)]))
    _assert_nothing_written(setup)


def test_nan_features(setup):
    bad = setup["pf"][0].copy()
    bad[4, 2] = np.nan
    store = _store(setup["tmp"] / "nan" / "c0", setup["pool_ids"], bad, "ad0", 0.6, setup["tok_pool"], setup["model"])
    shutil.copy(Path(setup["pool_stores"][0]) / "excluded.json", store)
    ok = Path(setup["pool_stores"][1])
    with pytest.raises(FeatureError, match="row 4 \\(id 'p4'\\) has NaN"):
        run_select(_cfg(setup, pool_stores=[store, str(ok)]))
    _assert_nothing_written(setup)


def test_gn_curvature_uses_sampled_label_features(setup):
    rng = np.random.default_rng(1)
    sampled_ids = [f"{t}#{r}" for t in setup["tids"] for r in range(2)]
    sf = [rng.normal(size=(12, DIM)) + 0.3 for _ in range(2)]
    sampled = [_store(setup["tmp"] / "sampled" / f"c{c}", sampled_ids, sf[c], f"ad{c}", w, setup["tok_targets"],
                      setup["model"], sampled_labels=2) for c, w in enumerate((0.6, 0.4))]
    out = run_select(_cfg(setup, curvature="gn", sampled_target_stores=sampled, lam=2.0, combine="round-robin",
                          normalise=True))
    lines, summary = _read(out)
    # independent check of the first step: s from true labels, κ from the sampled-label block of task a
    phi = _phi(setup, setup["pool_ids"])
    first = lines[0]["_iaif"]
    i = setup["pool_ids"].index(first["id"])
    assert first["first_order"] == pytest.approx(float(phi[i, :3].mean()), rel=1e-4)
    def norm(x):
        x = torch.tensor(x.astype(np.float16).astype(np.float32))
        return x / x.norm(dim=1, keepdim=True)
    psi = sum(w * norm(setup["pf"][c])[i] @ norm(sf[c][:6]).T for c, w in enumerate((0.6, 0.4)))
    assert first["interaction"] == pytest.approx(2.0 * 0.5 * float(psi @ psi) / 6, rel=1e-4)
    assert summary["lambda"] == {"a": 2.0, "b": 2.0}


def test_identity_curvature_runs_and_logs_parts(setup):
    out = run_select(_cfg(setup, curvature="identity", k=4))
    lines, _ = _read(out)
    assert all(r["_iaif"]["interaction"] > 0 for r in lines)


@pytest.mark.parametrize("method", ["rds", "embed"])
def test_similarity_methods_on_tiny_model(setup, tiny_model_dir, method):
    cfg = _cfg(setup, method=method, model=str(tiny_model_dir), embedder=str(tiny_model_dir), k=5,
               similarity="round-robin", text=TextFormat(max_length=64), batch_size=8)
    lines, summary = _read(run_select(cfg))
    assert len({r["_iaif"]["id"] for r in lines}) == 5 and summary["pool_size"] == 30


# ---------------------------------------------------------------- data read against the stores (issue 12, items 1, 6, 7)


def _rewrite(path: str, edit) -> None:
    records = [json.loads(x) for x in Path(path).read_text().splitlines()]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in edit(records)))


def test_pool_record_edited_after_extraction_is_refused_naming_store_file_and_id(setup):
    def edit(records):
        records[7]["messages"][1]["content"] = "a different answer"
        return records
    _rewrite(setup["pool"], edit)
    with pytest.raises(StoreMismatchError) as err:
        run_select(_cfg(setup))
    msg = str(err.value)
    assert setup["pool_stores"][0] in msg and setup["pool"] in msg and "example 'p7' (line 8)" in msg
    _assert_nothing_written(setup)


def test_pool_contents_shuffled_between_ids_is_refused_at_the_first_differing_id(setup):
    def edit(records):
        records[3]["messages"], records[5]["messages"] = records[5]["messages"], records[3]["messages"]
        return records
    _rewrite(setup["pool"], edit)
    with pytest.raises(StoreMismatchError, match="example 'p3' \\(line 4\\) differs"):
        run_select(_cfg(setup, method="first-order"))
    _assert_nothing_written(setup)


def test_target_record_edited_after_extraction_is_refused_by_select_and_attribute(setup):
    def edit(records):
        records[1]["answer"] = "y"
        return records
    _rewrite(setup["targets"][1], edit)
    with pytest.raises(StoreMismatchError) as err:
        run_select(_cfg(setup))
    assert setup["target_stores"][0] in str(err.value) and setup["targets"][1] in str(err.value)
    assert "example 'b1' (line 2)" in str(err.value)
    group = setup["tmp"] / "group.txt"
    group.write_text("p0\np1\n")
    with pytest.raises(StoreMismatchError, match="example 'b1' \\(line 2\\) differs"):
        run_attribute(AttributeConfig(group=str(group), targets=setup["targets"], pool_stores=setup["pool_stores"],
                                      target_stores=setup["target_stores"], output_dir=str(setup["tmp"] / "attr")))


def test_store_extracted_with_another_template_is_refused(setup):
    meta_file = Path(setup["pool_stores"][1]) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "max_length": 8}))  # the features came from other token ids
    with pytest.raises(StoreMismatchError, match=f"{setup['pool_stores'][1]} does not match .*max_length 8"):
        run_select(_cfg(setup))


def test_pool_examples_not_in_the_store_are_refused_unless_allowed(setup, caplog):
    _rewrite(setup["pool"], lambda recs: recs + [{"id": "p99", "prompt": "new", "completion": "example"}])
    with pytest.raises(ValueError, match="1 pool example\\(s\\) of .* are not in the feature store .* at all "
                                         "\\(e.g. 'p99' at line 31\\).*--allow-missing-features True"):
        run_select(_cfg(setup))
    _assert_nothing_written(setup)
    with caplog.at_level("WARNING"):
        out = run_select(_cfg(setup, allow_missing_features=True))
    lines, summary = _read(out)
    assert "p99" not in {r["_iaif"]["id"] for r in lines}
    assert (summary["pool_excluded_at_extraction"], summary["pool_not_in_store"], summary["pool_size"]) == (1, 1, 29)
    assert "1 pool example(s) were excluded at extraction" in caplog.text  # p29, listed in excluded.json


def test_duplicated_pool_id_missing_from_the_store_is_named_as_a_renamed_duplicate(setup):
    _rewrite(setup["pool"], lambda recs: recs + [{**recs[3], "messages": recs[4]["messages"]}])
    with pytest.raises(ValueError, match="'p3~2' at line 31.*1 of them repeat an id used earlier in the file"):
        run_select(_cfg(setup))


def test_cli_allow_missing_features_flag(setup):
    _rewrite(setup["pool"], lambda recs: recs + [{"id": "p99", "prompt": "new", "completion": "example"}])
    args = ["select", "--method", "first-order", "--pool.path", setup["pool"], "--targets", *setup["targets"],
            "--pool-stores", *setup["pool_stores"], "--target-stores", *setup["target_stores"], "--k", "3",
            "--output-dir", str(setup["tmp"] / "cli")]
    with pytest.raises(SystemExit, match="not in the feature store"):
        main(args)
    main([*args, "--allow-missing-features", "True"])
    assert len(_read(setup["tmp"] / "cli")[0]) == 3


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_left_by_a_killed_select_are_removed_by_the_rerun(setup):
    import os

    out = setup["tmp"] / "out"
    out.mkdir()
    dead = _dead_pid()
    stale = [out / f".selected.jsonl.tmp-{dead}", out / f".summary.json.tmp-{dead}"]
    for path in stale:
        path.write_text("half")
    (out / f".run.tmp-{dead}").mkdir()
    (out / f".run.tmp-{dead}" / "config.yaml").write_text("half")
    other_run = out / f".selected.jsonl.tmp-{os.getppid()}"  # a live process's file: not ours to remove
    other_run.write_text("in progress")
    run_select(_cfg(setup))
    assert not any(p.exists() for p in [*stale, out / f".run.tmp-{dead}"])
    assert other_run.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [other_run.name]


def test_temporary_files_left_by_a_killed_attribute_are_removed_by_the_rerun(setup):
    out = setup["tmp"] / "attr"
    out.mkdir()
    stale = out / f".attribution.json.tmp-{_dead_pid()}"
    stale.write_text("half")
    group = setup["tmp"] / "group.txt"
    group.write_text("p0\np1\n")
    run_attribute(AttributeConfig(group=str(group), targets=setup["targets"], pool_stores=setup["pool_stores"],
                                  target_stores=setup["target_stores"], output_dir=str(out)))
    assert not stale.exists() and (out / "attribution.json").is_file()


def test_less_keeps_its_cosine_recipe_whatever_the_feature_geometry(setup):
    raw = run_select(_cfg(setup, method="less", normalise=False, output_dir=str(setup["tmp"] / "less-raw")))
    cos = run_select(_cfg(setup, method="less", normalise=True, output_dir=str(setup["tmp"] / "less-cos")))
    assert [r["_iaif"]["id"] for r in _read(raw)[0]] == [r["_iaif"]["id"] for r in _read(cos)[0]]
    phi = _phi(setup, setup["pool_ids"], normalise=True)
    best = max(range(len(setup["pool_ids"])), key=lambda i: float(max(phi[i, :3].mean(), phi[i, 3:].mean())))
    assert _read(raw)[0][0]["_iaif"]["id"] == setup["pool_ids"][best]


def test_method_registry_covers_exactly_the_method_names():
    from typing import get_args

    from iaif.selection.select import METHODS, Method

    assert sorted(METHODS) == sorted(get_args(Method))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_select(SelectConfig(method="nope"))  # type: ignore[arg-type]
