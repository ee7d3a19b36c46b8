"""`iaif train` and `iaif warmup` on the tiny model: the answer loss goes down, warm-up
checkpoints hold the Adam state by parameter name, a killed run resumes to the same adapter."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iaif.training import warmup as warmup_module
from iaif.training.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointError,
    adapter_key,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    recorded_adapter_hash,
)
from iaif.training.data import IGNORE_INDEX, DataConfig, TextFormat, load_examples, tokenize_examples
from iaif.training.finetune import TrainConfig, TrainingSettings, run_train
from iaif.training.lora import LoraSettings, ModelConfig, adapter_hash, load_adapter, load_base_model, load_tokenizer
from iaif.training.warmup import EpochCheckpointCallback, WarmupConfig, run_warmup


def write_pool(path: Path, n: int, seed: int = 0, selected: bool = False) -> Path:
    """Small arithmetic chat pool; with ``selected``, in the `iaif select` output shape (`_iaif` field)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rec = {"id": f"ex{i}", "prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            if selected:
                rec["_iaif"] = {"rank": i + 1, "method": "random", "score": 0.0, "id": f"ex{i}"}
            fh.write(json.dumps(rec) + "\n")
    return path


def small_config(cls, pool: Path, model_dir: Path, out: Path, lora_dropout: float = 0.0, **training):
    settings = dict(learning_rate=5e-3, num_epochs=2, effective_batch_size=4, per_device_batch_size=2)
    settings.update(training)
    return cls(data=DataConfig(path=str(pool)), model=ModelConfig(name_or_path=str(model_dir), precision="fp32"),
               lora=LoraSettings(r=4, alpha=16, dropout=lora_dropout), training=TrainingSettings(**settings),
               text=TextFormat(max_length=96), output_dir=str(out))


def answer_token_loss(model: torch.nn.Module, tokenizer, data: Path) -> float:
    """Mean cross-entropy over answer tokens, from a plain forward pass (no Trainer, no model loss)."""
    examples, _ = tokenize_examples(load_examples(str(data)), tokenizer, "tulu", 96)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            targets = torch.tensor(ex.labels[1:])
            keep = targets != IGNORE_INDEX
            logp = torch.log_softmax(logits.float(), dim=-1)[keep]
            total -= logp.gather(1, targets[keep, None]).sum().item()
            count += int(keep.sum())
    return total / count


def test_train_on_selected_subset_lowers_answer_loss(tiny_model_dir: Path, tmp_path: Path):
    """The test tiny model is barely pre-trained (weights near their small init), which damps LoRA
    updates; a deterministic drop of 0.05 nats over 24 steps is still far above rounding."""
    data = write_pool(tmp_path / "selected.jsonl", 8, selected=True)
    cfg = small_config(TrainConfig, data, tiny_model_dir, tmp_path / "run", num_epochs=6, learning_rate=1e-2,
                       effective_batch_size=2)
    cfg.lora.r, cfg.lora.alpha = 8, 32
    tokenizer = load_tokenizer(cfg.model)
    before = answer_token_loss(load_base_model(cfg.model), tokenizer, data)
    out = run_train(cfg)
    after = answer_token_loss(load_adapter(cfg.model, out / "adapter"), tokenizer, data)
    assert after < before - 0.05, (before, after)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trained_examples"] == 8 and summary["global_step"] == 24
    assert (out / "config.yaml").is_file() and (out / "run_info.json").is_file()


@pytest.fixture(scope="module")
def warmup_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[WarmupConfig, Path]:
    """An uninterrupted warm-up: 10 of 20 examples, 3 epochs of 3 optimizer steps, LoRA dropout on."""
    tmp = tmp_path_factory.mktemp("warmup")
    pool = write_pool(tmp / "pool.jsonl", 20)
    cfg = small_config(WarmupConfig, pool, tiny_model_dir, tmp / "full", lora_dropout=0.1, num_epochs=3,
                       effective_batch_size=4, per_device_batch_size=2, save_steps=2)
    cfg.fraction = 0.5
    return cfg, run_warmup(cfg)


def test_warmup_checkpoints_and_mean_learning_rates(warmup_run):
    cfg, out = warmup_run
    paths = list_checkpoints(out)
    assert [p.name for p in paths] == ["checkpoint-epoch1", "checkpoint-epoch2", "checkpoint-epoch3"]
    ckpts = [load_checkpoint(p) for p in paths]
    chosen = json.loads((out / "warmup_examples.json").read_text())
    assert len(chosen) == 10 and len(set(chosen)) == 10
    # mean lr of each epoch against the learning rates the Trainer logged at each optimizer step
    history = json.loads((out / "train_summary.json").read_text())["log_history"]
    logged = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
    assert sorted(logged) == list(range(1, 10))
    for c in ckpts:
        steps = range(3 * (c.epoch - 1) + 1, 3 * c.epoch + 1)
        assert c.mean_lr == pytest.approx(sum(logged[s] for s in steps) / 3, rel=1e-6)
        assert c.global_step == 3 * c.epoch and c.base_model == cfg.model.name_or_path
        assert c.betas == (0.9, 0.999) and c.eps == 1e-8
    assert sum(c.lr_weight for c in ckpts) == pytest.approx(1.0)
    assert ckpts[0].mean_lr > ckpts[1].mean_lr > ckpts[2].mean_lr  # linear decay
    # the hash a checkpoint records (the key of its feature stores) is the hash of its saved adapter
    assert [recorded_adapter_hash(p) for p in paths] == [adapter_hash(c.adapter_dir) for c in ckpts]
    assert len({c.adapter_hash for c in ckpts}) == 3


def test_optimizer_state_is_keyed_by_adapter_parameter_names(warmup_run):
    cfg, out = warmup_run
    ckpt = load_checkpoint(checkpoint_dir(out, 3))
    model = load_adapter(cfg.model, ckpt.adapter_dir, trainable=True)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt.state) == set(shapes) and len(shapes) == 2 * 4 * 2  # A/B x q/k/v/o x 2 layers
    for name, entry in ckpt.state.items():
        assert tuple(entry["exp_avg"].shape) == shapes[name] and entry["step"] == 9
    # the extractor's Adam features take the state as saved
    from iaif.selection.features.adam import AdamPreconditioner

    pre = AdamPreconditioner(ckpt.state, ckpt.betas, ckpt.eps, shapes)
    name = next(iter(shapes))
    grads = torch.randn(3, *shapes[name])
    m = ckpt.betas[0] * ckpt.state[name]["exp_avg"] + (1 - ckpt.betas[0]) * grads
    v = ckpt.betas[1] * ckpt.state[name]["exp_avg_sq"] + (1 - ckpt.betas[1]) * grads**2
    torch.testing.assert_close(pre.direction(name, grads), m / (v.sqrt() + ckpt.eps))


def test_first_adam_moments_match_an_independent_gradient(tiny_model_dir: Path, tmp_path: Path):
    """One optimizer step at lr 0 (first warm-up step) on the whole set: the saved exp_avg must be
    (1-b1) g and exp_avg_sq (1-b2) g^2, g recomputed here by name with a plain forward/backward."""
    pool = write_pool(tmp_path / "pool.jsonl", 6, seed=1)
    cfg = small_config(WarmupConfig, pool, tiny_model_dir, tmp_path / "w", num_epochs=1,
                       effective_batch_size=6, per_device_batch_size=6, max_grad_norm=0.0)
    cfg.fraction = 1.0
    ckpt = load_checkpoint(checkpoint_dir(run_warmup(cfg), 1))
    assert ckpt.mean_lr == 0.0  # the warm-up's first step has lr 0, so the adapter is the initial one

    model = load_adapter(cfg.model, ckpt.adapter_dir, trainable=True)
    tokenizer = load_tokenizer(cfg.model)
    examples, _ = tokenize_examples(load_examples(str(pool)), tokenizer, "tulu", 96)
    n_answer = sum(ex.num_answer_tokens for ex in examples)
    loss = 0.0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum")
    (loss / n_answer).backward()
    b1, b2 = ckpt.betas
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ckpt.state[name]["exp_avg"], (1 - b1) * p.grad, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(ckpt.state[name]["exp_avg_sq"], (1 - b2) * p.grad**2, rtol=1e-3, atol=1e-12)
    assert any(bool(ckpt.state[n]["exp_avg"].abs().sum() > 0) for n in ckpt.state if "lora_B" in n)


class Killed(RuntimeError):
    pass


def test_killed_and_resumed_warmup_ends_with_the_same_adapter(warmup_run, monkeypatch: pytest.MonkeyPatch):
    cfg, full = warmup_run
    cfg = WarmupConfig(**{**vars(cfg), "output_dir": str(full.parent / "resumed")})

    class KillAfterStep4Checkpoint(EpochCheckpointCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:  # mid epoch 2, after checkpoint-epoch1 and trainer/checkpoint-4
                raise Killed

    monkeypatch.setattr(warmup_module, "EpochCheckpointCallback", KillAfterStep4Checkpoint)
    with pytest.raises(Killed):
        run_warmup(cfg)
    with pytest.raises(CheckpointError, match="resume it"):
        list_checkpoints(cfg.output_dir)
    monkeypatch.undo()
    resumed = run_warmup(cfg)

    for epoch in (1, 2, 3):
        a, b = checkpoint_dir(full, epoch), checkpoint_dir(resumed, epoch)
        wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (epoch, key)
        sa, sb = load_checkpoint(a).state, load_checkpoint(b).state
        for name in sa:
            assert torch.equal(sa[name]["exp_avg_sq"], sb[name]["exp_avg_sq"]), (epoch, name)


def test_resume_refuses_changed_settings_and_fresh_start_refuses_old_checkpoints(warmup_run, tmp_path: Path):
    cfg, full = warmup_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    changed = WarmupConfig(**{**vars(cfg), "output_dir": str(out), "sample_seed": 7})
    with pytest.raises(ValueError, match=r"cannot resume with changed settings: sample_seed: 0 \(earlier run\) -> 7 "):
        run_warmup(changed)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        run_warmup(WarmupConfig(**{**vars(cfg), "output_dir": str(out), "resume": False}))


def test_load_checkpoint_rejects_mismatched_or_missing_state(warmup_run, tmp_path: Path):
    _, full = warmup_run

    def broken(edit) -> Path:
        path = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(checkpoint_dir(full, 1), path)
        edit(path)
        return path

    def edit_state(change):
        def edit(path: Path) -> None:
            state = torch.load(path / OPTIMIZER_FILE, weights_only=True)
            change(state)
            torch.save(state, path / OPTIMIZER_FILE)
        return edit

    first = lambda s: next(iter(s["state"]))  # noqa: E731
    cases = {
        "1 adapter parameters without state": edit_state(lambda s: s["state"].pop(first(s))),
        "state entries not in the adapter": edit_state(lambda s: s["state"].update(
            {"base_model.model.extra.lora_A.default.weight": s["state"][first(s)]})),
        "exp_avg has shape": edit_state(lambda s: s["state"][first(s)].update(exp_avg=torch.zeros(3))),
        "needs exp_avg, exp_avg_sq and step": edit_state(lambda s: s["state"][first(s)].pop("exp_avg_sq")),
        "'betas' must be two floats": edit_state(lambda s: s.update(betas=[0.9])),
        "optimizer_state.pt missing": lambda p: (p / OPTIMIZER_FILE).unlink(),
        "field 'lr_weight' missing": lambda p: (p / "checkpoint.json").write_text(json.dumps(
            {k: v for k, v in json.loads((p / "checkpoint.json").read_text()).items() if k != "lr_weight"})),
        "does not match the adapter": lambda p: (p / "adapter" / "adapter_config.json").write_text(json.dumps(
            {**json.loads((p / "adapter" / "adapter_config.json").read_text()), "r": 3})),
    }
    for message, edit in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(broken(edit))
    assert adapter_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_resume_with_a_changed_nested_setting_names_the_field_and_both_values(tmp_path: Path):
    from iaif.common.provenance import write_run_info
    from iaif.training.finetune import TrainConfig, TrainingSettings, _check_resumable

    before = TrainConfig(output_dir=str(tmp_path), training=TrainingSettings(learning_rate=2e-5, num_epochs=4))
    write_run_info(tmp_path, before, "train")
    after = TrainConfig(output_dir=str(tmp_path), training=TrainingSettings(learning_rate=1e-4, num_epochs=4))
    with pytest.raises(ValueError) as err:
        _check_resumable(tmp_path, after, resume=True)
    assert str(err.value) == (f"{tmp_path / 'config.yaml'}: cannot resume with changed settings: "
                              "training.learning_rate: 2e-05 (earlier run) -> 0.0001 (set them back, or use another output_dir)")
    _check_resumable(tmp_path, before, resume=True)  # unchanged: resumes
