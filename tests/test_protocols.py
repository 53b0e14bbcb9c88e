"""The published protocols (METHOD.md "Pruning and editing", "Interpretability metrics"), each on a case
whose answer is known by construction: hand-built heads, presence values, patches and keypoints.

    per-class top-k without retraining vs stage 2b's removal of unused codes
    local explanation size: per class (weights > 0.1) and per image (PIP-Net)
    PIP-Net purity: the patch rule, the mapping to original pixels, merged left/right parts, the
        denominator (images where the part is visible)
    evidence on defining parts: the class-defining parts of a box
    the dataset reader's class_attributes.txt, and prune's --top-k-per-class / --drop-unused
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.datasets import open_dataset
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing
from pipeline.metrics import (defining_matrix, defining_part_hits, merged_parts, part_fractions, pipnet_part_scores,
                              pipnet_patch_boxes, pipnet_patch_span, preprocessing_as_protocol)
from pipeline.model import (ProtoQuantHead, drop_unused_codes, keep_top_k_weights, local_size_per_class,
                            local_size_per_image)
from tests.conftest import make_cub


def one_hot_grid(codes: list[int], k: int) -> torch.Tensor:
    """A (1, 1, n, k) feature grid whose cell i is exactly code codes[i] (codes are the identity)."""
    return torch.eye(k)[codes][None, None]


# ---- per-class top-k: the curve keeps every code in the softmax; stage 2b removes the unused ones -------------

def test_top_k_weights_keep_every_code_in_the_softmax_and_leave_presence_unchanged() -> None:
    head = ProtoQuantHead(torch.eye(4), num_classes=2, tau=0.1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 2.0, 1.0, 0.5], [0.5, 1.0, 2.0, 3.0]]))
    f = one_hot_grid([1, 2], 4)  # the image holds codes 1 and 2: neither is kept by k = 1
    presence_before = head.presence(f)
    keep_top_k_weights(head, 1)
    assert head.effective_weight().tolist() == [[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]
    assert head.code_mask.all()                               # no code left the head
    assert torch.equal(head.presence(f), presence_before)     # so presence is exactly what the head was trained on
    removed = drop_unused_codes(head)                         # stage 2b's step: codes 1 and 2 leave the softmax
    assert removed == [1, 2] and head.code_mask.tolist() == [True, False, False, True]
    after = head.presence(f)
    assert after[0, 1] == 0 and after[0, 2] == 0
    assert after[0, 0] > presence_before[0, 0] * 100           # renormalised among two codes: 0.5 instead of e^-10
    assert after[0, 0] == pytest.approx(0.5)


def test_top_k_weights_give_removed_codes_no_slot() -> None:
    head = ProtoQuantHead(torch.eye(5), num_classes=1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[9.0, 8.0, 1.0, 2.0, 3.0]]))
    head.remove_codes([0])
    keep_top_k_weights(head, 2)
    assert head.effective_weight().nonzero()[:, 1].tolist() == [1, 4]
    assert drop_unused_codes(head) == [2, 3]  # code 0 was gone already


# ---- local explanation size, both definitions ----------------------------------------------------------------

def test_local_size_per_class_counts_weights_above_0_1() -> None:
    head = ProtoQuantHead(torch.eye(4), num_classes=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.5, 0.1, 0.05, -1.0], [0.2, 0.3, 0.11, 0.0]]))
    assert local_size_per_class(head).tolist() == [1, 3]      # 0.1 itself does not count
    head.remove_codes([1])
    assert local_size_per_class(head).tolist() == [1, 2]


def test_local_size_per_image_needs_presence_and_contribution() -> None:
    head = ProtoQuantHead(torch.eye(4), num_classes=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.5, 0.1, 0.05, 0.0], [0.2, 0.3, 0.11, 0.5]]))
    presence = torch.tensor([[0.5, 0.1, 0.9, 0.9],     # class 0: contributions 0.25, 0.01, 0.045, 0
                             [0.09, 0.5, 0.2, 0.001]])  # class 1: 0.018 (absent), 0.15, 0.022, 0.0005 (too small)
    assert local_size_per_image(head, presence, torch.tensor([0, 1])).tolist() == [3, 2]
    assert local_size_per_image(head, presence, torch.tensor([1, 1])).tolist() == [4, 2]


# ---- PIP-Net purity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cells, index, span", [
    (7, [0, 3, 6], [(0, 32), (96, 128), (192, 224)]),           # 7 x 7 at 224: the cells themselves
    (14, [0, 5, 12, 13], [(0, 32), (75, 107), (180, 212), (192, 224)]),  # skip = round(192 / 13) = 15
    (28, [0, 26, 27], [(0, 32), (182, 214), (192, 224)]),        # skip = 7
    (1, [0], [(0, 224)]),
])
def test_pipnet_patch_span_follows_the_skip_rule(cells, index, span) -> None:
    start, stop = pipnet_patch_span(np.array(index), cells, 224)
    assert list(zip(start.tolist(), stop.tolist())) == [tuple(float(v) for v in s) for s in span]


def test_pipnet_patches_map_onto_the_original_pixels_of_a_squashed_image() -> None:
    squash = Preprocessing((224, 224), 1.0, "squash", (7, 7))
    assert preprocessing_as_protocol(squash)
    assert not preprocessing_as_protocol(Preprocessing((224, 224), 0.875, "center", (7, 7)))
    rows = np.array([[0, -1]])
    cells = np.array([[[1, 2], [0, 0]]])
    boxes = pipnet_patch_boxes(squash, rows, cells, np.array([[448, 112]]), None)
    # cell (h=1, w=2): input x 64..96, y 32..64; the image is 2x wider and half as tall as the input
    np.testing.assert_allclose(boxes[0, 0], [128, 16, 64, 16])
    assert np.isnan(boxes[0, 1]).all()


def test_merged_parts_join_left_and_right() -> None:
    names, index = merged_parts(["back", "left eye", "right eye", "left wing", "Right Wing", "tail"])
    assert names == ["back", "eye", "wing", "tail"] and index.tolist() == [0, 1, 1, 2, 2, 3]


def test_pipnet_part_score_divides_by_the_images_where_the_part_is_visible() -> None:
    boxes = np.tile(np.array([0.0, 0.0, 10.0, 10.0]), (1, 5, 1))  # 5 top images of one code, one patch each
    boxes[0, 4] = np.nan                                          # an empty slot counts nowhere
    keypoints = np.zeros((1, 5, 3, 3))                            # parts: left eye, right eye, tail
    keypoints[0, 0] = [[5, 5, 1], [50, 50, 1], [3, 3, 1]]         # left eye in, right eye out: eye hit; tail hit
    keypoints[0, 1] = [[0, 0, 0], [9.5, 2, 1], [0, 0, 0]]         # right eye on the far edge (10.0): hit
    keypoints[0, 2] = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]           # nothing visible: not in any denominator
    keypoints[0, 3] = [[20, 5, 1], [0, 0, 0], [0, 0, 0]]          # left eye outside: a miss
    _, merge = merged_parts(["left eye", "right eye", "tail"])
    scores = pipnet_part_scores(boxes, keypoints, merge)
    np.testing.assert_allclose(scores, [[2 / 3, 1.0]])            # eye 2 of 3 visible, tail 1 of 1
    # the strict variant: every part over all 4 filled slots, half-open boxes (the far edge is out)
    np.testing.assert_allclose(part_fractions(boxes, keypoints), [[0.25, 0.0, 0.25]])


# ---- evidence on defining parts ------------------------------------------------------------------------------

def test_defining_part_hits_need_a_visible_defining_keypoint_in_the_box() -> None:
    parts = ["beak", "crown", "body"]
    defining_by_class = defining_matrix([["beak", "crown"], ["crown"]], parts, "test")
    assert defining_by_class.tolist() == [[True, True, False], [False, True, False]]
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]] * 4)
    keypoints = np.array([[[2, 2, 1], [50, 50, 1], [3, 3, 1]],    # class 0: the beak is in the box
                          [[2, 2, 1], [50, 50, 1], [3, 3, 1]],    # class 1: the beak does not define it
                          [[2, 2, 0], [4, 4, 1], [0, 0, 0]],      # class 0: the crown is in (the beak is hidden)
                          [[50, 2, 1], [9, 9, 0], [3, 3, 1]]],    # class 0: only the body is in
                         dtype=np.float64)
    predicted = np.array([0, 1, 0, 0])
    hits = defining_part_hits(boxes, keypoints, defining_by_class[predicted])
    assert hits.any(axis=1).tolist() == [True, False, True, False]
    assert hits[:, 0].tolist() == [True, False, False, False]
    with pytest.raises(ProtoquantError, match="part 'tail' defines a class"):
        defining_matrix([["tail"]], parts, "cache.zarr")


# ---- the dataset says which parts define each class ----------------------------------------------------------

def test_cub_reader_reads_class_attributes(tmp_path) -> None:
    truth = make_cub(tmp_path / "cub")
    assert open_dataset(truth.root).class_parts is None  # plain CUB has no such file
    (truth.root / "class_attributes.txt").write_text("1 beak short\n1 tail fan\n3 left eye red\n1 beak short\n")
    assert open_dataset(truth.root).class_parts == [["beak", "tail"], [], ["left eye"]]
    (truth.root / "class_attributes.txt").write_text("1 wing black\n")
    with pytest.raises(ProtoquantError, match=r"class_attributes.txt, line 1: part 'wing' is not in parts/parts.txt"):
        open_dataset(truth.root)
    (truth.root / "class_attributes.txt").write_text("9 beak short\n")
    with pytest.raises(ProtoquantError, match=r"line 1: expected '<class_id of classes.txt> <part> <variant>'"):
        open_dataset(truth.root)


# ---- prune: the curve's cut and stage 2b's removal, named --------------------------------------------------------

def test_prune_top_k_keeps_every_code_and_drop_unused_removes_them(parts_store, tmp_path) -> None:
    import json
    from dataclasses import replace

    from typer.testing import CliRunner

    from cli import app
    from pipeline.model import load_head
    from stages.prune import PruneSettings, prune
    from stages.train import train
    from tests.test_train import FAST

    run = tmp_path / "run"
    train(parts_store["cache"], parts_store["codebook"], run, replace(FAST, epochs=2, probe_epochs=1, codebook_epochs=1))
    curve = prune(run, tmp_path / "k1", PruneSettings(top_k_per_class=1), device="cpu", report=False)
    head, _, _ = load_head(tmp_path / "k1" / "head.safetensors")
    assert head.code_mask.all() and curve.removed_unused == []          # every code still in the softmax
    assert ((head.effective_weight() > 0).sum(dim=1) <= 1).all()
    expected, _, _ = load_head(run / "head.safetensors")
    keep_top_k_weights(expected, 1)
    assert torch.equal(head.weight, expected.weight)                     # exactly the cut, nothing retrained
    used = int((head.effective_weight() > 0).any(dim=0).sum())

    result = CliRunner().invoke(app, ["prune", str(run), "--out", str(tmp_path / "k1d"), "--top-k-per-class", "1",
                                      "--drop-unused", "--no-report", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    removed, _, _ = load_head(tmp_path / "k1d" / "head.safetensors")
    assert int(removed.code_mask.sum()) == used and len(payload["removed_unused"]) == 16 - used
    assert not removed.code_mask[payload["removed_unused"]].any()
    assert "--drop-unused without --finetune-epochs" in result.stderr
    metrics = json.loads((tmp_path / "k1d" / "metrics.json").read_text())
    assert metrics["removed_unused"] == payload["removed_unused"]
