"""Where a grid cell sits in the original image, and on which cell an original pixel lands.

The cache records the preprocessing the backbone saw (timm's resolved data config, and whether CUB
images were cropped to their bird box). This module replays it as arithmetic, exactly as timm's eval
transform (timm/data/transforms_factory.py, transforms_imagenet_eval) and torchvision do it:

    original image --(crop_to_box: the CUB box, rounded and clipped as pipeline.images.crop_box)-->
    region --(resize, by crop_mode)--> resized --(centre crop of S, or pad when smaller)--> input S x S
      center: the shorter side becomes floor(S / crop_pct), the longer one keeps the aspect ratio
      squash: both sides become floor(S / crop_pct), the aspect ratio is not kept
      border: the longer side becomes floor(S / crop_pct), then crop, or pad when smaller

Every step is a scale and a shift per axis, so the whole map is one affine map per axis.

Coordinates are continuous: pixel (column i, row j) covers [i, i+1) x [j, j+1). Keypoints (CUB,
make-birds) are pixel indices, so a keypoint sits at the pixel's centre (i + 0.5, j + 0.5). The
receptive box of grid cell (h, w) on an H x W grid is the cell's S_h/H x S_w/W square of the input
(METHOD.md "Explanations": the patch is the receptive cell), mapped back to original pixels.

THE box convention of protoquant (CUB's bounding_boxes.txt, part boxes, receptive boxes, predict's
--json, explain's pages, the metrics): a box is (x, y, width, height) in the ORIGINAL image's pixels,
continuous and half-open, covering [x, x + width) x [y, y + height). Cells are (h, w) = (row, column)
of the grid. Network-input pixels never leave this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ProtoquantError

Box = tuple[float, float, float, float]  # x, y, width, height
DEFAULT_CROP_PCT = 0.875  # timm's default when a data config gives none
CROP_MODES = ("center", "squash", "border")
PIXEL_CENTRE = 0.5  # a keypoint given as a pixel index sits at the pixel's centre


@dataclass(frozen=True)
class Preprocessing:
    """The recorded preprocessing of a cache: enough to place any cell in any of its images."""

    input_size: tuple[int, int]  # (S_h, S_w): the network input
    crop_pct: float
    crop_mode: str  # "center" | "squash" | "border"
    grid: tuple[int, int]  # (H, W) cells
    crop_to_box: bool = False

    @classmethod
    def from_provenance(cls, provenance: dict, *, crop_to_box: bool = False) -> "Preprocessing":
        """From a cache's provenance (data_config + grid) and its crop_to_box attribute."""
        config = provenance["data_config"]
        mode = config.get("crop_mode") or "center"
        if mode not in CROP_MODES:
            raise ProtoquantError(f"the cache's data config has crop_mode {mode!r}; protoquant maps cells for "
                                  f"{', '.join(CROP_MODES)} only: re-extract with one of those")
        size = config["input_size"]
        return cls(input_size=(int(size[-2]), int(size[-1])), crop_pct=float(config.get("crop_pct") or DEFAULT_CROP_PCT),
                   crop_mode=mode, grid=(int(provenance["grid"][0]), int(provenance["grid"][1])), crop_to_box=crop_to_box)

    @classmethod
    def from_cache(cls, cache) -> "Preprocessing":
        """From an open pipeline.cache.Cache."""
        return cls.from_provenance(cache.provenance, crop_to_box=bool(cache.attrs.get("crop_to_box", False)))

    @property
    def scale_size(self) -> tuple[int, int]:
        """(h, w) that the resize aims at: floor(S / crop_pct) per axis, as timm computes it."""
        return math.floor(self.input_size[0] / self.crop_pct), math.floor(self.input_size[1] / self.crop_pct)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a width x height region after the resize step."""
        target_h, target_w = self.scale_size
        if self.crop_mode == "squash":
            return target_w, target_h
        if self.crop_mode == "center" and target_h == target_w:
            # torchvision Resize(int): the shorter side becomes the size, the longer one int(size * long / short)
            short, long = min(width, height), max(width, height)
            new_long = int(target_h * long / short)
            return (target_h, new_long) if width <= height else (new_long, target_h)
        # timm ResizeKeepRatio: "center" with a non-square target (longest=0), "border" (longest=1)
        longest = 1.0 if self.crop_mode == "border" else 0.0
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        return round(width / ratio), round(height / ratio)

    def region(self, image_size: tuple[int, int], box: Box | None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the part of the original image fed to the resize."""
        width, height = int(image_size[0]), int(image_size[1])
        if not self.crop_to_box:
            return 0, 0, width, height
        if box is None:
            raise ProtoquantError("the cache was extracted with --crop-to-box but this image has no bounding box: "
                                  "pass the image's box, or use a cache made without --crop-to-box")
        x, y, w, h = box  # rounded and clipped exactly as pipeline.images.crop_box does
        return max(0, round(x)), max(0, round(y)), min(width, round(x + w)), min(height, round(y + h))

    def image(self, image_size: tuple[int, int], box: Box | None = None) -> "ImageGeometry":
        """The geometry of one image of original (width, height); `box` is its CUB box (x, y, w, h)."""
        left, top, right, bottom = self.region(image_size, box)
        if right <= left or bottom <= top:
            raise ProtoquantError(f"image of size {tuple(image_size)}: its box {box} leaves nothing to crop")
        resized_w, resized_h = self.resized_size(right - left, bottom - top)
        size_h, size_w = self.input_size
        return ImageGeometry(
            scale=(resized_w / (right - left), resized_h / (bottom - top)),
            offset=(left + 0.0, top + 0.0),
            crop=(_crop_start(resized_w, size_w), _crop_start(resized_h, size_h)),
            input_size=self.input_size, grid=self.grid, region=(left, top, right, bottom),
        )


def _crop_start(resized: int, size: int) -> int:
    """Where the centre crop of `size` starts in a `resized` axis; negative = padding before it.

    torchvision / timm: a smaller axis is padded by (size - resized) // 2 before, then nothing is cut.
    """
    if resized < size:
        return -((size - resized) // 2)
    return int(round((resized - size) / 2.0))


@dataclass(frozen=True)
class ImageGeometry:
    """One image's affine map per axis: input = (original - offset) * scale - crop."""

    scale: tuple[float, float]  # (x, y): resized pixels per region pixel
    offset: tuple[float, float]  # (x, y): the region's top-left corner in the original image
    crop: tuple[int, int]  # (x, y): the centre crop's start in the resized image
    input_size: tuple[int, int]  # (S_h, S_w)
    grid: tuple[int, int]  # (H, W)
    region: tuple[int, int, int, int]  # (left, top, right, bottom): the original pixels the network saw

    @property
    def cell_size(self) -> tuple[float, float]:
        """(width, height) of one cell in input pixels."""
        return self.input_size[1] / self.grid[1], self.input_size[0] / self.grid[0]

    def to_input(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Original-image coordinates -> input coordinates (continuous, arrays or scalars)."""
        u = (np.asarray(x, dtype=np.float64) - self.offset[0]) * self.scale[0] - self.crop[0]
        v = (np.asarray(y, dtype=np.float64) - self.offset[1]) * self.scale[1] - self.crop[1]
        return u, v

    def to_original(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        """Input coordinates -> original-image coordinates (continuous)."""
        x = (np.asarray(u, dtype=np.float64) + self.crop[0]) / self.scale[0] + self.offset[0]
        y = (np.asarray(v, dtype=np.float64) + self.crop[1]) / self.scale[1] + self.offset[1]
        return x, y

    def cell_of_point(self, x, y) -> np.ndarray:
        """Continuous original coordinates -> (..., 2) int64 cells (h, w); (-1, -1) where not in the input.

        A point of the original image that the crop (or crop_to_box) cut away lies on no cell.
        """
        u, v = self.to_input(x, y)
        cell_w, cell_h = self.cell_size
        col, row = np.floor(u / cell_w).astype(np.int64), np.floor(v / cell_h).astype(np.int64)
        inside = (row >= 0) & (row < self.grid[0]) & (col >= 0) & (col < self.grid[1])
        inside &= self._in_region(x, y)
        cells = np.stack([row, col], axis=-1)
        return np.where(inside[..., None], cells, -1)

    def cell_of_keypoint(self, x, y) -> np.ndarray:
        """Keypoints given as pixel indices (CUB part_locs) -> (..., 2) cells (h, w), (-1, -1) outside."""
        return self.cell_of_point(np.asarray(x, dtype=np.float64) + PIXEL_CENTRE,
                                  np.asarray(y, dtype=np.float64) + PIXEL_CENTRE)

    def cell_box(self, h, w) -> np.ndarray:
        """Receptive box of cell (h, w) in original pixels -> (..., 4) float64 (x, y, width, height).

        The box is the cell's square in the input mapped back, clipped to the pixels the network saw
        (padding, in crop_mode "border", is not part of the image).
        """
        cell_w, cell_h = self.cell_size
        w, h = np.asarray(w, dtype=np.float64), np.asarray(h, dtype=np.float64)
        x0, y0 = self.to_original(w * cell_w, h * cell_h)
        x1, y1 = self.to_original((w + 1) * cell_w, (h + 1) * cell_h)
        left, top, right, bottom = self.region
        x0, x1 = np.clip(x0, left, right), np.clip(x1, left, right)
        y0, y1 = np.clip(y0, top, bottom), np.clip(y1, top, bottom)
        return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)

    def input_box(self) -> np.ndarray:
        """The whole network input in original pixels (x, y, width, height), clipped to what it saw."""
        x0, y0 = self.to_original(0.0, 0.0)
        x1, y1 = self.to_original(float(self.input_size[1]), float(self.input_size[0]))
        left, top, right, bottom = self.region
        x0, x1 = max(float(x0), left), min(float(x1), right)
        y0, y1 = max(float(y0), top), min(float(y1), bottom)
        return np.array([x0, y0, x1 - x0, y1 - y0])

    def _in_region(self, x, y) -> np.ndarray:
        left, top, right, bottom = self.region
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return (x >= left) & (x < right) & (y >= top) & (y < bottom)


def box_contains(box, x, y) -> np.ndarray:
    """Whether continuous points (x, y) lie in boxes (..., 4) x, y, w, h (left/top edges included)."""
    box = np.asarray(box, dtype=np.float64)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (x >= box[..., 0]) & (x < box[..., 0] + box[..., 2]) & (y >= box[..., 1]) & (y < box[..., 1] + box[..., 3])
