"""The sparse, grounded head's two pieces on data whose answer is known by construction.

- pipeline/sparsity.py: the non-negative elastic-net path recovers the weights that generated the
  labels, starts from the empty head, and the chosen point obeys the tolerance rule.
- pipeline/grounding.py push_codes: after the push every code is a training patch (cosine 1.0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ProtoquantError
from pipeline.grounding import nearest_patches, push_codes
from pipeline.model import ProtoQuantHead
from pipeline.sparsity import (PathPoint, PathSettings, choose_point, choose_point_by_deviance, fit_nonnegative, penalty_max,
                               regularization_path)
from pipeline.training import code_grounding


def planted_presence(n: int = 900, codes: int = 30, classes: int = 3, seed: int = 0):
    """Presence in [0, 1] and labels drawn from softmax(p W^T) with W planted on 2 codes per class."""
    generator = torch.Generator().manual_seed(seed)
    presence = torch.rand(n, codes, generator=generator)
    weight = torch.zeros(classes, codes)
    for c in range(classes):
        weight[c, [3 * c, 3 * c + 1]] = 12.0
    labels = torch.multinomial((presence @ weight.T).softmax(dim=1), 1, generator=generator).flatten()
    return presence, labels, weight


def test_the_path_recovers_the_planted_sparse_weights() -> None:
    presence, labels, planted = planted_presence()
    train, val = (presence[:600], labels[:600]), (presence[600:], labels[600:])
    points = regularization_path(train, val, 3, PathSettings(points=25, tolerance=0.02))
    chosen = points[choose_point(points, 0.02)]
    assert torch.equal(chosen.weight > 0.1, planted > 0)  # exactly the planted codes, per class
    assert chosen.local_size == 2.0 and chosen.max_class_size == 2
    assert points[0].nonzero == 0  # the path starts at the empty head
    assert points[-1].local_size > chosen.local_size  # and ends denser than the chosen point
    assert chosen.val_top1 >= max(p.val_top1 for p in points) - 0.02


def test_penalty_max_is_where_the_head_becomes_empty() -> None:
    presence, labels, _ = planted_presence(n=300)
    strongest = penalty_max(presence, labels, 3)
    at = fit_nonnegative(presence, labels, 3, penalty=strongest * 1.01, l1_ratio=1.0, iterations=200)
    below = fit_nonnegative(presence, labels, 3, penalty=strongest * 0.5, l1_ratio=1.0, iterations=200)
    assert int((at > 0).sum()) == 0
    assert int((below > 0).sum()) > 0
    assert float(below.min()) >= 0.0  # the projection keeps W non-negative


def test_a_solve_meets_the_optimality_conditions_of_the_nonnegative_elastic_net() -> None:
    """KKT for min CE + lam (a sum(W) + (1 - a) / 2 ||W||^2), W >= 0: where W > 0 the gradient is 0, where W = 0
    it is >= 0. Checked in float64 on a solve that a wrong gradient, sign or bound would break."""
    presence, labels, _ = planted_presence(n=400)
    penalty, l1_ratio = 0.2 * penalty_max(presence, labels, 3), 0.9
    weight = fit_nonnegative(presence, labels, 3, penalty=penalty, l1_ratio=l1_ratio).double()
    p64, onehot = presence.double(), torch.nn.functional.one_hot(labels, 3).double()
    gradient = ((p64 @ weight.T).softmax(dim=1) - onehot).T @ p64 / len(labels)
    gradient += penalty * (1 - l1_ratio) * weight + penalty * l1_ratio
    active = weight > 0
    assert 0 < int(active.sum()) < weight.numel()  # some weights at the bound, some not
    assert float(gradient[active].abs().max()) < 1e-4
    assert float(gradient[~active].min()) > -1e-4


def test_the_path_refuses_non_finite_presence_instead_of_returning_an_empty_head() -> None:
    presence, labels, _ = planted_presence(n=300)
    broken = presence.clone()
    broken[7, 3] = float("nan")
    with pytest.raises(ProtoquantError, match="NaN or infinite"):
        regularization_path((broken[:200], labels[:200]), (presence[200:], labels[200:]), 3)


def _point(size: int, val: float, penalty: float = 1.0) -> PathPoint:
    weight = torch.zeros(2, 20)
    weight[:, :size] = 1.0
    return PathPoint(penalty=penalty, weight=weight, val_top1=val, train_top1=val)


def test_the_chosen_point_is_the_sparsest_within_the_tolerance() -> None:
    points = [_point(1, 0.50), _point(3, 0.86), _point(5, 0.89), _point(8, 0.90), _point(15, 0.88)]
    assert choose_point(points, 0.02) == 2  # size 5 at 0.89 >= 0.90 - 0.02; size 3 at 0.86 is not
    assert choose_point(points, 0.05) == 1
    assert choose_point(points, 0.0) == 3  # no tolerance: the best, sparser than the later ties
    ties = [_point(4, 0.80), _point(4, 0.85), _point(6, 0.85)]
    assert choose_point(ties, 0.1) == 1  # same size: the higher validation score
    assert choose_point([_point(2, math.nan), _point(9, math.nan)], 0.01) == 1  # no validation: no cut
    # one standard error on 100 validation images at 0.90 is 0.03: size 5 (0.89) qualifies, size 3 (0.86) not
    assert choose_point(points, 0.0, n_val=100) == 2
    assert choose_point(points, 0.0, n_val=25) == 1  # 0.06 on 25 images: size 3 at 0.86 qualifies


def test_the_deviance_rule_takes_the_sparsest_point_within_one_standard_error_of_the_lowest_loss() -> None:
    def point(size: int, loss: float, se: float) -> PathPoint:
        weight = torch.zeros(2, 10)
        weight[:, :size] = 1.0  # `size` weights > 0.1 in each class
        return PathPoint(penalty=1.0, weight=weight, val_top1=0.5, train_top1=0.5, val_loss=loss, val_loss_se=se)

    points = [point(1, 1.20, 0.05), point(3, 0.64, 0.05), point(5, 0.58, 0.05), point(8, 0.55, 0.04), point(9, 0.56, 0.1)]
    assert choose_point_by_deviance(points) == 2  # lowest 0.55 (se 0.04): 0.58 <= 0.59 qualifies, 0.64 does not
    points[3] = point(8, 0.55, 0.1)
    assert choose_point_by_deviance(points) == 1  # a noisier minimum: 0.64 <= 0.65 qualifies too
    assert choose_point_by_deviance([point(2, math.nan, math.nan), point(9, math.nan, math.nan)]) == 1  # no val: no cut


def test_neither_rule_picks_a_head_that_leaves_a_class_without_weights() -> None:
    def point(weighted_classes: int, loss: float, val: float) -> PathPoint:
        weight = torch.zeros(3, 10)
        weight[:weighted_classes, 0] = 1.0  # classes beyond weighted_classes have no weight at all
        return PathPoint(penalty=1.0, weight=weight, val_top1=val, train_top1=val, val_loss=loss, val_loss_se=0.5)

    # a 4-image validation split: one standard error (0.5) admits the empty head and a head missing a class
    points = [point(0, 1.10, 0.25), point(2, 1.00, 0.50), point(3, 0.90, 0.75), point(3, 0.95, 0.75)]
    assert choose_point_by_deviance(points) == 2
    assert choose_point(points, 0.5) == 2
    assert choose_point_by_deviance(points[:2]) == 1  # no head weighs every class: the lowest loss


def test_a_refit_over_its_memory_takes_the_same_share_of_every_class_and_fits() -> None:
    import numpy as np
    from pipeline.sparsity import MIN_REFIT_ROWS_PER_CLASS, refit_bytes, refit_sample

    labels = np.repeat([0, 1, 2], [300, 120, 30])  # unbalanced classes
    rows = np.arange(450)
    train, val = rows[rows % 10 != 0], rows[rows % 10 == 0]
    per_row = refit_bytes(1, 64, 3)
    same = refit_sample(train, val, labels, codes=64, classes=3, budget=per_row * 450, seed=0)
    assert same[0] is train and same[1] is val and same[2] == 1.0  # fits: every row
    budget = per_row * 150
    sub_train, sub_val, share = refit_sample(train, val, labels, codes=64, classes=3, budget=budget, seed=0)
    assert refit_bytes(len(sub_train) + len(sub_val), 64, 3) <= budget
    assert share == pytest.approx((len(sub_train) + len(sub_val)) / 450) and 0.25 < share <= 1 / 3
    assert set(sub_train) <= set(train) and set(sub_val) <= set(val) and list(sub_train) == sorted(sub_train)
    counts = np.bincount(labels[sub_train], minlength=3)
    assert counts[2] == MIN_REFIT_ROWS_PER_CLASS  # the small class keeps its floor (a third of 27 is 9)
    assert counts[0] / 270 == pytest.approx(counts[1] / 108, abs=0.02)  # the same share of the others
    again = refit_sample(train, val, labels, codes=64, classes=3, budget=budget, seed=0)
    other = refit_sample(train, val, labels, codes=64, classes=3, budget=budget, seed=1)
    assert np.array_equal(again[0], sub_train) and not np.array_equal(other[0], sub_train)  # seeded
    with pytest.raises(ProtoquantError, match=r"even 10 rows per class need 11\.6 KB of --refit-memory's 7\.0 KB.*--sparsity topk"):
        refit_sample(train, val, labels, codes=64, classes=3, budget=per_row * 20, seed=0)  # the floors: 30 + 3 rows
    many = np.repeat(np.arange(991), 14)  # many small classes: the floors take most of a tight budget
    rows = np.arange(len(many))
    train, val = rows[rows % 14 < 12], rows[rows % 14 >= 12]
    floors = refit_bytes(991 * 11, 64, 991)
    sub_train, sub_val, _ = refit_sample(train, val, many, codes=64, classes=991, budget=int(1.2 * floors), seed=0)
    assert refit_bytes(len(sub_train) + len(sub_val), 64, 991) <= 1.2 * floors
    assert (np.bincount(many[sub_train], minlength=991) >= 10).all() and (np.bincount(many[sub_val], minlength=991) >= 1).all()


def test_an_imagenet_sized_refit_is_sampled_to_its_memory_or_refused_before_training() -> None:
    import numpy as np
    from pipeline.sparsity import refit_bytes
    from pipeline.training import TrainSettings, check_train_settings, refit_rows

    with pytest.raises(ProtoquantError, match=r"--refit-memory 'lots' is not a size.*auto.*all"):
        check_train_settings(TrainSettings(refit_memory="lots"))  # the library guard, before any work
    labels = np.arange(1_281_167) % 1000
    train, val = np.arange(1_150_000), np.arange(1_150_000, 1_281_167)  # presence 9.5 GiB, the solver's (N, C) 38 GiB
    sub_train, sub_val, record = refit_rows(TrainSettings(), train, val, labels, codes=2000, classes=1000,
                                            available=16 << 30)  # auto: half of it
    assert refit_bytes(record["refit_rows"], 2000, 1000) <= 8 << 30 and record["refit_budget_bytes"] == 8 << 30
    assert record["of_rows"] == 1_281_167 and 0.15 < record["refit_share"] < 0.17
    assert len(sub_train) + len(sub_val) == record["refit_rows"] and np.isin(sub_val, val).all()
    with pytest.raises(ProtoquantError, match=r"1281167 rows x 2000 codes, about 51\.2 GB.*--sparsity topk"):
        refit_rows(TrainSettings(refit_memory="all"), train, val, labels, codes=2000, classes=1000, available=8 << 30)
    fixed = refit_rows(TrainSettings(refit_memory="4GB"), train, val, labels, codes=2000, classes=1000, available=64 << 30)
    assert refit_bytes(fixed[2]["refit_rows"], 2000, 1000) <= 4 * 10**9
    everything = refit_rows(TrainSettings(refit_memory="all"), train, val, labels, codes=2000, classes=1000,
                            available=64 << 30)
    assert everything[0] is train and everything[2]["refit_share"] == 1.0
    assert refit_rows(TrainSettings(sparsity="topk"), train, val, labels, codes=2000, classes=1000,
                      available=1 << 30)[2] == {}  # no presence matrix


def test_push_makes_every_code_a_training_patch() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(12, 3, 3, 32, generator=generator)  # 12 images, 3 x 3 grid, 32 dims
    codes = torch.randn(6, 32, generator=generator)
    head = ProtoQuantHead(codes, 2)
    batches = [(features[i:i + 5], torch.zeros(len(features[i:i + 5]), dtype=torch.long)) for i in range(0, 12, 5)]
    before = nearest_patches(head.codes, batches)
    assert float(before.cosine.max()) < 0.99  # random codes sit off the data
    assert len(set(before.patch.tolist())) == 6  # each on its own patch
    report = push_codes(head, batches)
    patches = features.flatten(0, 2)  # (108, 32)
    for code, where in zip(head.codes, before.patch.tolist()):
        assert torch.equal(code, patches[where])  # the code IS that training patch
    grounding = code_grounding(head, _Batches(batches), device=torch.device("cpu"))
    assert torch.allclose(grounding, torch.ones(6), atol=1e-6)
    assert report["duplicates_removed"] == 0 and report["mean_cosine_before"] == pytest.approx(float(before.cosine.mean()))


def test_a_projected_head_is_pushed_onto_projected_training_patches_and_stays_there() -> None:
    from pipeline.training import freeze_codes

    generator = torch.Generator().manual_seed(2)
    features = torch.randn(12, 3, 3, 32, generator=generator)
    weight, bias = torch.randn(8, 32, generator=generator), torch.randn(8, generator=generator)  # D = 32 -> d = 8
    head = ProtoQuantHead(torch.randn(6, 8, generator=generator), 2, projection=(weight, bias), train_codes=True)
    batches = [(features[i:i + 5], torch.zeros(len(features[i:i + 5]), dtype=torch.long)) for i in range(0, 12, 5)]
    projected = features.flatten(0, 2) @ weight.T + bias  # (108, 8): the patches as the codes see them
    expected = F.normalize(head.codes.detach(), dim=1) @ F.normalize(projected, dim=1).T  # (6, 108)
    push_codes(head, batches)
    freeze_codes(head)
    for code, where in zip(head.codes, expected.argmax(dim=1).tolist()):
        assert torch.allclose(code, projected[where], atol=1e-5)  # the code IS that patch's projection
    assert torch.allclose(code_grounding(head, _Batches(batches), device=torch.device("cpu")), torch.ones(6), atol=1e-5)
    assert not head.projection.weight.requires_grad and not head.projection.bias.requires_grad  # frozen with the codes


def test_two_codes_on_one_patch_keep_one() -> None:
    features = torch.eye(4).reshape(1, 2, 2, 4)  # four orthogonal patches
    codes = torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [0, 0, 0, 1.0]])  # codes 0 and 1 share patch 0
    head = ProtoQuantHead(codes, 2)
    report = push_codes(head, [(features, torch.zeros(1, dtype=torch.long))])
    assert report["duplicates_removed"] == 1
    assert head.code_mask.tolist() == [True, False, True]
    assert torch.equal(head.codes[0], torch.tensor([1.0, 0, 0, 0]))


class _Batches:
    """A list of batches that answers like a FeatureSource."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, epoch: int = 0):
        return iter(self._batches)
