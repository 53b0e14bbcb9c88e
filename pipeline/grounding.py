"""Grounding: the training patches behind every code (METHOD.md "Explanations": global).

For every code, the training images holding the patches nearest to it by cosine - one patch per
image, its best grid cell - with the cell and the cosine. Found from the cache alone, exactly, block by
block: memory stays bounded whatever the cache size, and nothing but the cache is read. The same pass
counts each code's usage: how many training patches pick it as their nearest code (cosine argmax
among the codes that exist, as stage A assigns them).

The grounding figure of a code is the cosine to its nearest real patch: 1.0 means the code sits on a
training patch. Trainable codes (stage B with train_codes) may drift away from the data; this shows
how far they did.

The result is stored as RUN/grounding.safetensors (it records the cache fingerprint and a hash of the
codes, so a stale file is recomputed) and reused by the gallery, explain, the metrics and the prune report.
The same streaming top-k serves purity, ranked by softmax activation instead of cosine (`top_images`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import Cache, CacheSplit
from pipeline.codebook import COSINE_EPS
from pipeline.errors import ProtoquantError
from pipeline.io import read_artifact, write_artifact
from pipeline.geometry import Preprocessing
from pipeline.model import ProtoQuantHead

GROUNDING_FILE = "grounding.safetensors"
MAP_BUDGET = 1 << 25  # float32 values of one (n, K, H, W) score map: 128 MiB
ScoreMaps = Callable[[torch.Tensor], torch.Tensor]  # (n, H, W, D) features -> (n, K, H, W) scores


@dataclass
class TopImages:
    """For every code, its best `top` training images (best first) and the cell where each scored."""

    rows: np.ndarray  # (K, T) int64 rows of the cache split; -1 in empty slots (fewer than T images)
    cells: np.ndarray  # (K, T, 2) int64 (h, w)
    scores: np.ndarray  # (K, T) float32; -inf in empty slots

    @property
    def valid(self) -> np.ndarray:
        """(K, T) bool: slots that hold an image."""
        return self.rows >= 0

    def first(self, top: int) -> "TopImages":
        """The best `top` slots only."""
        return TopImages(self.rows[:, :top], self.cells[:, :top], self.scores[:, :top])


class _TopAccumulator:
    """Running per-code top-T over images: merge each block's best cell per image, keep the T best."""

    def __init__(self, n_codes: int, top: int, width: int):
        self.top, self.width = top, width
        self.scores = torch.full((n_codes, top), float("-inf"))
        self.rows = torch.full((n_codes, top), -1, dtype=torch.long)
        self.cells = torch.zeros((n_codes, top), dtype=torch.long)  # flat h * W + w

    def update(self, rows: torch.Tensor, best: torch.Tensor, where: torch.Tensor) -> None:
        """rows (n,) cache rows; best (n, K) each image's best score per code, at flat cell where (n, K)."""
        scores = torch.cat([self.scores, best.T.float()], dim=1)  # (K, T + n)
        rows_all = torch.cat([self.rows, rows[None, :].expand(best.shape[1], -1)], dim=1)  # (K, T + n)
        cells_all = torch.cat([self.cells, where.T], dim=1)  # (K, T + n)
        self.scores, keep = scores.topk(self.top, dim=1)  # sorted, best first
        self.rows, self.cells = rows_all.gather(1, keep), cells_all.gather(1, keep)

    def result(self) -> TopImages:
        """The running top as arrays, cells unflattened to (h, w)."""
        cells = torch.stack([self.cells // self.width, self.cells % self.width], dim=-1)  # (K, T, 2)
        return TopImages(self.rows.numpy().copy(), cells.numpy().copy(), self.scores.numpy().copy())


def _usable_blocks(split: CacheSplit, images_per_batch: int):
    """Yield (rows (n,), features float16 (n, H, W, D)) of rows that hold features, in bounded batches."""
    ok = split.ok
    for start, block in split.iter_blocks():
        rows = np.arange(start, start + len(block))
        keep = ok[rows]
        rows, block = rows[keep], block[keep]
        for i in range(0, len(rows), images_per_batch):
            yield rows[i:i + images_per_batch], block[i:i + images_per_batch]


def _images_per_batch(head: ProtoQuantHead, grid: tuple[int, int]) -> int:
    """Images per batch so that one (n, K, H, W) float32 map stays within MAP_BUDGET values."""
    return max(1, MAP_BUDGET // (head.codes.shape[0] * grid[0] * grid[1]))


@torch.no_grad()
def top_images(score_maps: ScoreMaps, split: CacheSplit, *, n_codes: int, top: int, images_per_batch: int,
               device: str | torch.device = "cpu") -> TopImages:
    """Per code, the `top` images of `split` with the highest score at their best cell.

    score_maps turns a (n, H, W, D) feature batch into (n, K, H, W) scores, e.g. the head's softmax
    activation for purity (METHOD.md "Interpretability metrics": top-10 images by presence).
    """
    grid = tuple(split.features.shape[1:3])
    accumulator = _TopAccumulator(n_codes, top, grid[1])
    for rows, block in _usable_blocks(split, images_per_batch):
        maps = score_maps(torch.from_numpy(block).to(device))  # (n, K, H, W)
        best, where = maps.flatten(2).max(dim=2)  # (n, K, H*W) -> (n, K): best cell per image and code
        accumulator.update(torch.from_numpy(rows), best.cpu(), where.cpu())
    return accumulator.result()


@dataclass
class Grounding:
    """The nearest training patches of every code, their usage, and where they came from."""

    nearest: TopImages  # by cosine, one patch per image
    usage: np.ndarray  # (K,) int64: training patches whose nearest existing code is this one
    n_patches: int  # training patches seen (usable rows x H x W)
    split: str
    ids: dict[int, str]  # cache row -> image id, for every row in nearest.rows

    @property
    def cosine(self) -> np.ndarray:
        """(K,) the grounding figure: cosine between each code and its nearest real patch."""
        return self.nearest.scores[:, 0].copy()

    def summary(self, codes: np.ndarray | None = None) -> dict:
        """Grounding figures over `codes` (a (K,) bool mask; all codes when None)."""
        cosine = self.cosine if codes is None else self.cosine[codes]
        if cosine.size == 0:
            return {"codes": 0}
        return {"codes": int(cosine.size), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                "below_0_9": int((cosine < 0.9).sum()), "split": self.split, "top": int(self.nearest.rows.shape[1])}


def codes_digest(head: ProtoQuantHead) -> str:
    """A short hash of the codes, which of them exist and the projection: a grounding made for others is stale."""
    digest = hashlib.sha256(head.codes.detach().float().cpu().numpy().tobytes())
    digest.update(head.code_mask.cpu().numpy().tobytes())
    if head.projection is not None:  # the patches the codes are compared with
        for tensor in (head.projection.weight, head.projection.bias):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def ground_codes(head: ProtoQuantHead, cache: Cache, *, split: str = "train", top: int = 10,
                 images_per_batch: int | None = None, device: str | torch.device = "cpu") -> Grounding:
    """Nearest training patches (cosine) and usage of every code, streaming over the cache split.

    Removed codes (code_mask False) get their nearest patches too (the prune report shows them) but
    no usage: assignment picks among existing codes only. images_per_batch bounds the (n, H*W, K)
    similarity map (default: MAP_BUDGET values).
    """
    data = cache.split(split)
    codes = head.codes.detach().to(device)
    exists = head.code_mask.to(device)
    grid = cache.grid
    n_codes = codes.shape[0]
    accumulator = _TopAccumulator(n_codes, top, grid[1])
    usage = torch.zeros(n_codes, dtype=torch.long)
    n_patches = 0
    for rows, block in _usable_blocks(data, images_per_batch or _images_per_batch(head, grid)):
        patches = head.embed(torch.from_numpy(block).to(head.codes.device)).to(device)  # as the codes see them
        similarity = patch_cosines(patches, codes)  # (n, H*W, K)
        best, where = similarity.max(dim=1)  # (n, K): each image's nearest patch to each code
        accumulator.update(torch.from_numpy(rows), best.cpu(), where.cpu())
        if not exists.all():
            similarity = similarity.masked_fill(~exists, float("-inf"))  # a removed code is nobody's nearest
        nearest_code = similarity.argmax(dim=2)  # (n, H*W)
        usage += torch.bincount(nearest_code.flatten().cpu(), minlength=n_codes)
        n_patches += nearest_code.numel()
    if n_patches == 0:
        raise ProtoquantError(f"split {split!r} of {cache.path} has no usable rows to ground codes on")
    nearest = accumulator.result()
    return Grounding(nearest=nearest, usage=usage.numpy(), n_patches=n_patches, split=split,
                     ids=_ids_of(data, nearest.rows))


def patch_cosines(f: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """cos(f[b, h, w], codes[k]) laid out (B, H*W, K): ProtoQuantHead.similarity's cosine (METHOD.md
    stage B: S), in the layout where per-patch argmax and one matrix product are contiguous."""
    f_unit = F.normalize(f.float().flatten(1, 2), dim=-1, eps=COSINE_EPS)  # (B, H, W, D) -> (B, H*W, D)
    codes_unit = F.normalize(codes.float(), dim=-1, eps=COSINE_EPS)  # (K, D)
    return f_unit @ codes_unit.T  # (B, H*W, K)


def _ids_of(split: CacheSplit, rows: np.ndarray) -> dict[int, str]:
    ids = split.ids
    return {int(r): str(ids[r]) for r in np.unique(rows[rows >= 0])}


def save_grounding(path: str | Path, grounding: Grounding, *, cache_fingerprint: str, codes_hash: str) -> None:
    """Write RUN/grounding.safetensors atomically (safetensors + JSON fields)."""
    tensors = {"rows": torch.from_numpy(grounding.nearest.rows), "cells": torch.from_numpy(grounding.nearest.cells),
               "cosine": torch.from_numpy(grounding.nearest.scores), "usage": torch.from_numpy(grounding.usage)}
    fields = {"split": grounding.split, "n_patches": grounding.n_patches, "cache_fingerprint": cache_fingerprint,
              "codes_hash": codes_hash, "ids": {str(k): v for k, v in grounding.ids.items()}}
    write_artifact(path, tensors, kind="grounding", fields=fields)


def load_grounding(path: str | Path) -> tuple[Grounding, dict]:
    """Read a grounding file -> (grounding, its fields: cache_fingerprint, codes_hash, ...)."""
    tensors, fields = read_artifact(path, kind="grounding")
    nearest = TopImages(tensors["rows"].numpy(), tensors["cells"].numpy(), tensors["cosine"].numpy())
    grounding = Grounding(nearest=nearest, usage=tensors["usage"].numpy(), n_patches=int(fields["n_patches"]),
                          split=fields["split"], ids={int(k): v for k, v in fields["ids"].items()})
    return grounding, fields


def grounding_for_run(run_path: str | Path, head: ProtoQuantHead, cache: Cache, *, top: int = 10,
                      split: str = "train", device: str | torch.device = "cpu") -> Grounding:
    """The run's stored grounding when it fits (same cache, same codes, at least `top` images), else a
    fresh one, computed and stored in RUN for the next page or metric."""
    path = Path(run_path) / GROUNDING_FILE
    digest = codes_digest(head)
    if path.is_file():
        grounding, fields = load_grounding(path)
        fits = (fields.get("cache_fingerprint") == cache.fingerprint and fields.get("codes_hash") == digest
                and grounding.split == split and grounding.nearest.rows.shape[1] >= top)
        if fits:
            grounding.nearest = grounding.nearest.first(top)
            return grounding
    grounding = ground_codes(head, cache, split=split, top=top, device=device)
    save_grounding(path, grounding, cache_fingerprint=cache.fingerprint, codes_hash=digest)
    return grounding


def receptive_boxes(preprocessing: Preprocessing, rows: np.ndarray, cells: np.ndarray, image_size: np.ndarray,
                    boxes: np.ndarray | None) -> np.ndarray:
    """Receptive boxes in original pixels for (row, cell) slots -> (..., 4) x, y, w, h; NaN in empty slots.

    rows (...) cache rows (-1 = empty), cells (..., 2) (h, w); image_size (N, 2) and boxes (N, 4) are
    the split's per-row original sizes and CUB boxes (boxes matter only for crop_to_box caches).
    """
    return slot_boxes(preprocessing, rows, image_size, boxes,
                      lambda geometry, index: geometry.cell_box(cells[index][..., 0], cells[index][..., 1]))


def slot_boxes(preprocessing: Preprocessing, rows: np.ndarray, image_size: np.ndarray, boxes: np.ndarray | None,
               box_of: Callable) -> np.ndarray:
    """box_of(image geometry, slot indices) -> (n, 4) x, y, w, h for every filled slot of rows (-1 = empty), one
    call per image over all of its slots (indices: the tuple of index arrays of those slots); (..., 4), NaN in
    empty slots. The one loop behind every box in original pixels."""
    out = np.full((*rows.shape, 4), np.nan)
    filled = np.nonzero(rows >= 0)
    if not len(filled[0]):
        return out
    of_slot = rows[filled].astype(np.int64)
    order = np.argsort(of_slot, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(of_slot[order]) != 0])
    for first, last in zip(starts, np.r_[starts[1:], len(order)]):
        picked = order[first:last]
        row = int(of_slot[picked[0]])
        geometry = preprocessing.image(tuple(image_size[row]), None if boxes is None else tuple(boxes[row]))
        index = tuple(axis[picked] for axis in filled)
        out[index] = box_of(geometry, index)
    return out


class SplitImages:
    """The original images behind a cache split's rows, read from DATA and matched by image id."""

    def __init__(self, cache: Cache, split: str, data: str | Path | None = None):
        from pipeline.datasets import open_dataset

        recorded = (cache.attrs.get("source") or {}).get("path")
        self.data = str(data or recorded or "")
        if not self.data:
            raise ProtoquantError(f"{cache.path} records no dataset path: pass --data DATA")
        self.recorded, self.split = recorded, split
        dataset = open_dataset(self.data)
        self.records = {record.id: record for record in dataset.splits.get(split, [])}
        self.ids = cache.split(split).ids

    def record(self, row: int):
        """The dataset record of a cache row."""
        image_id = str(self.ids[row])
        record = self.records.get(image_id)
        if record is None:
            raise ProtoquantError(f"image {image_id} of the cache's {self.split} split is not in {self.data}: pass "
                                  f"--data with the dataset the cache was extracted from (recorded: {self.recorded})")
        return record

    def load(self, row: int):
        """The original RGB image of a cache row (never cropped: boxes are in original pixels)."""
        from pipeline.datasets import load_image

        return load_image(self.record(row))


# --- the push: every code becomes its nearest training patch (ProtoPNet's projection) ----------------

@dataclass
class NearestPatches:
    """For every code, the training patch nearest to it by cosine, found exactly over a whole scan."""

    cosine: torch.Tensor  # (K,) float32
    vectors: torch.Tensor  # (K, D) float32: the patch embeddings themselves
    patch: torch.Tensor  # (K,) int64: the patch's position in the scan (image order x H*W + cell)


@torch.no_grad()
def nearest_patches(codes: torch.Tensor, batches, *, device: str | torch.device = "cpu") -> NearestPatches:
    """Scan (features (B, H, W, D), labels) batches once; keep each code's best-matching patch."""
    codes = codes.detach().float().to(device)
    best = torch.full((codes.shape[0],), float("-inf"), device=device)
    vectors = torch.zeros_like(codes)
    patch = torch.full((codes.shape[0],), -1, dtype=torch.long, device=device)
    seen = 0
    for features, _ in batches:
        flat = features.to(device).float().flatten(0, 2)  # (B, H, W, D) -> (B*H*W, D)
        cosine = patch_cosines(features.to(device), codes).flatten(0, 1)  # (B*H*W, K)
        score, where = cosine.max(dim=0)  # (K,)
        better = score > best  # ties keep the earlier patch
        best = torch.where(better, score, best)
        vectors[better] = flat[where[better]]
        patch[better] = where[better] + seen
        seen += flat.shape[0]
    if seen == 0:
        raise ProtoquantError("grounding the codes needs training patches, and the training share is empty")
    return NearestPatches(best.cpu(), vectors.cpu(), patch.cpu())


def embedded(head: ProtoQuantHead, batches):
    """(features, labels) batches as the head's codes see them (ProtoQuantHead.embed): a projected head's
    nearest patch is the nearest projected patch, and its push copies that projected vector."""
    device = head.codes.device
    for features, labels in batches:
        yield head.embed(features.to(device)), labels


@torch.no_grad()
def push_codes(head: ProtoQuantHead, batches, *, device: str | torch.device = "cpu") -> dict:
    """Replace every code by its nearest training patch, in place, so each prototype IS a training patch
    (with a projection: the projection of one; freeze_codes then keeps both fixed).

    Two codes that land on the same patch would split that patch's softmax share between them; the
    later one is removed (code_mask), the first keeps the patch. Returns what the push changed.
    """
    nearest = nearest_patches(head.codes, embedded(head, batches), device=device)
    exists = head.code_mask.cpu()
    before = nearest.cosine[exists]
    head.codes.data.copy_(nearest.vectors.to(head.codes.device))
    duplicates = _duplicate_codes(nearest.patch, exists)
    if duplicates:
        head.remove_codes(duplicates)
    return {"pushed": True, "mean_cosine_before": float(before.mean()), "min_cosine_before": float(before.min()),
            "duplicates_removed": len(duplicates)}


def _duplicate_codes(patch: torch.Tensor, exists: torch.Tensor) -> list[int]:
    """Existing codes whose patch an earlier existing code already took."""
    taken: set[int] = set()
    duplicates = []
    for code in torch.nonzero(exists).flatten().tolist():
        where = int(patch[code])
        if where in taken:
            duplicates.append(code)
        taken.add(where)
    return duplicates
