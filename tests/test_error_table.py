"""docs/ERRORS.md is kept true: every row of its table is a case run here through the `iaif` command,
and the message the user sees must be the row's message, word for word (paths shown as <dir> and
<model>). Stores are made by the real `iaif extract` on the tiny model."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from iaif.cli import main
from iaif.selection.features.extract import ExtractConfig, run_extract
from iaif.training.data import DataConfig, TextFormat
from iaif.training.lora import LoraSettings, ModelConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"


def _records(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Name colour number {i}.", "completion": f"Colour {i % 5} it is."} for i in range(n)]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("errors")
    pool = _write(root / "pool.jsonl", _records(12))
    target = _write(root / "target.jsonl", [{"id": f"t{i}", "question": f"Colour {i}?", "answer": "Blue."} for i in range(3)])
    stores = {}
    for name, data in (("pool", pool), ("target", target)):
        cfg = ExtractConfig(model=ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"),
                            lora=LoraSettings(r=4, alpha=8, dropout=0.0), data=DataConfig(path=data), text=TextFormat(max_length=64),
                            dim=32, output_dir=str(root / "stores" / name))
        stores[name] = str(run_extract(cfg))
    return {"root": root, "model": str(tiny_model_dir), "pool": pool, "target": target, **{f"{k}_store": v for k, v in stores.items()}}


def _select_args(w: dict, pool: str | None = None, *extra: str) -> list[str]:
    return ["select", "--method", "first-order", "--k", "3", "--pool.path", pool or w["pool"], "--targets", w["target"],
            "--pool-stores", w["pool_store"], "--target-stores", w["target_store"],
            "--output-dir", str(w["root"] / "out"), *extra]


def _user_sees(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return str(stop.value.code)


def _bytes_file(w: dict, name: str, second_line: bytes) -> str:
    path = w["root"] / name
    path.write_bytes(json.dumps(_records(1)[0]).encode() + b"\n" + second_line + b"\n")
    return str(path)


def non_utf8(w: dict, **_: object) -> str:
    return _user_sees(_select_args(w, _bytes_file(w, "latin1.jsonl", '{"prompt": "café", "completion": "x"}'.encode("latin-1"))))


def malformed_json(w: dict, **_: object) -> str:
    return _user_sees(_select_args(w, _bytes_file(w, "broken.jsonl", b'{"prompt": "x", "completion": ')))


def missing_local_path(w: dict, monkeypatch: pytest.MonkeyPatch, **_: object) -> str:
    monkeypatch.chdir(w["root"])
    return _user_sees(_select_args(w, "pool.csv"))


def missing_hub_like_path(w: dict, monkeypatch: pytest.MonkeyPatch, **_: object) -> str:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'data/pool' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.chdir(w["root"])
    monkeypatch.setattr(datasets, "load_dataset", offline)
    return _user_sees(_select_args(w, "data/pool"))


def pool_edited(w: dict, **_: object) -> str:
    records = _records(12)
    records[3]["completion"] = "Another answer."
    return _user_sees(_select_args(w, _write(w["root"] / "edited.jsonl", records)))


def target_edited(w: dict, **_: object) -> str:
    edited = w["root"] / "target-edited" / "target.jsonl"
    edited.parent.mkdir(exist_ok=True)
    _write(edited, [{"id": f"t{i}", "question": f"Colour {i}?", "answer": "Red." if i == 2 else "Blue."} for i in range(3)])
    args = _select_args(w)
    args[args.index(w["target"])] = str(edited)
    return _user_sees(args)


def pool_not_in_store(w: dict, **_: object) -> str:
    records = _records(12) + [{"id": "p99", "prompt": "New?", "completion": "Yes."}]
    return _user_sees(_select_args(w, _write(w["root"] / "extra.jsonl", records)))


def repeated_ids(w: dict, caplog: pytest.LogCaptureFixture, **_: object) -> str:
    records = _records(12)
    records.append({**records[1], "completion": "A second p1."})
    pool = _write(w["root"] / "dups.jsonl", records)
    with caplog.at_level(logging.WARNING):
        _user_sees(_select_args(w, pool))
    return "WARNING " + next(r.getMessage() for r in caplog.records if "repeat" in r.getMessage())


def flag(*extra: str) -> Callable[..., str]:
    return lambda w, **_: _user_sees(_select_args(w, None, *extra))


def device_cuda_on_cpu_build(w: dict, **_: object) -> str:
    if torch.version.cuda is not None:
        pytest.skip("this torch build has CUDA")
    return _user_sees(_select_args(w, None, "--device", "cuda"))


def malformed_group_file(w: dict, **_: object) -> str:
    group = w["root"] / "group.jsonl"
    group.write_text('{"id": "p1"}\n{"id": "p2"\n', encoding="utf-8")
    return _user_sees(["attribute", "--group", str(group), "--targets", w["target"], "--pool-stores", w["pool_store"],
                       "--target-stores", w["target_store"], "--output-dir", str(w["root"] / "attr")])


def malformed_yaml(w: dict, **_: object) -> str:
    config = w["root"] / "select.yaml"
    config.write_text("k: 3\nmethod: [first-order\n", encoding="utf-8")
    return _user_sees(["select", "--config", str(config)])


def resume_changed(w: dict, **_: object) -> str:
    from iaif.common.provenance import write_run_info
    from iaif.training.finetune import TrainConfig

    out = w["root"] / "train"
    shutil.rmtree(out, ignore_errors=True)
    write_run_info(out, TrainConfig(data=DataConfig(path=w["pool"]), model=ModelConfig(name_or_path=w["model"]),
                                    output_dir=str(out)), "train")
    (out / "trainer" / "checkpoint-1").mkdir(parents=True)
    return _user_sees(["train", "--data.path", w["pool"], "--model.name-or-path", w["model"], "--output-dir", str(out),
                       "--training.learning-rate", "0.0001"])


CASES: dict[str, Callable[..., str]] = {
    "Byte that is not UTF-8 in a data file": non_utf8,
    "Malformed JSON line": malformed_json,
    "Local path that does not exist": missing_local_path,
    "Path that does not exist and could be a Hub id, offline": missing_hub_like_path,
    "Pool record changed after extraction": pool_edited,
    "Target record changed after extraction": target_edited,
    "Pool examples the pool store was not made from": pool_not_in_store,
    "Repeated ids in a data file (a warning)": repeated_ids,
    "`--chunk-rows 0`": flag("--chunk-rows", "0"),
    "`--lam-factor -2`": flag("--lam-factor", "-2"),
    "`--shortlist 0`": flag("--shortlist", "0"),
    "`--device cuda` on a CPU-only torch": device_cuda_on_cpu_build,
    "`--device gpu`": flag("--device", "gpu"),
    "Malformed group file for `iaif attribute`": malformed_group_file,
    "Malformed YAML given to `--config`": malformed_yaml,
    "Train resume with a changed setting": resume_changed,
}


def doc_rows() -> dict[str, str]:
    """Bad-input class -> message, from the table of docs/ERRORS.md (cells: `| class | example | `message` |`)."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[2].startswith("`") and cells[2].endswith("`"):
            rows[cells[0]] = cells[2][1:-1]
    return rows


def test_every_table_row_has_a_case_and_every_case_a_row():
    assert set(doc_rows()) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_table_message_is_what_the_user_sees(name, world, monkeypatch, caplog):
    seen = CASES[name](world, monkeypatch=monkeypatch, caplog=caplog)
    seen = seen.replace(str(world["root"]), "<dir>").replace(world["model"], "<model>")
    assert "\n" not in seen  # one line
    assert seen == doc_rows()[name]


def test_unchanged_files_pass_the_store_check_of_real_stores(world):
    """The other side of the store rows above: the files the stores were extracted from are accepted."""
    main(_select_args(world))
    lines = (world["root"] / "out" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads((Path(world["pool_store"]) / "digests.json").read_text())[0][0] == "p0"
