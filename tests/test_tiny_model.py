"""The tiny offline base model: loads with from_pretrained, deterministic for a seed, cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from iaif.demo.tiny_model import MARKER_FILE, TinyModelConfig, build_tiny_model


def test_loads_with_from_pretrained(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for special in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok.tokenize(f"a {special} b").count(special) == 1  # never split
    assert model.get_input_embeddings().num_embeddings == len(tok)
    for name in ("config.yaml", "run_info.json", MARKER_FILE):
        assert (tiny_model_dir / name).is_file()

    ids = tok("Which is smaller, 3 or 4?", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()


def test_chat_template_is_tulu(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello</s>\n<|user|>\n2+2?\n<|assistant|>\n4</s>"
    )
    assert tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    )


def test_same_seed_same_weights_and_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = TinyModelConfig.for_tests(output_dir=str(tmp_path / "again"))
    again = build_tiny_model(cfg)
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()

    # a second call with the same config returns the folder without rebuilding it
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cfg) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((again / MARKER_FILE).read_text())["config_hash"] == cfg.config_hash()

    # the same folder with another config is refused, not overwritten
    other = TinyModelConfig.for_tests(output_dir=str(again))
    other.seed = 1
    with pytest.raises(FileExistsError, match="another config"):
        build_tiny_model(other)


def test_default_output_dir_is_keyed_by_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IAIF_CACHE", str(tmp_path))
    a, b = TinyModelConfig(), TinyModelConfig(seed=1)
    assert a.resolved_output_dir().parent == tmp_path
    assert a.resolved_output_dir() != b.resolved_output_dir()
    assert a.resolved_output_dir() == TinyModelConfig().resolved_output_dir()
    assert TinyModelConfig(output_dir="x").config_hash() == a.config_hash()


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "iaif", "build-tiny-model", "--help"],
                         capture_output=True, text=True, check=True).stdout.replace("-", "_")
    for flag in ("__seed", "__hidden_size", "__pretrain_steps", "__output_dir"):
        assert flag in out


def _corpus_file(path: Path, word: str = "zyxwvut", n: int = 60) -> Path:
    rows = [{"question": f"What does {word} number {i} mean?", "answer": f"The {word} {i} is a made-up word."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_model_from_a_local_corpus(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = _corpus_file(tmp_path / "corpus.jsonl")
    cfg = TinyModelConfig.for_tests(output_dir=str(tmp_path / "m"))
    cfg.corpus, cfg.seq_len = [str(corpus)], 32
    out = build_tiny_model(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    text = "What does zyxwvut number 7 mean?"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # the tokenizer was trained on this corpus: its frequent made-up word is (nearly) one token,
    # while the tokenizer of the generated corpus spells it out in pieces
    demo_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok.tokenize(" zyxwvut")) <= 2 < len(demo_tok.tokenize(" zyxwvut"))
    built = json.loads((out / MARKER_FILE).read_text())
    assert built["config"]["corpus"] == [str(corpus)] and built["config_hash"] == cfg.config_hash()


def test_cache_key_follows_the_corpus_content(tmp_path: Path) -> None:
    corpus = _corpus_file(tmp_path / "a.jsonl")
    copy = tmp_path / "b.jsonl"
    copy.write_bytes(corpus.read_bytes())
    key = TinyModelConfig(corpus=[str(corpus)]).config_hash()
    assert key != TinyModelConfig().config_hash()
    assert TinyModelConfig(corpus=[str(copy)]).config_hash() == key  # same content elsewhere: same model
    _corpus_file(corpus, word="qwertyz")
    assert TinyModelConfig(corpus=[str(corpus)]).config_hash() != key


def test_bad_corpus_file_is_named(tmp_path: Path) -> None:
    from iaif.training.data import DataError

    bad = _corpus_file(tmp_path / "bad.jsonl")
    bad.write_text(bad.read_text() + '{"question": "no answer here"}\n')
    cfg = TinyModelConfig.for_tests(output_dir=str(tmp_path / "m"))
    cfg.corpus = [str(bad)]
    with pytest.raises(DataError, match=r"bad\.jsonl:61: field 'answer' missing"):
        build_tiny_model(cfg)
    assert not any(tmp_path.glob("m*"))  # nothing half-written
    cfg.corpus = [str(tmp_path / "absent.jsonl")]
    with pytest.raises(DataError, match=r"absent\.jsonl: field 'corpus' no such file"):
        build_tiny_model(cfg)


def test_folder_of_a_build_killed_before_its_rename_is_removed_by_the_next_build(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    out = build_tiny_model(TinyModelConfig.for_tests(output_dir=str(tmp_path / "model")))
    assert not stale.exists() and (out / MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
