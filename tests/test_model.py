"""pipeline/model.py: the probe, stage A, the stage B head, pruning, explanations and storage.

The head's math is checked on hand-made tensors whose answers are worked out in the comments.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.codebook import save_codebook
from pipeline.errors import ProtoquantError
from pipeline.model import (
    ProbeHead,
    ProtoQuantHead,
    codes_in_use,
    load_head,
    load_probe,
    local_explanation_size,
    mixup,
    pca_projection,
    peak_locations,
    prune_top_k_per_class,
    quantize,
    save_head,
    save_probe,
    stage_a_loss,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def axis_grid() -> torch.Tensor:
    """(1, 2, 2, 4) grid: cell (0,0) = 3*e0, (0,1) = e1, (1,0) = 2*e2, (1,1) = e0 + e1 (float16)."""
    cells = torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [1, 1, 0, 0]])
    return cells.reshape(1, 2, 2, 4).half()  # (4, D) -> (B=1, H=2, W=2, D=4)


# --- stage B head ----------------------------------------------------------------------------------

def test_activation_is_a_softmax_over_codes_and_presence_a_spatial_max() -> None:
    f = torch.randn(3, 4, 5, 8, generator=seeded(0))  # (B, H, W, D)
    head = ProtoQuantHead(torch.randn(6, 8, generator=seeded(1)), num_classes=2)
    a = head.activation(f)  # (B, K, H, W)
    assert a.shape == (3, 6, 4, 5)
    assert torch.allclose(a.sum(dim=1), torch.ones(3, 4, 5))  # sums to 1 over codes at every cell
    assert not torch.allclose(a.sum(dim=(2, 3)), torch.ones(3, 6))  # ... and not over space
    by_hand = (F.cosine_similarity(f[:, None], head.codes[None, :, None, None], dim=-1) / 0.1).softmax(dim=1)
    assert torch.allclose(a, by_hand, atol=1e-6)
    assert torch.equal(head.presence(f), a.amax(dim=(2, 3)))


def test_a_code_equal_to_a_patch_is_present_near_one() -> None:
    codes = torch.eye(4)[:3] * 5.0  # (K=3, D=4): codes along e0, e1, e2, any magnitude
    head = ProtoQuantHead(codes, num_classes=1, tau=0.1)
    p = head.presence(axis_grid())  # (1, 3)
    # at cell (0,0) code 0 has cosine 1 and the others 0: e^10 / (e^10 + 2) = 0.99991
    expected = math.exp(10) / (math.exp(10) + 2)
    assert torch.allclose(p, torch.full((1, 3), expected), atol=1e-6)


def test_logits_are_presence_times_relu_weight() -> None:
    head = ProtoQuantHead(torch.eye(4)[:3], num_classes=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))  # (C=2, K=3)
    f = torch.randn(2, 3, 3, 4, generator=seeded(0))
    p = head.presence(f)  # (B, K)
    by_hand = torch.stack([p[:, 0] * 1.0 + p[:, 2] * 0.5, p[:, 1] * 3.0], dim=1)  # negatives count as 0
    assert torch.allclose(head(f), by_hand, atol=1e-6)
    contributions = head.contributions(p)  # (B, C, K)
    assert contributions.shape == (2, 2, 3)
    assert torch.allclose(contributions.sum(dim=2), head(f), atol=1e-6)
    assert head.l1_penalty().item() == pytest.approx(4.5)


def test_weight_init_is_normal_one_tenth_and_seeded() -> None:
    codes = torch.randn(400, 8, generator=seeded(0))
    weight = ProtoQuantHead(codes, num_classes=50, seed=3).weight.detach()  # (50, 400): 20k draws
    assert weight.mean().item() == pytest.approx(1.0, abs=0.005)
    assert weight.std().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(weight, ProtoQuantHead(codes, num_classes=50, seed=3).weight.detach())
    assert not torch.equal(weight, ProtoQuantHead(codes, num_classes=50, seed=4).weight.detach())


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_negative_and_zero_weights_stay_dead(optimizer_name: str) -> None:
    head = ProtoQuantHead(torch.randn(5, 8, generator=seeded(0)), num_classes=3, train_codes=True)
    with torch.no_grad():
        head.weight[0, :2] = torch.tensor([-0.5, 0.0])
        head.weight[2, 4] = -0.01
    dead = head.weight.detach() <= 0  # (C, K)
    before = head.weight.detach().clone()
    optimizer = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer_name](head.parameters(), lr=0.1)
    head(torch.randn(4, 3, 3, 8, generator=seeded(1))).sum().backward()
    assert torch.equal(head.weight.grad[dead], torch.zeros(3))
    assert (head.weight.grad[~dead] != 0).all()
    assert head.codes.grad.abs().sum() > 1e-6  # trainable codes get (non-zero) gradients in stage B
    optimizer.step()
    assert torch.equal(head.weight.detach()[dead], before[dead])


def test_frozen_codes_are_a_buffer_trainable_codes_a_parameter() -> None:
    codes = torch.randn(5, 8, generator=seeded(0))
    frozen = ProtoQuantHead(codes, num_classes=2)
    trainable = ProtoQuantHead(codes, num_classes=2, train_codes=True)
    assert [name for name, _ in frozen.named_parameters()] == ["weight"]
    assert sorted(name for name, _ in trainable.named_parameters()) == ["codes", "weight"]
    assert "codes" in dict(frozen.named_buffers())


def test_removed_codes_leave_the_softmax() -> None:
    codes = torch.randn(5, 8, generator=seeded(0))
    f = torch.randn(2, 3, 3, 8, generator=seeded(1))
    head = ProtoQuantHead(codes, num_classes=3, seed=2)
    head.remove_codes([1, 3])
    a = head.activation(f)
    assert torch.equal(a[:, [1, 3]], torch.zeros(2, 2, 3, 3))
    assert torch.allclose(a.sum(dim=1), torch.ones(2, 3, 3))
    p = head.presence(f)
    assert torch.equal(p[:, [1, 3]], torch.zeros(2, 2))
    assert torch.equal(head.contributions(p)[:, :, [1, 3]], torch.zeros(2, 3, 2))
    # the same as a head that never had codes 1 and 3
    kept = [0, 2, 4]
    smaller = ProtoQuantHead(codes[kept], num_classes=3)
    with torch.no_grad():
        smaller.weight.copy_(head.weight[:, kept])
    assert torch.allclose(a[:, kept], smaller.activation(f), atol=1e-6)
    assert torch.allclose(head(f), smaller(f), atol=1e-6)
    assert codes_in_use(head).tolist() == [True, False, True, False, True]
    with pytest.raises(ProtoquantError, match="at least one code"):
        head.remove_codes([0, 2, 4])


def test_anchor_penalty_is_one_minus_each_codes_best_cosine_in_the_batch() -> None:
    # a 1 x 1 x 2 grid of unit patches e0 and e1 (axis vectors in 3 dims); code 0 copies e0 (best cosine 1),
    # code 1 = e0 + e2 (best cosine 1/sqrt(2)), code 2 = e2 (best cosine 0, but removed: not counted)
    f = torch.tensor([[[[1.0, 0, 0], [0, 1.0, 0]]]])  # (1, 1, 2, 3)
    codes = torch.tensor([[2.0, 0, 0], [1.0, 0, 1.0], [0, 0, 1.0]])
    head = ProtoQuantHead(codes, num_classes=2, train_codes=True)
    head.remove_codes([2])
    penalty = head.anchor_penalty(head.similarity(f))
    assert float(penalty.detach()) == pytest.approx(((1 - 1) + (1 - 1 / math.sqrt(2))) / 2, abs=1e-6)
    penalty.backward()
    assert float(head.codes.grad[0].abs().sum()) == pytest.approx(0.0, abs=1e-6)  # on its patch: no pull
    assert float(head.codes.grad[1] @ torch.tensor([1.0, 0, -1.0])) < 0  # descent turns code 1 toward e0
    assert head.weight.grad is None  # only the codes feel it


class _Ranks:
    """Two DDP ranks seen from one of them: `other_best` is the other rank's best cosine per code."""

    def __init__(self, own_best: torch.Tensor, other_best: torch.Tensor):
        self.world, self.own_best, self.other_best = 2, own_best, other_best

    def max(self, values):
        return torch.maximum(values, self.other_best)

    def total(self, holds):  # this rank's holds + whether the other rank holds the global best too
        return holds + (self.other_best >= torch.maximum(self.own_best, self.other_best)).float()


@pytest.mark.parametrize("tie", [False, True])
def test_anchor_under_ddp_gives_one_process_gradient_after_averaging(tie) -> None:
    f = torch.tensor([[[[1.0, 0, 0], [0, 1.0, 0]]]])
    codes = torch.tensor([[1.0, 0.2, 0], [0.3, 1.0, 0.5]])
    single = ProtoQuantHead(codes, num_classes=2, train_codes=True)
    single.anchor_penalty(single.similarity(f)).backward()
    mine = ProtoQuantHead(codes, num_classes=2, train_codes=True)
    own_best = mine.similarity(f).amax(dim=(0, 2, 3)).detach()
    other = own_best.clone() if tie else own_best - 0.5  # the other rank: the same best patch, or worse ones
    value = mine.anchor_penalty(mine.similarity(f), ranks=_Ranks(own_best, other))
    assert float(value.detach()) == pytest.approx(float(single.anchor_penalty(single.similarity(f)).detach()))
    value.backward()
    # averaged over the 2 ranks: at a tie both pull (half each, the other rank's half equals ours),
    # otherwise only this rank pulls, 2-fold; either way one process's gradient
    averaged = mine.codes.grad if tie else mine.codes.grad / 2
    torch.testing.assert_close(averaged, single.codes.grad)


def test_peak_locations_are_the_spatial_argmax() -> None:
    a = torch.zeros(1, 2, 3, 4)  # (B, K, H, W)
    a[0, 0, 2, 1] = 1.0
    a[0, 1, 0, 3] = 0.5
    assert peak_locations(a).tolist() == [[[2, 1], [0, 3]]]


# --- stage A -----------------------------------------------------------------------------------------

def test_quantize_substitutes_raw_codes_by_cosine_argmax() -> None:
    codes = torch.tensor([[10.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 3, 0], [2, 2, 0, 0]], requires_grad=True)
    q, idx = quantize(axis_grid(), codes)
    # cell (0,0)=3*e0 -> code 0 (L2 would pick code 3); (0,1)=e1 -> code 1; (1,0) -> 2; (1,1)=e0+e1 -> 3
    assert idx.tolist() == [[[0, 1], [2, 3]]]
    assert torch.equal(q.detach(), codes.detach()[idx])  # raw, not normalised
    q.sum().backward()
    assert torch.equal(codes.grad, torch.ones(4, 4))  # each code gathered once


def test_the_codes_gradient_through_quantize_repeats_bit_for_bit_on_several_threads() -> None:
    """Stage A's gather is index_select: the backward of codes[idx] accumulates on CPU threads in a varying
    order (20 backward passes on 2 threads differed by up to 1e-5), which made two equal runs differ."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        codes = torch.randn(128, 432, generator=generator, requires_grad=True)
        features = torch.randn(64, 14, 14, 432, generator=generator)
        upstream = torch.randn(64, 14, 14, 432, generator=generator)
        gradients = []
        for _ in range(20):
            codes.grad = None
            q, _ = quantize(features, codes)
            (q * upstream).sum().backward()
            gradients.append(codes.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])


def test_stage_a_loss_by_hand_and_gradients_reach_only_codes() -> None:
    probe = ProbeHead(dim=4, num_classes=2)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        probe.linear.bias.copy_(torch.tensor([0.0, 0.5]))
    probe.requires_grad_(False)
    codes = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0], [1, 1, 0, 0]], requires_grad=True)
    f = axis_grid().float().requires_grad_(True)  # (1, 2, 2, 4)
    loss, parts = stage_a_loss(f, codes, probe, torch.tensor([0]), label_smoothing=0.1, dict_weight=1.0)
    # q = codes [0, 1, 2, 3] at the four cells; pooled q = (3, 3, 1, 0) / 4; logits = (0.75, 1.25)
    log_p = torch.log_softmax(torch.tensor([0.75, 1.25]), dim=0)
    ce = -(0.9 * log_p[0] + 0.1 * log_p.mean())  # label smoothing 0.1 over 2 classes
    # (q - f)^2 per cell: (2-3)^2 = 1, (2-1)^2 = 1, (1-2)^2 = 1, 0; mean over 16 elements
    dictionary = 3.0 / 16
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert parts["dict"].item() == pytest.approx(dictionary, abs=1e-7)
    assert loss.item() == pytest.approx(ce.item() + dictionary, abs=1e-6)
    assert parts["accuracy"].item() == 0.0
    loss.backward()
    assert f.grad is None  # stopgrad on the features
    assert probe.linear.weight.grad is None and probe.linear.bias.grad is None
    assert codes.grad is not None and codes.grad.abs().sum() > 0
    _, parts_half = stage_a_loss(f, codes, probe, torch.tensor([0]), dict_weight=0.5)
    assert parts_half["dict"].item() == pytest.approx(dictionary, abs=1e-7)


# --- pruning and explanations ------------------------------------------------------------------------

def test_prune_top_k_per_class_keeps_the_largest_positive_weights() -> None:
    weight = torch.tensor([[0.5, 2.0, -1.0, 1.5], [-0.2, -0.1, 0.25, -0.4]])
    pruned = prune_top_k_per_class(weight, 2)
    assert pruned.tolist() == [[0.0, 2.0, 0.0, 1.5], [0.0, 0.0, 0.25, 0.0]]  # row 2 has one positive
    head = ProtoQuantHead(torch.eye(4), num_classes=2)
    with torch.no_grad():
        head.weight.copy_(pruned)
    assert codes_in_use(head).tolist() == [False, True, True, True]
    head(torch.randn(2, 2, 2, 4, generator=seeded(0))).sum().backward()
    assert torch.equal(head.weight.grad[pruned == 0], torch.zeros(5))  # zero is dead too


def test_local_explanation_size_counts_contributions_above_threshold() -> None:
    contributions = torch.tensor([[[0.5, 0.4, 0.0005, 0.0], [3.0, 0.0, 0.0, 0.0]],    # predicted class 1
                                  [[0.6, 0.3, 0.1, 0.0009], [0.1, 0.0, 0.0, 0.0]]])   # predicted class 0
    logits = contributions.sum(dim=2)  # (B=2, C=2): (0.9005, 3.0), (1.0009, 0.1)
    assert local_explanation_size(contributions, logits).tolist() == [1, 3]  # 0.0009 < 1e-3 * 1.0009
    assert local_explanation_size(contributions, logits, rel_threshold=1e-4).tolist() == [1, 4]


def test_mixup_is_a_seeded_convex_combination() -> None:
    f = torch.randn(6, 2, 2, 3, generator=seeded(0)).half()
    y = F.one_hot(torch.arange(6) % 3, 3)
    f_mix, y_mix = mixup(f, y, alpha=0.4, rng=np.random.default_rng(5))
    f_again, y_again = mixup(f, y, alpha=0.4, rng=np.random.default_rng(5))
    assert torch.equal(f_mix, f_again) and torch.equal(y_mix, y_again)
    assert f_mix.dtype == torch.float32
    assert torch.allclose(y_mix.sum(dim=1), torch.ones(6))
    rng = np.random.default_rng(5)
    lam, partner = rng.beta(0.4, 0.4), torch.from_numpy(rng.permutation(6))
    assert torch.allclose(f_mix, lam * f.float() + (1 - lam) * f.float()[partner])


def test_a_projected_head_compares_projected_patches_with_its_codes() -> None:
    weight, bias = torch.randn(3, 4, generator=seeded(2)), torch.randn(3, generator=seeded(3))  # D = 4 -> d = 3
    codes = torch.randn(5, 3, generator=seeded(4))
    head = ProtoQuantHead(codes, 2, projection=(weight, bias))
    f = axis_grid()
    by_hand = F.cosine_similarity((f.float() @ weight.T + bias)[:, None], codes[None, :, None, None], dim=-1)
    assert torch.allclose(head.similarity(f), by_hand, atol=1e-6)  # (B, K, H, W)
    assert head.feature_dim == 4 and head.embed(f).shape == (1, 2, 2, 3)
    assert not head.projection.weight.requires_grad  # frozen codes, frozen projection
    assert ProtoQuantHead(codes, 2, projection=(weight, bias), train_codes=True).projection.weight.requires_grad
    with pytest.raises(ProtoquantError, match="projection to 3 dimensions needs codes of that size"):
        ProtoQuantHead(torch.randn(5, 4), 2, projection=(weight, bias))


def _layered_grid(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """(B, 4, 6, 7): channels 0-2 vary cell by cell, channels 3-6 are a 2 x 3 map copied over 2 x 2 blocks."""
    fine = torch.randn(batch, 4, 6, 3, generator=seeded(seed))
    coarse = torch.randn(batch, 2, 3, 4, generator=seeded(seed + 1)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.cat([fine, coarse], dim=-1).half()


@pytest.mark.parametrize("coarse_learns", [False, True])
def test_a_training_step_projects_each_coarse_block_once_with_the_same_values_and_gradients(coarse_learns) -> None:
    weight, bias = torch.randn(5, 7, generator=seeded(2)), torch.randn(5, generator=seeded(3))
    plain, blocked = (ProtoQuantHead(torch.randn(4, 5, generator=seeded(4)), 2, train_codes=True,
                                     projection=(weight, bias)) for _ in range(2))
    blocked.grid_maps = [(0, 3, 1, 1, True), (3, 7, 2, 2, coarse_learns)]
    f = _layered_grid()
    embedded = blocked.embed(f)
    assert torch.allclose(embedded, plain.embed(f), atol=1e-5)
    for head in (plain, blocked):
        head.similarity(f).square().sum().backward()
    grad, expected = blocked.projection.weight.grad, plain.projection.weight.grad
    assert torch.allclose(grad[:, :3], expected[:, :3], atol=1e-4)
    if coarse_learns:
        assert torch.allclose(grad[:, 3:], expected[:, 3:], atol=1e-4)
    else:
        assert torch.equal(grad[:, 3:], torch.zeros(5, 4))  # the kept columns get no gradient at all
    with torch.no_grad():  # validation, the push and a saved head project every cell
        assert torch.equal(blocked.embed(f), plain.embed(f))
    assert torch.equal(blocked.eval().embed(f), plain.embed(f))  # so does a head in eval mode, gradients or not
    blocked.train()
    broken = f.clone()
    broken[0, 0, 0, 5] += 1  # a coarse value that differs inside its block: every cell is projected
    assert torch.equal(blocked.embed(broken), plain.embed(broken))


def test_the_projection_starts_as_the_centred_principal_directions() -> None:
    rng = np.random.default_rng(0)
    scale = np.array([5.0, 0.1, 2.0, 0.5])  # variance along e0 > e2 > e3 > e1
    x = rng.normal(size=(4000, 4)) * scale + np.array([1.0, -2.0, 3.0, 0.0])
    batches = [(torch.from_numpy(x[i:i + 1000].reshape(10, 10, 10, 4)).float(), torch.zeros(10)) for i in range(0, 4000, 1000)]
    weight, bias = pca_projection(batches, 2)
    assert weight.shape == (2, 4) and bias.shape == (2,)
    assert torch.allclose(weight.abs(), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]), atol=0.02)
    assert float(weight[0, 0]) > 0 and float(weight[1, 2]) > 0  # signs fixed: the largest entry positive
    projected = torch.from_numpy(x).float() @ weight.T + bias
    assert torch.allclose(projected.mean(dim=0), torch.zeros(2), atol=1e-3)  # centred
    assert torch.allclose(projected.std(dim=0), torch.tensor([5.0, 2.0]), rtol=0.05)
    again = pca_projection(batches, 2)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)
    assert pca_projection(batches, 9)[0].shape == (4, 4)  # at most D directions


# --- storage -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_codes", [False, True])
def test_head_round_trip_is_bit_exact(tmp_path: Path, train_codes: bool) -> None:
    head = ProtoQuantHead(torch.randn(6, 5, generator=seeded(0)), num_classes=3, tau=0.07,
                          train_codes=train_codes, seed=9)
    head.remove_codes([4])
    meta = {"cache_fingerprint": "abc123", "epochs": 3, "val_accuracy": 0.8125}
    save_head(tmp_path / "head.safetensors", head, classes=["owl", "cat", "dog"], meta=meta)
    loaded, classes, loaded_meta = load_head(tmp_path / "head.safetensors")
    assert classes == ["owl", "cat", "dog"] and loaded_meta == meta
    assert loaded.tau == 0.07 and loaded.train_codes is train_codes
    for name in ("codes", "weight", "code_mask"):
        assert torch.equal(getattr(loaded, name), getattr(head, name))
    f = torch.randn(2, 2, 2, 5, generator=seeded(1))
    assert torch.equal(loaded(f), head(f))
    projected = ProtoQuantHead(torch.randn(6, 3, generator=seeded(5)), num_classes=3, train_codes=train_codes,
                               projection=(torch.randn(3, 5, generator=seeded(6)), torch.randn(3, generator=seeded(7))))
    save_head(tmp_path / "projected.safetensors", projected, classes=["owl", "cat", "dog"], meta={})
    loaded, _, _ = load_head(tmp_path / "projected.safetensors")
    assert torch.equal(loaded.projection.weight, projected.projection.weight)
    assert torch.equal(loaded.projection.bias, projected.projection.bias) and loaded.feature_dim == 5
    assert torch.equal(loaded(f), projected(f))
    assert loaded.projection.weight.requires_grad is train_codes
    with pytest.raises(ProtoquantError, match="4 class names for 3 classes"):
        save_head(tmp_path / "bad.safetensors", head, classes=["a", "b", "c", "d"], meta={})


def test_probe_round_trip_and_kind_check(tmp_path: Path) -> None:
    probe = ProbeHead(6, 2)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.randn(2, 6, generator=seeded(1)))
        probe.linear.bias.copy_(torch.tensor([0.5, -0.5]))
    probe.eval().requires_grad_(False)
    save_probe(tmp_path / "probe.safetensors", probe, classes=["a", "b"], meta={"cache_fingerprint": "f00"})
    loaded, classes, meta = load_probe(tmp_path / "probe.safetensors")
    assert classes == ["a", "b"] and meta == {"cache_fingerprint": "f00"}
    assert torch.equal(loaded.linear.weight, probe.linear.weight)
    assert torch.equal(loaded.linear.bias, probe.linear.bias)
    assert not any(p.requires_grad for p in loaded.parameters())
    save_codebook(tmp_path / "codebook.safetensors", torch.zeros(2, 6), {})
    with pytest.raises(ProtoquantError, match="is a protoquant codebook, not a head"):
        load_head(tmp_path / "codebook.safetensors")
    with pytest.raises(ProtoquantError, match="is a protoquant probe, not a head"):
        load_head(tmp_path / "probe.safetensors")


def test_keep_top_k_ignores_removed_codes_and_drops_unused_ones() -> None:
    from pipeline.model import drop_unused_codes, keep_top_k_weights

    head = ProtoQuantHead(torch.eye(6), num_classes=2, seed=0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[9.0, 8.0, 7.0, 1.0, 2.0, 3.0], [9.0, 1.0, 1.0, 8.0, 2.0, 0.5]]))
    head.remove_codes([0, 1])  # the largest weights belong to removed codes: they must not take slots
    keep_top_k_weights(head, 2)
    drop_unused_codes(head)
    weight = head.effective_weight()
    assert ((weight > 0).sum(dim=1) == 2).all()                      # two working weights per class
    assert weight[0].nonzero().flatten().tolist() == [2, 5]
    assert weight[1].nonzero().flatten().tolist() == [3, 4]
    assert head.code_mask.tolist() == [False, False, True, True, True, True]  # every code left is used
    head2 = ProtoQuantHead(torch.eye(6), num_classes=2, seed=0)
    with torch.no_grad():
        head2.weight.copy_(torch.tensor([[9.0, 8.0, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 9.0, 8.0, 0.1, 0.1]]))
    keep_top_k_weights(head2, 2)
    assert head2.code_mask.all()  # the curve's cut keeps every code in the softmax
    drop_unused_codes(head2)
    assert head2.code_mask.tolist() == [True, True, True, True, False, False]  # unused codes leave the softmax
