"""Per-example LoRA gradients and their projections against brute force (one example per backward)."""

from __future__ import annotations

import math

import pytest
import torch

from iaif.selection.features.adam import AdamPreconditioner, OptimizerStateError, adam_direction
from iaif.selection.features.batching import group_shards, token_budget_batches
from iaif.selection.features.featurizer import LoraFeaturizer
from iaif.selection.features.per_example_grads import LoraGradientHooks, backward_per_example, find_lora_matrices, per_example_loss
from iaif.selection.features.projection import KroneckerProjector, factor_dims, rademacher_block
from iaif.training.collate import PaddingCollator
from iaif.training.data import IGNORE_INDEX
from iaif.training.lora import quiet_peft_calls


def tiny_lora_model(seed: int = 0, r: int = 4):
    """Random-init 2-layer Llama with a LoRA adapter whose A and B are both random (non-zero gradients)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    with quiet_peft_calls():
        return get_peft_model(base, lora).eval()


def random_examples(lengths: list[int], seed: int = 1) -> list[dict[str, list[int]]]:
    """Token ids with a prompt part (masked) and an answer part of at least two tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 61, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def brute_force_grads(model, examples) -> list[dict[str, torch.Tensor]]:
    """Gradient of each example's mean answer-token loss, one example per backward (no padding)."""
    names = [m.name for m in find_lora_matrices(model)]
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    result = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        logits = model(input_ids=ids).logits
        loss = per_example_loss(logits, torch.tensor([ex["labels"]]))[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        result.append({n: g.detach() for n, g in zip(names, grads)})
    return result


LENGTHS = [5, 12, 9, 12, 4, 7]


@pytest.fixture(scope="module")
def setup():
    model = tiny_lora_model()
    examples = random_examples(LENGTHS)
    truth = brute_force_grads(model, examples)
    return model, examples, truth


def test_per_example_loss_is_the_mean_answer_token_loss_of_each_row():
    """Against a loop over positions: row b's loss is the mean of −log softmax(logits[b, t])[label[b, t+1]]
    over its answer tokens; prompt and padding positions (IGNORE_INDEX) and the last position count for
    nothing, and the gradient reaches only the positions that predict an answer token."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, :6] = IGNORE_INDEX  # one answer token, the last one
    got = per_example_loss(logits, labels)
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t].detach().double(), dim=0)[labels[b, t + 1]]
                 for t in range(6) if labels[b, t + 1] != IGNORE_INDEX]
        assert float(got[b].detach()) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    predicts = torch.zeros(3, 7, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert bool((grad.abs().sum(dim=2) > 0).eq(predicts).all())
    labels[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"batch rows \[1\] have no answer token"):
        per_example_loss(logits, labels)


def test_hook_gradients_equal_brute_force_with_padding(setup):
    model, examples, truth = setup
    matrices = find_lora_matrices(model)
    got: dict[str, torch.Tensor] = {}
    batch = PaddingCollator(0)(examples)  # mixed lengths, right padding
    with LoraGradientHooks(matrices, "full", sink=lambda m, g: got.__setitem__(m.name, g)):
        backward_per_example(model, batch)
    assert set(got) == {m.name for m in matrices}
    for b in range(len(examples)):
        for name, grads in got.items():
            torch.testing.assert_close(grads[b], truth[b][name], rtol=1e-4, atol=1e-6)


def project_truth(truth, model, dim, seed):
    """Independent computation of the factorised projection: P_out G P_inᵀ per module, summed."""
    out = []
    for grads in truth:
        total = torch.zeros(dim)
        for m in find_lora_matrices(model):
            total += KroneckerProjector(seed, m.name, *m.shape, dim).project_weight_grads(grads[m.name][None])[0]
        out.append(total)
    return torch.stack(out)


def test_factorised_fast_path_equals_projected_brute_force(setup):
    model, examples, truth = setup
    feats = LoraFeaturizer(model, "grad", "factorised", dim=256, seed=3)(PaddingCollator(0)(examples))
    torch.testing.assert_close(feats, project_truth(truth, model, 256, 3), rtol=1e-4, atol=1e-5)


def test_dense_projection_equals_explicit_matrix(setup):
    model, examples, truth = setup
    dim = 64
    feats = LoraFeaturizer(model, "grad", "dense", dim=dim, seed=5)(PaddingCollator(0)(examples))
    flat = torch.stack([torch.cat([g[m.name].flatten() for m in find_lora_matrices(model)]) for g in truth])
    from iaif.selection.features.projection import stream_key

    full = rademacher_block(stream_key(5, "dense"), 0, dim, 0, flat.shape[1])
    torch.testing.assert_close(feats, flat @ full.T / math.sqrt(dim), rtol=1e-4, atol=1e-5)


def test_adam_features_equal_formula_on_brute_force(setup):
    model, examples, truth = setup
    shapes = {m.name: m.shape for m in find_lora_matrices(model)}
    g = torch.Generator().manual_seed(7)
    state = {n: {"exp_avg": torch.randn(s, generator=g) * 1e-3, "exp_avg_sq": torch.rand(s, generator=g) * 1e-5,
                 "step": 10} for n, s in shapes.items()}
    adam = AdamPreconditioner(state, (0.9, 0.999), 1e-8, shapes)
    feats = LoraFeaturizer(model, "adam", "factorised", dim=128, seed=1, adam=adam)(PaddingCollator(0)(examples))
    expected = []
    for grads in truth:
        gamma = {}
        for n in shapes:
            m = 0.9 * state[n]["exp_avg"] + 0.1 * grads[n]
            v = 0.999 * state[n]["exp_avg_sq"] + 0.001 * grads[n] ** 2
            gamma[n] = m / (v.sqrt() + 1e-8)
        expected.append(gamma)
    torch.testing.assert_close(feats, project_truth(expected, model, 128, 1), rtol=1e-4, atol=1e-4)


def test_adam_state_must_match_adapter():
    shapes = {"a.weight": (2, 3), "b.weight": (3, 2)}
    good = {n: {"exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s), "step": 1} for n, s in shapes.items()}
    with pytest.raises(OptimizerStateError, match="without state"):
        AdamPreconditioner({"a.weight": good["a.weight"]}, (0.9, 0.999), 1e-8, shapes)
    with pytest.raises(OptimizerStateError, match="state entries not in the adapter"):
        AdamPreconditioner({**good, "c.weight": good["a.weight"]}, (0.9, 0.999), 1e-8, shapes)
    bad_shape = {**good, "b.weight": {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.zeros(2, 3), "step": 1}}
    with pytest.raises(OptimizerStateError, match=r"b.weight': exp_avg has shape \(2, 3\)"):
        AdamPreconditioner(bad_shape, (0.9, 0.999), 1e-8, shapes)
    assert torch.equal(adam_direction(torch.zeros(1, 2), torch.zeros(2), torch.zeros(2), 0.9, 0.999, 1e-8), torch.zeros(1, 2))


def test_features_do_not_depend_on_batching(setup):
    model, examples, _ = setup
    featurizer = LoraFeaturizer(model, "grad", "factorised", dim=256, seed=3)
    whole = featurizer(PaddingCollator(0)(examples))
    lengths = [len(e["input_ids"]) for e in examples]
    for budget in (12, 30):
        rows = torch.zeros_like(whole)
        for batch in token_budget_batches(lengths, budget):
            rows[batch] = featurizer(PaddingCollator(0)([examples[i] for i in batch]))
        torch.testing.assert_close(rows, whole, rtol=1e-4, atol=1e-6)


def test_batches_fill_budget_longest_first():
    lengths = [5, 12, 9, 12, 3, 7, 40]
    batches = token_budget_batches(lengths, 30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    assert batches[1] == [1, 3]  # 12, 12 (ties by index)
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 30
    assert [len(s) for s in group_shards([[0, 1], [2], [3, 4, 5], [6]], 3)] == [2, 1, 1]


def test_rademacher_is_balanced_and_block_consistent():
    full = rademacher_block(123, 0, 64, 0, 1000)
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(full.mean().item()) < 0.01
    torch.testing.assert_close(rademacher_block(123, 10, 5, 300, 50), full[10:15, 300:350], rtol=0, atol=0)
    gram = full @ full.T / 1000  # rows nearly orthogonal
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 5 / math.sqrt(1000)
    assert factor_dims(8192) == (64, 128)
    with pytest.raises(ValueError, match="balanced"):
        factor_dims(8191)


def test_projection_preserves_inner_products_within_jl_tolerance():
    """Inner products of true per-example gradients (r=8 model, D≈8k LoRA parameters) against the
    variance theory predicts: dense Rademacher Var ≤ 2‖g‖²‖h‖²/d; factorised per module
    Var ≤ ((1+2/k_o)(1+2/k_i) − 1)·2‖g_m‖²‖h_m‖², cross-module terms ‖g_m‖²‖h_m'‖²/d. Every pair is
    checked at 4 predicted standard deviations."""
    model = tiny_lora_model(seed=11, r=8)
    examples = random_examples([10, 14, 8, 12, 11, 9], seed=2)
    truth = brute_force_grads(model, examples)
    matrices = find_lora_matrices(model)
    flat = torch.stack([torch.cat([g[m.name].flatten() for m in matrices]) for g in truth])
    true_ip = flat @ flat.T
    norms2 = torch.stack([torch.stack([g[m.name].square().sum() for m in matrices]) for g in truth])  # [N, M]
    dim = 1024
    batch = PaddingCollator(0)(examples)
    k_o, k_i = factor_dims(dim)
    c = (1 + 2 / k_o) * (1 + 2 / k_i) - 1
    for projection in ("dense", "factorised"):
        feats = LoraFeaturizer(model, "grad", projection, dim=dim, seed=0)(batch)
        err = (feats @ feats.T - true_ip).abs()
        if projection == "dense":
            var = 2 * torch.outer(norms2.sum(1), norms2.sum(1)) / dim
        else:
            same = 2 * c * norms2 @ norms2.T
            cross = (torch.outer(norms2.sum(1), norms2.sum(1)) - norms2 @ norms2.T) / dim
            var = same + cross
        assert bool((err <= 4 * var.sqrt()).all()), (projection, (err / var.sqrt()).max())
        # and a useful estimate: relative error of squared norms small
        rel = (feats.square().sum(1) / flat.square().sum(1) - 1).abs()
        assert rel.max() < (0.3 if projection == "factorised" else 0.2)
