"""Interpretability metrics (METHOD.md "Interpretability metrics"); tests check each on a case whose
answer is known by construction.

    purity        PIP-Net protocol (as the authors' adapter runs it) and a stricter variant, from part
                  keypoints; the cache alone, no images
    evidence on defining parts   does the top contribution of a correct prediction sit on a part that
                  defines the predicted class (make-birds' class_attributes.txt); the cache alone
    misalignment  Sacha et al. 2023: PGD on the pixels OUTSIDE the top prototype's box lowers its
                  activation inside it; PAC, PRC, PLC and the accuracy change
    stability     Huang et al. 2023 style: do the argmax cells stay put under Gaussian input noise?
    deletion      FunnyBirds style: paint over the part under the top prototype, and over a random
                  background patch of the same size; the class score should drop more for the part

The image-level metrics run images through the one inference path (pipeline/inference.py,
`ImageModel`: the cache's recorded preprocessing, pixels in [0, 1], normalisation in torch so PGD can
differentiate through it); the evidence they attack or check is pipeline/model.py's top_contributions.
Boxes are receptive boxes of grid cells, (x, y, width, height) in original pixels (pipeline/geometry.py).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.cache import Cache
from pipeline.data import evaluation_source, usable_rows
from pipeline.errors import ProtoquantError
from pipeline.geometry import PIXEL_CENTRE, Preprocessing, box_contains
from pipeline.grounding import MAP_BUDGET, receptive_boxes, slot_boxes, top_images
from pipeline.images import crop_box
from pipeline.inference import ImageModel, Outputs
from pipeline.model import (
    ProtoQuantHead,
    class_contributions,
    codes_in_use,
    peak_cells,
    top_contributions,
)

Box = tuple[float, float, float, float]


# ---- the model from pixels: pipeline/inference.py (ImageModel) -------------------------------------------

def top_prototypes(model: ImageModel, out: Outputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: predicted class (B,), its top contributing code (B,), and that code's peak cell (B, 2)."""
    predicted = out.logits.argmax(dim=1)
    top = top_contributions(model.head, out.activation, out.presence, predicted, 1)
    return predicted, top.codes[:, 0], top.cells[:, 0]


def cell_masks(cells: torch.Tensor, input_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(B, 2) cells (h, w) -> (B, 1, S_h, S_w) bool on cells.device, True on each cell's square of the input."""
    size_h, size_w = input_size
    masks = torch.zeros(len(cells), 1, size_h, size_w, dtype=torch.bool, device=cells.device)
    for i, (h, w) in enumerate(cells.tolist()):
        y0, y1 = round(h * size_h / grid[0]), round((h + 1) * size_h / grid[0])
        x0, x1 = round(w * size_w / grid[1]), round((w + 1) * size_w / grid[1])
        masks[i, :, y0:y1, x0:x1] = True
    return masks


# ---- purity -------------------------------------------------------------------------------------------------
# Two variants share one pass over the training split (each code's top images by presence):
#   "purity" follows the PIP-Net protocol as the ProtoQuant authors' adapter runs it on CUB (METHOD.md
#       "Interpretability metrics"): codes with a class weight relu(W) > PURITY_WEIGHT_THRESHOLD whose
#       presence ever exceeds PURITY_PRESENCE_THRESHOLD; in each top image the PIP-Net patch at the argmax
#       cell (32 px of a 224-px input; skip = round((224 - 32) / (W - 1)) for finer grids than 7 x 7; the
#       last row and column hold the patch against the far edge), mapped to original pixels, bounds
#       included; left/right parts merged; a part's score = images whose patch holds the part's keypoint /
#       images where the part is visible; a code's purity = its best part.
#       The weight threshold is 0.1: the adapter's effective threshold is about 0.09 (PIP-Net's
#       evaluation lowers every weight by 1e-3 per batch before counting weights above 1e-3); we take
#       the authors' calculate_local_size threshold instead, so the codes scored for purity are exactly
#       those counted in the per-class local size.
#   "purity_strict" is this project's earlier, stricter variant: every code in use (weight > 0), the
#       receptive box of the argmax cell, parts as annotated (no merging), and a part's score = images
#       whose box holds it / ALL top images, whether the part is visible in them or not.
# Neither needs pixels: the cache holds presence (from its features), keypoints and original image sizes.
# The protocol's own images are uncropped and squashed to 224 x 224 (`preprocessing_as_protocol` says
# whether the cache's preprocessing is that one); other preprocessing maps the same patch through its
# own geometry.

PURITY_WEIGHT_THRESHOLD = 0.1
PURITY_PRESENCE_THRESHOLD = 0.1
PIPNET_INPUT = 224  # the input side PIP-Net's patch rule is written for
PIPNET_PATCH = 32  # its patch side at that input


def pipnet_patch_span(index: np.ndarray, cells: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIP-Net's patch along one axis: [start, stop] in input pixels for grid indices `index` of `cells`.

    The patch is 32 px at a 224-px input (scaled with other inputs); it starts at index * skip,
    skip = round((size - patch) / (cells - 1)), and a patch that reaches the far edge (always the last
    index) is held against it. A 7-cell axis at 224 px gives the cells themselves.
    """
    index = np.asarray(index, dtype=np.float64)
    patch = PIPNET_PATCH * size / PIPNET_INPUT
    if cells == 1:
        return np.zeros_like(index), np.full_like(index, float(size))
    skip = round((size - patch) / (cells - 1))
    start, stop = index * skip, np.minimum(size, index * skip + patch)
    at_edge = (index == cells - 1) | (stop >= size)
    return np.where(at_edge, size - patch, start), np.where(at_edge, float(size), stop)


def pipnet_patch_boxes(preprocessing: Preprocessing, rows: np.ndarray, cells: np.ndarray, image_size: np.ndarray,
                       boxes: np.ndarray | None) -> np.ndarray:
    """PIP-Net patches of (row, cell) slots in original pixels -> (..., 4) x, y, w, h; NaN in empty slots.

    rows (...) cache rows (-1 = empty), cells (..., 2) (h, w); image_size (N, 2), boxes (N, 4) as for
    pipeline.grounding.receptive_boxes.
    """
    size_h, size_w = preprocessing.input_size
    grid_h, grid_w = preprocessing.grid
    v0, v1 = pipnet_patch_span(cells[..., 0], grid_h, size_h)
    u0, u1 = pipnet_patch_span(cells[..., 1], grid_w, size_w)

    def patch(geometry, index) -> tuple:
        x0, y0 = geometry.to_original(u0[index], v0[index])
        x1, y1 = geometry.to_original(u1[index], v1[index])
        left, top, right, bottom = geometry.region
        x0, x1 = np.clip(x0, left, right), np.clip(x1, left, right)
        y0, y1 = np.clip(y0, top, bottom), np.clip(y1, top, bottom)
        return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)

    return slot_boxes(preprocessing, rows, image_size, boxes, patch)


def merged_parts(names: list[str]) -> tuple[list[str], np.ndarray]:
    """Left/right parts merged ('left eye', 'right eye' -> 'eye'): the merged names, in first-seen order,
    and for each original part the index of its merged part."""
    merged: list[str] = []
    keys: list[str] = []
    index = []
    for name in names:
        base = re.sub(r"^(left|right)[ _-]+", "", name.strip(), flags=re.IGNORECASE)
        if base.lower() not in keys:
            merged.append(base)
            keys.append(base.lower())
        index.append(keys.index(base.lower()))
    return merged, np.asarray(index, dtype=np.int64)


def pipnet_part_scores(boxes: np.ndarray, keypoints: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """For each code and merged part: images whose patch holds the part / images where it is visible.

    boxes (K, T, 4) patches in original pixels, NaN in empty slots; keypoints (K, T, P, 3) x, y,
    visible (pixel indices: the keypoint sits at the pixel centre); merge (P,) merged-part index of each
    part. A merged part is visible in an image when one of its parts is, and in the patch when one of
    its visible parts is (PIP-Net keeps the better side). Bounds count as inside, as in PIP-Net. -> (K, M);
    0 for a part visible in none of the images.
    """
    x, y = keypoints[..., 0] + PIXEL_CENTRE, keypoints[..., 1] + PIXEL_CENTRE  # (K, T, P)
    filled = ~np.isnan(boxes[..., 0])  # (K, T)
    b = np.nan_to_num(boxes)[:, :, None, :]  # (K, T, 1, 4)
    inside = (x >= b[..., 0]) & (x <= b[..., 0] + b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 1] + b[..., 3])
    visible = (keypoints[..., 2] > 0) & filled[..., None]  # (K, T, P)
    n_merged = int(merge.max()) + 1 if merge.size else 0
    scores = np.zeros((boxes.shape[0], n_merged))
    for m in range(n_merged):
        members = merge == m
        seen = visible[..., members].any(axis=2)  # (K, T)
        hit = (inside & visible)[..., members].any(axis=2)  # (K, T)
        scores[:, m] = hit.sum(axis=1) / np.maximum(seen.sum(axis=1), 1)
    return scores


def part_fractions(boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The strict variant: for each code and part, the fraction of ALL its top boxes holding the part's
    visible keypoint.

    boxes (K, T, 4) x, y, w, h in original pixels, NaN in empty slots; keypoints (K, T, P, 3) x, y,
    visible as pixel indices (the keypoint sits at the pixel centre). -> (K, P) in [0, 1]; the
    denominator is the number of filled slots.
    """
    centre_x, centre_y = keypoints[..., 0] + PIXEL_CENTRE, keypoints[..., 1] + PIXEL_CENTRE  # (K, T, P)
    filled = ~np.isnan(boxes[..., 0])  # (K, T)
    inside = box_contains(np.nan_to_num(boxes)[:, :, None, :], centre_x, centre_y)  # (K, T, P)
    inside &= (keypoints[..., 2] > 0) & filled[..., None]
    return inside.sum(axis=1) / np.maximum(filled.sum(axis=1), 1)[:, None]


def _purity_summary(scores: np.ndarray, names: list[str], selected: np.ndarray, **fields) -> dict:
    """Mean, count above 0.5 and pure codes per part of the selected codes' (K, P) part scores."""
    best_score, best_part = scores.max(axis=1)[selected], scores.argmax(axis=1)[selected]
    pure = best_score > 0.5
    return {"mean": float(best_score.mean()) if best_score.size else None, "above_0_5": int(pure.sum()),
            "codes": int(selected.sum()), **fields,
            "pure_codes_by_part": {names[p]: int(((best_part == p) & pure).sum()) for p in range(len(names))}}


def preprocessing_as_protocol(preprocessing: Preprocessing) -> bool:
    """Whether the cache saw what the purity protocol's images are: uncropped, squashed to 224 x 224."""
    squashed = preprocessing.crop_mode == "squash" and preprocessing.crop_pct == 1.0
    return squashed and not preprocessing.crop_to_box and preprocessing.input_size == (PIPNET_INPUT, PIPNET_INPUT)


def purity(head: ProtoQuantHead, cache: Cache, *, split: str = "train", top: int = 10,
           device: str | torch.device = "cpu") -> dict:
    """Both purities of a head on `split` of its cache -> {"purity": PIP-Net protocol, "purity_strict": ...}
    (the comment block above says what each counts)."""
    data = cache.split(split)
    annotations = data.annotations() or {}
    if "part_locs" not in annotations:
        raise ProtoquantError(f"purity needs part keypoints, but {cache.path} holds none: extract a dataset with "
                              "parts/part_locs.txt (CUB layout, e.g. `protoquant make-birds`)")
    head = copy.deepcopy(head).eval().to(device)  # the caller's head stays where it is
    grid = cache.grid
    per_batch = max(1, MAP_BUDGET // (head.codes.shape[0] * grid[0] * grid[1]))
    tops = top_images(head.activation, data, n_codes=head.codes.shape[0], top=top, images_per_batch=per_batch,
                      device=device)
    preprocessing = Preprocessing.from_cache(cache)
    keypoints = annotations["part_locs"][np.clip(tops.rows, 0, None)]  # (K, T, P, 3)
    names = cache.attrs.get("part_names") or [f"part {i + 1}" for i in range(keypoints.shape[2])]
    weight = head.effective_weight().detach().cpu()
    weighted = (weight > PURITY_WEIGHT_THRESHOLD).any(dim=0).numpy()
    present = tops.scores[:, 0] > PURITY_PRESENCE_THRESHOLD
    merged, merge = merged_parts(list(names))
    patches = pipnet_patch_boxes(preprocessing, tops.rows, tops.cells, data.image_size, annotations.get("boxes"))
    protocol = _purity_summary(
        pipnet_part_scores(patches, keypoints, merge), merged, weighted & present, top=top, split=split,
        weight_threshold=PURITY_WEIGHT_THRESHOLD, presence_threshold=PURITY_PRESENCE_THRESHOLD,
        never_present=int((weighted & ~present).sum()), patch=_patch_side(preprocessing),
        preprocessing_as_protocol=preprocessing_as_protocol(preprocessing))
    receptive = receptive_boxes(preprocessing, tops.rows, tops.cells, data.image_size, annotations.get("boxes"))
    strict = _purity_summary(part_fractions(receptive, keypoints), list(names), codes_in_use(head).cpu().numpy(),
                             top=top, split=split)
    return {"purity": protocol, "purity_strict": strict}


def _patch_side(preprocessing: Preprocessing) -> float:
    """The protocol's patch side in input pixels (32 at 224)."""
    return PIPNET_PATCH * preprocessing.input_size[1] / PIPNET_INPUT


# ---- evidence on defining parts (a generator with ground truth: make-birds' class_attributes.txt) -------------

def defining_part_hits(boxes: np.ndarray, keypoints: np.ndarray, defining: np.ndarray) -> np.ndarray:
    """Which boxes hold the visible keypoint of a defining part: boxes (N, 4) x, y, w, h (original pixels,
    half-open), keypoints (N, P, 3) x, y, visible (pixel indices), defining (N, P) bool -> (N, P) bool."""
    x, y = keypoints[..., 0] + PIXEL_CENTRE, keypoints[..., 1] + PIXEL_CENTRE  # (N, P)
    inside = box_contains(boxes[:, None, :], x, y)  # (N, P)
    return inside & (keypoints[..., 2] > 0) & defining


def defining_matrix(class_parts: list[list[str]], part_names: list[str], source: str) -> np.ndarray:
    """(C, P) bool: class c is defined by part p."""
    matrix = np.zeros((len(class_parts), len(part_names)), dtype=bool)
    for c, parts in enumerate(class_parts):
        for part in parts:
            if part not in part_names:
                raise ProtoquantError(f"{source}: part {part!r} defines a class but the cache's parts are "
                                      f"{', '.join(part_names)}: fix class_attributes.txt or re-extract")
            matrix[c, part_names.index(part)] = True
    return matrix


@torch.no_grad()
def top_evidence(head: ProtoQuantHead, cache: Cache, split: str, *, device: str | torch.device = "cpu") -> dict:
    """Per usable row of `split`: predicted class, top contribution's code, its value and peak cell."""
    data = cache.split(split)
    rows = usable_rows(data)
    head = copy.deepcopy(head).eval().to(device)
    per_batch = max(1, MAP_BUDGET // (head.codes.shape[0] * cache.grid[0] * cache.grid[1]))
    found = {"predicted": [], "labels": [], "codes": [], "values": [], "cells": []}
    for features, labels in evaluation_source(data, batch_size=per_batch, rows=rows).batches(0):
        activation = head.activation(features.to(device))  # (B, K, H, W)
        presence = activation.amax(dim=(2, 3))  # (B, K)
        predicted = head.logits_from_presence(presence).argmax(dim=1)
        top = top_contributions(head, activation, presence, predicted, 1)
        for name, value in (("predicted", predicted), ("labels", labels), ("codes", top.codes[:, 0]),
                            ("values", top.values[:, 0]), ("cells", top.cells[:, 0])):
            found[name].append(value.cpu())
    stacked = {name: torch.cat(values).numpy() if values else np.empty(0) for name, values in found.items()}
    return {"rows": rows, **stacked}


def centre_on_part_boxes(boxes: np.ndarray, part_boxes: np.ndarray, defining: np.ndarray) -> np.ndarray:
    """Which boxes' centres lie on the box of a visible defining part: boxes (N, 4), part_boxes (N, P, 4) x, y, w, h
    (original pixels, half-open; w = 0 where not visible), defining (N, P) bool -> (N, P) bool."""
    x, y = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2  # (N,)
    visible = (part_boxes[..., 2] > 0) & (part_boxes[..., 3] > 0)
    return box_contains(part_boxes, x[:, None], y[:, None]) & visible & defining


def _evidence_hits(preprocessing: Preprocessing, data, annotations: dict, rows: np.ndarray, cells: np.ndarray,
                   defining: np.ndarray) -> dict[str, np.ndarray]:
    """For (row, cell) slots, whether each criterion counts the slot as on a defining part -> {key: (n,) bool}:
    share (a defining part's keypoint in the cell's box), share_pipnet_patch (in purity's 32-px patch) and,
    when the dataset has part boxes (make-birds), share_part_box (the cell's centre on a defining part's box)."""
    keypoints, image_boxes = annotations["part_locs"][rows], annotations.get("boxes")
    cell_boxes = receptive_boxes(preprocessing, rows, cells, data.image_size, image_boxes)
    patches = pipnet_patch_boxes(preprocessing, rows, cells, data.image_size, image_boxes)
    hits = {"share": defining_part_hits(cell_boxes, keypoints, defining).any(axis=1),
            "share_pipnet_patch": defining_part_hits(patches, keypoints, defining).any(axis=1)}
    if annotations.get("part_boxes") is not None:
        hits["share_part_box"] = centre_on_part_boxes(cell_boxes, annotations["part_boxes"][rows], defining).any(axis=1)
    return hits


def evidence_on_defining_parts(head: ProtoQuantHead, cache: Cache, class_parts: list[list[str]], *,
                               split: str = "test", device: str | torch.device = "cpu") -> dict:
    """The share of correctly classified images of `split` whose top contribution (to the predicted class)
    fires on a box holding a part that defines the predicted class.

    `share`: the box is the receptive box of the top code's peak cell (pipeline/geometry.py), in original
    pixels, and a part is in it when its visible keypoint is. An image whose best contribution is 0 has no
    evidence and counts as a miss (in every share and chance). Also reported: the share whose box holds any
    annotated part (`on_any_part`), per defining part how many hits it is in, and two looser criteria:
    `share_pipnet_patch` (the keypoint in purity's box, PIP-Net's 32-px patch at the peak cell, which does
    not shrink as the grid gets finer) and, when the dataset has part boxes (make-birds' parts/part_boxes.txt),
    `share_part_box` (the peak cell's centre on a defining part's box: a wing or tail is larger than a cell,
    and its keypoint is only its centre; boxes of neighbouring parts overlap, so this one counts generously).
    `chance*`: what a uniformly random cell of the same image would score by each criterion
    (_chance_of_defining_part), the baseline each share beats.
    """
    data = cache.split(split)
    annotations = data.annotations() or {}
    part_names = list(cache.attrs.get("part_names") or [])
    if "part_locs" not in annotations or not part_names:
        raise ProtoquantError(f"evidence on defining parts needs part keypoints, but {cache.path} holds none")
    defining_by_class = defining_matrix(class_parts, part_names, str(cache.path))
    evidence = top_evidence(head, cache, split, device=device)
    correct = evidence["predicted"] == evidence["labels"]
    n_correct = int(correct.sum())
    shown = correct & (evidence["values"] > 0)  # a zero contribution is no evidence
    rows, cells = evidence["rows"][shown], evidence["cells"][shown].astype(np.int64)
    defining = defining_by_class[evidence["predicted"][shown].astype(np.int64)]  # (N, P)
    preprocessing = Preprocessing.from_cache(cache)
    boxes = receptive_boxes(preprocessing, rows, cells, data.image_size, annotations.get("boxes"))
    keypoints = annotations["part_locs"][rows]  # (N, P, 3)
    hits = defining_part_hits(boxes, keypoints, defining)
    any_part = defining_part_hits(boxes, keypoints, np.ones_like(hits))
    shares = _evidence_hits(preprocessing, data, annotations, rows, cells, defining)
    chance = _chance_of_defining_part(cache, data, annotations, rows, defining)

    def of_correct(count: float) -> float | None:
        return float(count / n_correct) if n_correct else None

    return {**{key: of_correct(hit.sum()) for key, hit in shares.items()},
            **{key.replace("share", "chance"): of_correct(value) for key, value in chance.items()},
            "images": n_correct, "hits": int(hits.any(axis=1).sum()), "on_any_part": of_correct(any_part.any(axis=1).sum()),
            "split": split, "by_part": {part_names[p]: int(hits[:, p].sum()) for p in range(len(part_names))
                                        if defining_by_class[:, p].any()}}


def _chance_of_defining_part(cache: Cache, data, annotations: dict, rows: np.ndarray, defining: np.ndarray,
                             images_per_pass: int = 256) -> dict[str, float]:
    """What a top contribution at a uniformly random cell would score: per criterion of _evidence_hits, summed
    over the images, the share of the grid's cells it counts. A share well above this is the head's doing;
    one near it is the size of the box. Images in passes of `images_per_pass` (memory: that many x H x W x parts)."""
    grid_h, grid_w = cache.grid
    cells = np.stack(np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij"), axis=-1).reshape(-1, 2)
    preprocessing = Preprocessing.from_cache(cache)
    keys = ["share", "share_pipnet_patch"] + (["share_part_box"] if annotations.get("part_boxes") is not None else [])
    sums = dict.fromkeys(keys, 0.0)
    for first in range(0, len(rows), images_per_pass):
        part = slice(first, first + images_per_pass)
        n = len(rows[part])
        hits = _evidence_hits(preprocessing, data, annotations, np.repeat(rows[part], len(cells)), np.tile(cells, (n, 1)),
                              np.repeat(defining[part], len(cells), axis=0))
        for key, hit in hits.items():
            sums[key] += float(hit.reshape(n, len(cells)).mean(axis=1).sum())
    return sums


# ---- spatial misalignment (Sacha et al.) ------------------------------------------------------------------

def pgd_outside(pixels: torch.Tensor, inside: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *,
                eps: float, step: float, steps: int) -> torch.Tensor:
    """L-inf PGD that lowers objective(pixels) (per image, (B,)) changing only pixels OUTSIDE `inside`.

    pixels (B, 3, S, S) in [0, 1]; inside (B, 1, S, S) bool. Pixels inside stay exactly as they
    were; outside, each step moves by `step` against the gradient's sign, projected onto the eps
    ball around the original and onto [0, 1].
    """
    original = pixels.detach()
    free = (~inside).to(original.dtype)
    adversarial = original.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        (gradient,) = torch.autograd.grad(objective(adversarial).sum(), adversarial)
        moved = adversarial.detach() - step * gradient.sign() * free
        moved = torch.minimum(torch.maximum(moved, original - eps), original + eps).clamp(0.0, 1.0)
        adversarial = torch.where(inside, original, moved)  # exactly unchanged inside the box
    return adversarial.detach()


def top_fraction_iou(before: torch.Tensor, after: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """IoU of the top `fraction` cells of two maps (B, H, W) -> (B,)."""
    count = max(1, math.ceil(fraction * before[0].numel()))

    def top_set(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(count, dim=1).indices, True)

    a, b = top_set(before), top_set(after)
    return (a & b).sum(1).float() / (a | b).sum(1).float()


def _rank(contributions: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """0-based rank of each image's `code` among its contributions (B, K) -> (B,)."""
    own = contributions.gather(1, code[:, None])  # (B, 1)
    return (contributions > own).sum(dim=1)


@dataclass(frozen=True)
class MisalignmentSettings:
    """PGD in pixel space ([0, 1]), L-inf."""

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 5
    batch_size: int = 8


def misalignment(model: ImageModel, pixels: torch.Tensor, labels: torch.Tensor,
                 settings: MisalignmentSettings = MisalignmentSettings()) -> dict:
    """Attack each image's top prototype (top contribution to the predicted class) from outside its box.

    The box is the receptive cell where that prototype fires most; PGD changes only pixels outside it
    to lower the prototype's activation at that cell. Reported (means over images; lower = better):
        pac   100 * (a - a') / a: relative drop of the activation at the cell
        prc   |rank' - rank|: how far the prototype moves among the predicted class's contributions
        plc   100 * (1 - IoU) of the top-10% cells of its activation map before and after
        accuracy_clean, accuracy_attacked, accuracy_change (attacked - clean; fractions)
    """
    totals = {"pac": [], "prc": [], "plc": [], "clean": [], "attacked": []}
    grid = model.backbone.grid
    for start in range(0, len(pixels), settings.batch_size):
        x = pixels[start:start + settings.batch_size]
        y = labels[start:start + settings.batch_size].to(x.device)
        before = model.outputs(x)
        predicted, code, cells = top_prototypes(model, before)
        rows = torch.arange(len(x), device=x.device)
        inside = cell_masks(cells, tuple(x.shape[-2:]), grid)

        def objective(candidate: torch.Tensor) -> torch.Tensor:
            return model.activation(candidate)[rows, code, cells[:, 0], cells[:, 1]]

        adversarial = pgd_outside(x, inside, objective, eps=settings.eps, step=settings.step, steps=settings.steps)
        after = model.outputs(adversarial)
        a_before = before.activation[rows, code, cells[:, 0], cells[:, 1]]
        a_after = after.activation[rows, code, cells[:, 0], cells[:, 1]]
        totals["pac"].append(100 * (a_before - a_after) / a_before.clamp_min(1e-12))
        rank_before = _rank(class_contributions(model.head, before.presence, predicted), code)
        rank_after = _rank(class_contributions(model.head, after.presence, predicted), code)
        totals["prc"].append((rank_after - rank_before).abs().float())
        totals["plc"].append(100 * (1 - top_fraction_iou(before.activation[rows, code], after.activation[rows, code])))
        totals["clean"].append((before.logits.argmax(1) == y).float())
        totals["attacked"].append((after.logits.argmax(1) == y).float())
    means = {name: float(torch.cat(values).mean()) if values else None for name, values in totals.items()}
    change = means["attacked"] - means["clean"] if totals["clean"] else None
    return {"pac": means["pac"], "prc": means["prc"], "plc": means["plc"], "accuracy_clean": means["clean"],
            "accuracy_attacked": means["attacked"], "accuracy_change": change,
            "images": int(len(pixels)), "eps": settings.eps, "steps": settings.steps}


# ---- stability under noise -----------------------------------------------------------------------------------

def stability(model: ImageModel, pixels: torch.Tensor, *, sigma: float, codes_per_image: int = 10, seed: int = 0,
              batch_size: int = 8) -> dict:
    """Fraction of (image, code) activations whose argmax cell moves at most one cell (Chebyshev) when
    Gaussian noise of std `sigma` (pixels in [0, 1], clipped) is added to the input.

    Codes per image: the `codes_per_image` largest positive contributions to the predicted class
    (what an explanation shows). sigma = 0 gives exactly 1.0.
    """
    generator = torch.Generator().manual_seed(seed)
    stable, counted = 0, 0
    for start in range(0, len(pixels), batch_size):
        x = pixels[start:start + batch_size]
        clean = model.outputs(x)
        top = top_contributions(model.head, clean.activation, clean.presence, clean.logits.argmax(dim=1),
                                codes_per_image)
        noise = torch.randn(x.shape, generator=generator).to(x.device)  # CPU generator: the same noise anywhere
        noisy_pixels = (x + sigma * noise).clamp(0.0, 1.0)
        noisy = model.outputs(noisy_pixels)
        cells_noisy = peak_cells(noisy.activation, top.codes)  # (B, n, 2)
        near = (top.cells - cells_noisy).abs().amax(dim=-1) <= 1  # (B, n)
        shown = top.shown
        stable += int((near & shown).sum())
        counted += int(shown.sum())
    return {"stability": stable / counted if counted else None, "sigma": sigma,
            "images": int(len(pixels)), "activations": counted}


# ---- deletion (FunnyBirds style) ----------------------------------------------------------------------------

@dataclass
class PartImage:
    """An original image with its annotations (original pixels)."""

    image: Image.Image
    label: int
    bird_box: Box | None  # the object's box (CUB bounding box); also the crop for crop_to_box caches
    part_locs: np.ndarray  # (P, 3) x, y, visible (pixel indices)
    part_boxes: np.ndarray | None  # (P, 4) x, y, w, h; zeros when the part is not visible


def network_view(item: PartImage, preprocessing: Preprocessing) -> Image.Image:
    """What the cache fed the backbone: the image, cropped to its box for crop_to_box caches."""
    return crop_box(item.image, item.bird_box) if preprocessing.crop_to_box else item.image


def background_colour(image: Image.Image, bird_box: Box | None, ring: int = 4) -> np.ndarray:
    """Median colour of a `ring`-pixel band just outside the object box (the image border without one)."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    band = np.zeros((height, width), dtype=bool)
    if bird_box is not None:
        x, y, w, h = bird_box
        x0, y0, x1, y1 = int(math.floor(x)), int(math.floor(y)), int(math.ceil(x + w)), int(math.ceil(y + h))
        band[max(0, y0 - ring):y1 + ring, max(0, x0 - ring):x1 + ring] = True
        band[max(0, y0):y1, max(0, x0):x1] = False
    if not band.any():
        band[:ring], band[-ring:], band[:, :ring], band[:, -ring:] = True, True, True, True
    return np.median(pixels[band], axis=0).astype(np.uint8)


def paint(image: Image.Image, box: Box, colour: np.ndarray) -> Image.Image:
    """A copy of `image` with the whole pixels covering `box` set to `colour`."""
    pixels = np.asarray(image.convert("RGB")).copy()
    x, y, w, h = box
    pixels[max(0, int(math.floor(y))):int(math.ceil(y + h)), max(0, int(math.floor(x))):int(math.ceil(x + w))] = colour
    return Image.fromarray(pixels)


def _overlaps(a: Box, b: Box | None) -> bool:
    if b is None:
        return False
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def random_background_box(area: Box, width: float, height: float, avoid: list[Box | None],
                          rng: np.random.Generator, tries: int = 200) -> Box:
    """A width x height box inside `area` overlapping none of `avoid` (the last draw when none fits)."""
    box = (area[0], area[1], width, height)
    for _ in range(tries):
        box = (area[0] + float(rng.uniform(0, max(area[2] - width, 0))),
               area[1] + float(rng.uniform(0, max(area[3] - height, 0))), width, height)
        if not any(_overlaps(box, other) for other in avoid):
            return box
    return box


def part_under_box(box: Box, part_locs: np.ndarray) -> int | None:
    """Index of the visible part whose keypoint lies in `box`, nearest its centre; None when none does."""
    centres = part_locs[:, :2] + PIXEL_CENTRE
    inside = box_contains(np.asarray(box), centres[:, 0], centres[:, 1]) & (part_locs[:, 2] > 0)
    if not inside.any():
        return None
    middle = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])
    distance = np.where(inside, np.linalg.norm(centres - middle, axis=1), np.inf)
    return int(distance.argmin())


def deletion(model: ImageModel, items: list[PartImage], preprocessing: Preprocessing, *, seed: int = 0) -> dict:
    """Remove the part under each image's top prototype, then an equal-size random background patch.

    The part is the visible part whose keypoint lies in the prototype's receptive box (nearest its
    centre); it is painted over (its part box, or a box of the receptive box's size around the
    keypoint) with the background colour measured around the object box. The random patch has the
    same size and colour, and lies where the network looks but off the object box when it can (for
    crop_to_box caches the network sees only the box: then off the part). Reported: mean drop of
    the predicted class's logit for each, and the fraction of images where the part's drop is larger.
    Images whose top prototype covers no annotated part are counted in `skipped`.
    """
    rng = np.random.default_rng(seed)
    part_drops, random_drops, skipped = [], [], 0
    for item in items:
        clean = model.outputs(model.pixels(network_view(item, preprocessing))[None])
        predicted, _, cells = top_prototypes(model, clean)
        geometry = preprocessing.image(item.image.size, item.bird_box)
        receptive = tuple(geometry.cell_box(int(cells[0, 0]), int(cells[0, 1])).tolist())
        part = part_under_box(receptive, item.part_locs)
        if part is None:
            skipped += 1
            continue
        region = _part_region(item, part, receptive)
        colour = background_colour(item.image, item.bird_box)
        control = _control_box(item, region, preprocessing, rng)
        score = float(clean.logits[0, predicted[0]])
        for box, drops in ((region, part_drops), (control, random_drops)):
            painted = PartImage(paint(item.image, box, colour), item.label, item.bird_box, item.part_locs, item.part_boxes)
            after = model.outputs(model.pixels(network_view(painted, preprocessing))[None])
            drops.append(score - float(after.logits[0, predicted[0]]))
    part_drops, random_drops = np.asarray(part_drops), np.asarray(random_drops)
    used = len(part_drops)
    return {"part_drop": float(part_drops.mean()) if used else None,
            "random_drop": float(random_drops.mean()) if used else None,
            "part_beats_random": float((part_drops > random_drops).mean()) if used else None,
            "images": used, "skipped": skipped}


def _control_box(item: PartImage, region: Box, preprocessing: Preprocessing, rng: np.random.Generator) -> Box:
    """Where the random patch may go: anywhere the network looks, off the object (or the part)."""
    if preprocessing.crop_to_box and item.bird_box is not None:
        return random_background_box(item.bird_box, region[2], region[3], [region], rng)
    whole = (0.0, 0.0, float(item.image.width), float(item.image.height))
    return random_background_box(whole, region[2], region[3], [item.bird_box, region], rng)


def _part_region(item: PartImage, part: int, receptive: Box) -> Box:
    """The part's own box when annotated, else a receptive-box-sized square around its keypoint."""
    if item.part_boxes is not None and item.part_boxes[part, 2] > 0 and item.part_boxes[part, 3] > 0:
        return tuple(float(v) for v in item.part_boxes[part])
    x, y = item.part_locs[part, :2] + PIXEL_CENTRE
    return (float(x - receptive[2] / 2), float(y - receptive[3] / 2), float(receptive[2]), float(receptive[3]))
