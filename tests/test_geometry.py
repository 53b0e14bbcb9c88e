"""Geometry: original pixels <-> grid cells through the recorded preprocessing, checked against timm itself.

The exactness check draws images whose every pixel encodes its own (x, y), runs timm's real eval
transform with nearest-neighbour resampling, and reads back which original pixel landed on every
input pixel: geometry must place each input pixel's centre inside that very original pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform

from pipeline.backbones import load_backbone
from pipeline.errors import ProtoquantError
from pipeline.geometry import Preprocessing, box_contains
from pipeline.grounding import receptive_boxes
from pipeline.images import crop_box

PADDED = 4000  # decoded coordinate of a padded pixel (fill colour 255, 255, 255)


def coordinate_image(width: int, height: int) -> Image.Image:
    """Pixel (x, y) holds R = x mod 256, G = y mod 256, B = (x // 256) | (y // 256) << 4."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x & 255, y & 255, (x >> 8) | ((y >> 8) << 4)], axis=-1).astype(np.uint8))


def decode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, S_h, S_w) uint8 -> original x, y per input pixel."""
    p = pixels.astype(np.int64)
    return p[0] | ((p[2] & 15) << 8), p[1] | ((p[2] >> 4) << 8)


CASES = [
    # crop_mode, crop_pct, input (S_h, S_w), original (width, height), CUB box or None
    ("center", 0.875, (64, 64), (150, 97), None),       # landscape, shorter side resized
    ("center", 0.95, (64, 64), (61, 133), None),        # portrait, smaller than the resize target
    ("center", 0.875, (64, 64), (333, 251), None),
    ("center", 1.0, (48, 64), (120, 90), None),         # non-square input: ResizeKeepRatio
    ("squash", 0.9, (64, 64), (150, 97), None),         # aspect ratio not kept
    ("border", 1.0, (64, 64), (150, 97), None),         # longest side fitted, padded top and bottom
    ("border", 0.875, (56, 56), (40, 90), None),        # padded left and right
    ("center", 0.875, (64, 64), (150, 97), (10.4, 7.6, 80.5, 60.2)),  # crop_to_box first
]


@pytest.mark.parametrize("mode,crop_pct,size,image_size,box", CASES)
def test_every_input_pixel_maps_into_the_original_pixel_timm_sampled(mode, crop_pct, size, image_size, box):
    preprocessing = Preprocessing(size, crop_pct, mode, (4, 4), crop_to_box=box is not None)
    transform = create_transform(input_size=(3, *size), interpolation="nearest", crop_pct=crop_pct, crop_mode=mode,
                                 mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0), normalize=False)
    image = coordinate_image(*image_size)
    region = crop_box(image, box) if box else image  # the project's own crop, as extraction does it
    geometry = preprocessing.image(image_size, box)
    assert transform.transforms[0](region).size == preprocessing.resized_size(region.width, region.height)

    seen_x, seen_y = decode(transform(region).numpy())  # crop keeps the encoded values: original coords
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    x, y = geometry.to_original(cols + 0.5, rows + 0.5)
    padded = seen_x >= PADDED
    assert np.array_equal(padded, ~geometry._in_region(x, y))  # padding exactly where geometry leaves the image
    assert (mode == "border") == bool(padded.any())
    real = ~padded
    assert np.all((seen_x[real] - 1e-6 <= x[real]) & (x[real] < seen_x[real] + 1 + 1e-6))
    assert np.all((seen_y[real] - 1e-6 <= y[real]) & (y[real] < seen_y[real] + 1 + 1e-6))
    u, v = geometry.to_input(x, y)  # and back
    np.testing.assert_allclose(u, cols + 0.5, atol=1e-9)
    np.testing.assert_allclose(v, rows + 0.5, atol=1e-9)


def test_hand_computed_cells_and_boxes():
    # 200 x 100 image, S = 64, crop_pct 0.8: the short side becomes 80 -> resized 160 x 80, crop starts
    # at (48, 8); a 4 x 4 grid has 16-px cells in the input, 20-px cells in the original (scale 0.8).
    geometry = Preprocessing((64, 64), 0.8, "center", (4, 4)).image((200, 100))
    assert geometry.scale == (0.8, 0.8) and geometry.crop == (48, 8)
    np.testing.assert_allclose(geometry.cell_box(0, 0), [60, 10, 20, 20])
    np.testing.assert_allclose(geometry.cell_box(3, 2), [100, 70, 20, 20])
    np.testing.assert_allclose(geometry.input_box(), [60, 10, 80, 80])
    # keypoints are pixel indices: pixel 79 is [79, 80), inside cell column 0; pixel 80 starts column 1
    assert geometry.cell_of_keypoint(79, 29).tolist() == [0, 0]
    assert geometry.cell_of_keypoint(80, 29).tolist() == [0, 1]
    assert geometry.cell_of_keypoint(139, 89).tolist() == [3, 3]
    assert geometry.cell_of_keypoint([10, 140], [50, 50]).tolist() == [[-1, -1], [-1, -1]]  # cut away by the crop


def test_crop_to_box_offsets_every_cell_by_the_rounded_box():
    plain = Preprocessing((64, 64), 1.0, "center", (4, 4))
    cropped = Preprocessing((64, 64), 1.0, "center", (4, 4), crop_to_box=True)
    box = (20.4, 9.5, 64.0, 64.0)  # rounds to left 20, top 10 (Python rounds 9.5 to even: 10)
    inner = plain.image((64, 64))  # the 64 x 64 crop is the whole input: 16-px cells
    outer = cropped.image((150, 120), box)
    assert outer.region == (20, 10, 84, 74)
    np.testing.assert_allclose(outer.cell_box(1, 2), inner.cell_box(1, 2) + np.array([20, 10, 0, 0]))
    with pytest.raises(ProtoquantError, match="no bounding box"):
        cropped.image((150, 120), None)


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_cells_and_boxes_are_inverse(mode):
    geometry = Preprocessing((70, 70), 0.875, mode, (7, 7)).image((173, 111))
    h, w = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
    boxes = geometry.cell_box(h, w)  # (7, 7, 4)
    centres_x, centres_y = boxes[..., 0] + boxes[..., 2] / 2, boxes[..., 1] + boxes[..., 3] / 2
    cells = geometry.cell_of_point(centres_x, centres_y)
    visible = boxes[..., 2] * boxes[..., 3] > 0  # border mode: cells wholly in the padding have no pixels
    assert np.array_equal(cells[visible], np.stack([h, w], axis=-1)[visible])
    assert box_contains(boxes, centres_x, centres_y)[visible].all()
    # the visible cell boxes tile exactly the part of the image the network saw
    input_box = geometry.input_box()
    assert boxes[..., 2:].prod(axis=-1).sum() == pytest.approx(input_box[2] * input_box[3])


def test_preprocessing_from_a_real_backbone_provenance():
    backbone = load_backbone("test_resnet", image_size=64)
    preprocessing = Preprocessing.from_provenance(backbone.provenance())
    assert preprocessing == Preprocessing((64, 64), 0.95, "center", (2, 2))
    image = Image.new("RGB", (97, 150))
    assert backbone.transform.transforms[0](image).size == preprocessing.resized_size(97, 150) == (67, 103)
    rows = np.array([[1, -1]])
    boxes = receptive_boxes(preprocessing, rows, np.array([[[1, 0], [0, 0]]]), np.array([[10, 10], [97, 150]]), None)
    np.testing.assert_allclose(boxes[0, 0], preprocessing.image((97, 150)).cell_box(1, 0))
    assert np.isnan(boxes[0, 1]).all()  # empty slot


@pytest.mark.parametrize("mode,crop_pct", [("center", 0.9), ("squash", 1.0), ("squash", 0.8), ("border", 0.95)])
def test_extract_crop_options_reach_the_transform_and_the_geometry_alike(mode, crop_pct):
    """--crop-mode / --crop-pct as extract records them: the backbone's own transform and the geometry
    read from its provenance place every input pixel in the original pixel timm sampled."""
    backbone = load_backbone("test_resnet", image_size=64, layers="2,final", crop_mode=mode, crop_pct=crop_pct)
    preprocessing = Preprocessing.from_provenance(backbone.provenance())
    assert preprocessing == Preprocessing((64, 64), crop_pct, mode, (8, 8))  # the finest grid's cells
    image = coordinate_image(150, 97)
    assert backbone.transform.transforms[0](image).size == preprocessing.resized_size(150, 97)
    plain = {"interpolation": "nearest", "mean": (1.0, 1.0, 1.0), "std": (1.0, 1.0, 1.0)}  # padding decodes as PADDED
    nearest = create_transform(**{**backbone.data_config, **plain}, is_training=False, normalize=False)
    seen_x, seen_y = decode(nearest(image).numpy())
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    geometry = preprocessing.image((150, 97))
    x, y = geometry.to_original(cols + 0.5, rows + 0.5)
    real = seen_x < PADDED
    assert np.array_equal(real, geometry._in_region(x, y))
    assert np.all((seen_x[real] - 1e-6 <= x[real]) & (x[real] < seen_x[real] + 1 + 1e-6))
    assert np.all((seen_y[real] - 1e-6 <= y[real]) & (y[real] < seen_y[real] + 1 + 1e-6))
    # an 8-px cell of the input is the receptive cell: its box holds exactly the pixels sampled in it
    box = geometry.cell_box(3, 5)
    inside = seen_x[24:32, 40:48], seen_y[24:32, 40:48]
    assert box_contains(box, inside[0] + 0.5, inside[1] + 0.5).all()
