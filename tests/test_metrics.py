"""Grounding and the interpretability metrics, each on a case whose answer is known by construction.

The "squares" dataset (CUB layout, written here): plain grey, slightly noisy images, each with one
coloured square centred on a grid cell of the network input - red for class 0, blue for class 1. The
square is the only part ("square"; a second part, "tail", is never visible), its keypoint is the square's
centre, its part box and bird box the square itself. A real random-init timm ViT extracts the cache; the
hand-built heads have codes taken from that cache: the mean feature of the red squares' cells, of the
blue squares' cells, and of the background cells. So the right answers are known: the red code fires
on the squares (purity 1.0), the background code never does (purity 0.0), and painting the square
grey takes away the class score while painting a background patch does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import load_backbone_for_cache
from pipeline.cache import Cache
from pipeline.geometry import Preprocessing
from pipeline.grounding import (GROUNDING_FILE, codes_digest, ground_codes, grounding_for_run, load_grounding,
                                top_images)
from pipeline.metrics import (ImageModel, MisalignmentSettings, PartImage, background_colour, deletion,
                              evidence_on_defining_parts, misalignment, paint, part_fractions, pgd_outside, purity,
                              random_background_box, stability)
from pipeline.model import ProtoQuantHead
from stages.extract import extract

SIZE = 128  # image side = network input side for test_vit at --image-size 128 (8 x 8 grid of 16-px cells)
SIDE = 12  # square side in pixels: inside one cell
COLOURS = {0: (220, 30, 30), 1: (30, 60, 220)}
GREY = 128


class Squares:
    """The written dataset, its cache, and per split the square's keypoint of every cache row."""

    def __init__(self, root: Path, cache: Cache, preprocessing: Preprocessing):
        self.root, self.cache, self.preprocessing = root, cache, preprocessing

    def square_cells(self, split: str) -> np.ndarray:
        """(N, 2) the grid cell holding each row's square."""
        data = self.cache.split(split)
        locs = data.annotations()["part_locs"]
        return np.stack([self.preprocessing.image(tuple(size)).cell_of_keypoint(*locs[i, 0, :2])
                         for i, size in enumerate(data.image_size)])


def write_squares(root: Path, *, per_class: tuple[int, int] = (12, 4), seed: int = 0) -> None:
    """CUB layout: 2 classes x (train, test) images; squares centred on interior cells of the input."""
    rng = np.random.default_rng(seed)
    geometry = Preprocessing((SIZE, SIZE), 0.95, "center", (8, 8)).image((SIZE, SIZE))  # test_vit's data config
    lines = {name: [] for name in ("images", "labels", "split", "boxes", "locs", "part_boxes")}
    image_id = 0
    for label, name in enumerate(("001.Red", "002.Blue")):
        for i in range(sum(per_class)):
            image_id += 1
            pixels = np.clip(GREY + rng.normal(0, 4, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            h, w = rng.integers(1, 7, size=2)
            x, y, bw, bh = geometry.cell_box(h, w)
            left, top = int(round(x + bw / 2 - SIDE / 2)), int(round(y + bh / 2 - SIDE / 2))
            pixels[top:top + SIDE, left:left + SIDE] = COLOURS[label]
            rel = f"{name}/{name[4:]}_{i:03d}.png"
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "images" / rel)
            box = f"{left} {top} {SIDE} {SIDE}"
            centre = (left + SIDE // 2, top + SIDE // 2)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {label + 1}")
            lines["split"].append(f"{image_id} {int(i < per_class[0])}")
            lines["boxes"].append(f"{image_id} {box}")
            lines["locs"] += [f"{image_id} 1 {centre[0]} {centre[1]} 1", f"{image_id} 2 0 0 0"]
            lines["part_boxes"] += [f"{image_id} 1 {box}", f"{image_id} 2 0 0 0 0"]
    (root / "parts").mkdir(parents=True, exist_ok=True)
    files = {"images.txt": "images", "image_class_labels.txt": "labels", "train_test_split.txt": "split",
             "bounding_boxes.txt": "boxes", "parts/part_locs.txt": "locs", "parts/part_boxes.txt": "part_boxes"}
    for rel, key in files.items():
        (root / rel).write_text("\n".join(lines[key]) + "\n")
    (root / "classes.txt").write_text("1 001.Red\n2 002.Blue\n")
    (root / "parts/parts.txt").write_text("1 square\n2 tail\n")


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Squares:
    root = tmp_path_factory.mktemp("squares")
    write_squares(root / "data")
    extract(root / "data", root / "cache.zarr", backbone="test_vit", image_size=SIZE, workers=0, batch_size=16)
    cache = Cache(root / "cache.zarr")
    return Squares(root / "data", cache, Preprocessing.from_cache(cache))


def square_head(squares: Squares, *, tau: float = 0.1) -> ProtoQuantHead:
    """Codes: mean feature of red-square cells, of blue-square cells, of background cells (train split).

    Weights: red -> class 0, blue -> class 1, background -> both, a little (relu keeps them >= 0).
    """
    data = squares.cache.split("train")
    features = torch.from_numpy(data.load()).float()  # (N, H, W, D)
    cells, labels = squares.square_cells("train"), data.labels
    n, height, width = features.shape[:3]
    on_square = torch.zeros(n, height, width, dtype=torch.bool)
    on_square[torch.arange(n), cells[:, 0], cells[:, 1]] = True
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    far = ((hh[None] - torch.from_numpy(cells[:, 0])[:, None, None]).abs() > 1) | \
          ((ww[None] - torch.from_numpy(cells[:, 1])[:, None, None]).abs() > 1)  # (N, H, W) off the square's block
    is_red = torch.from_numpy(labels == 0)[:, None, None]
    codes = torch.stack([features[on_square & is_red].mean(0), features[on_square & ~is_red].mean(0),
                         features[far].mean(0)])
    head = ProtoQuantHead(codes, 2, tau=tau)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.05], [0.0, 1.0, 0.05]]))
    return head.eval()


def square_model(squares: Squares, head: ProtoQuantHead) -> ImageModel:
    return ImageModel(load_backbone_for_cache(squares.cache.provenance), head)


def split_items(squares: Squares, split: str) -> list[PartImage]:
    """The split's images, in cache row order, with their annotations."""
    data = squares.cache.split(split)
    annotations = data.annotations()
    return [PartImage(Image.open(squares.root / image_id).convert("RGB"), int(label),
                      tuple(annotations["boxes"][i]), annotations["part_locs"][i], annotations["part_boxes"][i])
            for i, (image_id, label) in enumerate(zip(data.ids, data.labels))]


# ---- the cache and the model from pixels ----------------------------------------------------------------

def test_pixels_through_the_image_model_give_the_cached_features(squares):
    model = square_model(squares, square_head(squares))
    items = split_items(squares, "test")[:4]
    pixels = torch.stack([model.pixels(item.image) for item in items])
    assert pixels.shape == (4, 3, SIZE, SIZE) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    with torch.no_grad():
        grid = model.grid(pixels)
    cached = torch.from_numpy(squares.cache.split("test").features[:4]).float()
    torch.testing.assert_close(grid, cached, atol=2e-2, rtol=2e-3)  # float16 storage


# ---- grounding --------------------------------------------------------------------------------------------

def brute_force_nearest(head: ProtoQuantHead, features: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per code, the `top` images by their best cosine, from the whole split at once."""
    similarity = head.similarity(torch.from_numpy(features)).flatten(2).amax(dim=2)  # (N, K)
    scores, rows = similarity.T.sort(dim=1, descending=True)
    return rows[:, :top].numpy(), scores[:, :top].numpy()


def test_streamed_grounding_equals_brute_force_and_finds_the_patch_a_code_copies(squares):
    data = squares.cache.split("train")
    features = data.load()
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(5, squares.cache.dim, generator=generator)
    codes[4] = torch.from_numpy(features[7, 3, 5]).float()  # a code that IS a training patch
    head = ProtoQuantHead(codes, 2)
    head.remove_codes([1])
    grounding = ground_codes(head, squares.cache, top=6, images_per_batch=3)  # blocks smaller than the split
    rows, scores = brute_force_nearest(head, features, 6)
    assert np.array_equal(grounding.nearest.rows, rows)
    np.testing.assert_allclose(grounding.nearest.scores, scores, rtol=1e-5)
    assert grounding.nearest.rows[4, 0] == 7 and grounding.nearest.cells[4, 0].tolist() == [3, 5]
    assert grounding.cosine[4] == pytest.approx(1.0, abs=1e-5)
    # usage: every patch counted once, never for the removed code, and as the argmax says
    height, width = squares.cache.grid
    assert grounding.n_patches == len(features) * height * width == grounding.usage.sum()
    assert grounding.usage[1] == 0
    similarity = head.similarity(torch.from_numpy(features))
    similarity[:, 1] = float("-inf")
    assert np.array_equal(grounding.usage, np.bincount(similarity.argmax(dim=1).flatten().numpy(), minlength=5))
    assert grounding.ids[7] == str(data.ids[7])


def test_grounding_is_stored_in_the_run_and_recomputed_when_codes_change(squares, tmp_path):
    head = square_head(squares)
    first = grounding_for_run(tmp_path, head, squares.cache, top=4)
    stored, fields = load_grounding(tmp_path / GROUNDING_FILE)
    assert fields["codes_hash"] == codes_digest(head) and fields["cache_fingerprint"] == squares.cache.fingerprint
    assert np.array_equal(stored.nearest.rows, first.nearest.rows) and stored.ids == first.ids
    assert grounding_for_run(tmp_path, head, squares.cache, top=2).nearest.rows.shape == (3, 2)  # reused, cut
    moved = ProtoQuantHead(head.codes.flip(0), 2)
    again = grounding_for_run(tmp_path, moved, squares.cache, top=4)
    assert np.array_equal(again.nearest.rows, first.nearest.rows[::-1])
    assert load_grounding(tmp_path / GROUNDING_FILE)[1]["codes_hash"] == codes_digest(moved)


# ---- purity ---------------------------------------------------------------------------------------------------

def test_part_fractions_count_visible_keypoints_inside_boxes():
    boxes = np.zeros((1, 10, 4))
    boxes[0, :, :] = [10, 10, 20, 20]  # covers pixels 10..29
    keypoints = np.zeros((1, 10, 2, 3))
    keypoints[0, :7, 0] = [15, 29, 1]  # 7 of 10 boxes hold part 0 (pixel 29 is the box's last column)
    keypoints[0, 7:, 0] = [30, 15, 1]  # pixel 30 is outside
    keypoints[0, :, 1] = [20, 20, 0]  # part 1 lies inside every box but is never visible
    np.testing.assert_allclose(part_fractions(boxes, keypoints), [[0.7, 0.0]])
    boxes[0, 5:] = np.nan  # only 5 filled slots, all holding part 0
    np.testing.assert_allclose(part_fractions(boxes, keypoints), [[1.0, 0.0]])


def test_purity_is_one_for_the_square_code_and_zero_for_the_background_code(squares):
    head = square_head(squares)
    result = purity(head, squares.cache, top=10)
    strict, protocol = result["purity_strict"], result["purity"]
    assert strict["codes"] == 3 and strict["top"] == 10
    tops = top_images(head.activation, squares.cache.split("train"), n_codes=3, top=10, images_per_batch=8)
    cells = squares.square_cells("train")
    assert (tops.cells[0] == cells[tops.rows[0]]).all()  # red code: argmax on the square in its top images
    assert not (tops.cells[2] == cells[tops.rows[2]]).all(axis=1).any()  # background code: never on it
    # strict: every code in use; per code purity 1.0 (red), 1.0 (blue), 0.0 (background)
    assert strict["mean"] == pytest.approx(2 / 3) and strict["above_0_5"] == 2
    assert strict["pure_codes_by_part"] == {"square": 2, "tail": 0}
    # the PIP-Net protocol counts codes with a weight > 0.1 only: the background code (0.05) is out
    assert protocol["codes"] == 2 and protocol["mean"] == pytest.approx(1.0) and protocol["above_0_5"] == 2
    assert protocol["weight_threshold"] == 0.1 and protocol["never_present"] == 0
    assert protocol["pure_codes_by_part"] == {"square": 2, "tail": 0}
    assert not protocol["preprocessing_as_protocol"]  # test_vit's centre crop, 128 px


def test_purity_protocol_drops_codes_never_present_above_0_1(squares):
    head = square_head(squares)
    never = -head.codes[2]  # opposite to the background: outcompeted by it everywhere, presence ~ e^-20
    grown = ProtoQuantHead(torch.cat([head.codes, never[None]]), 2, tau=0.1)
    with torch.no_grad():
        grown.weight.copy_(torch.tensor([[1.0, 0.0, 0.05, 1.0], [0.0, 1.0, 0.05, 0.0]]))
    protocol = purity(grown.eval(), squares.cache, top=10)["purity"]
    assert protocol["never_present"] == 1 and protocol["codes"] == 2 and protocol["mean"] == pytest.approx(1.0)


# ---- evidence on defining parts ---------------------------------------------------------------------------------

def test_evidence_on_defining_parts_is_one_when_the_top_code_sits_on_the_defining_part(squares):
    head = square_head(squares)
    result = evidence_on_defining_parts(head, squares.cache, [["square"], ["square"]], split="test")
    assert result["images"] == 8 and result["hits"] == 8 and result["share"] == 1.0  # every test image correct
    assert result["on_any_part"] == 1.0 and result["by_part"] == {"square": 8}
    assert result["share_pipnet_patch"] == 1.0  # purity's patch at the same peak cell holds the square too
    # a random cell: the square's keypoint lies in exactly one of the grid's cell boxes, which tile the image
    height, width = squares.cache.grid
    assert result["chance"] == pytest.approx(1 / (height * width))
    assert result["chance"] <= result["chance_pipnet_patch"] < 0.1  # this small grid's patch is about a cell
    # the square's part box is its cell: the peak cell's centre lies on it, a random cell's in 1 of H x W
    assert result["share_part_box"] == 1.0 and result["chance_part_box"] == pytest.approx(1 / (height * width))
    # the tail defines both classes but is never visible: no image's evidence is on it
    tail = evidence_on_defining_parts(head, squares.cache, [["tail"], ["tail"]], split="test")
    assert tail["share"] == 0.0 and tail["on_any_part"] == 1.0 and tail["images"] == 8


def test_evidence_is_zero_when_the_head_looks_at_the_background(squares):
    head = square_head(squares)
    with torch.no_grad():  # the background code is the top evidence of both classes; the squares still decide
        head.weight.copy_(torch.tensor([[0.6, 0.0, 1.0], [0.0, 0.6, 1.0]]))
    result = evidence_on_defining_parts(head, squares.cache, [["square"], ["square"]], split="test")
    assert result["images"] > 0 and result["share"] == 0.0 and result["on_any_part"] == 0.0
    assert result["share_pipnet_patch"] < 1.0  # off the square's block, a background patch misses it at times
    assert result["share_part_box"] == 0.0  # the background code's peak is off the square's box


# ---- misalignment -----------------------------------------------------------------------------------------------

def test_pgd_outside_leaves_the_box_untouched_and_moves_the_rest_to_the_eps_bound():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.full((2, 3, 8, 8), 0.5)
    weights = torch.randn(2, 3, 8, 8, generator=generator)
    inside = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    inside[0, :, 2:5, 3:6] = True
    inside[1, :, 0:2, 0:8] = True
    adversarial = pgd_outside(pixels, inside, lambda x: (x * weights).flatten(1).sum(1), eps=0.1, step=0.04, steps=4)
    box = inside.expand_as(pixels)
    assert torch.equal(adversarial[box], pixels[box])  # exactly unchanged inside
    expected = (0.5 - 0.1 * weights.sign())[~box]  # 4 steps of 0.04 reach the 0.1 bound against the gradient
    torch.testing.assert_close(adversarial[~box], expected)


def test_misalignment_is_zero_without_a_budget_and_positive_with_one(squares):
    model = square_model(squares, square_head(squares))
    items = split_items(squares, "test")[:3]
    pixels = torch.stack([model.pixels(item.image) for item in items])
    labels = torch.tensor([item.label for item in items])
    none = misalignment(model, pixels, labels, MisalignmentSettings(eps=0.0, step=0.0, steps=1, batch_size=2))
    assert none["pac"] == 0 and none["prc"] == 0 and none["plc"] == 0 and none["accuracy_change"] == 0
    assert none["accuracy_clean"] == 1.0 and none["images"] == 3
    attacked = misalignment(model, pixels, labels, MisalignmentSettings(eps=16 / 255, step=8 / 255, steps=2))
    assert attacked["pac"] > 0  # a ViT's patch token hears the whole image: pixels outside lower it
    assert set(attacked) == {"pac", "prc", "plc", "accuracy_clean", "accuracy_attacked", "accuracy_change",
                             "images", "eps", "steps"}


# ---- stability --------------------------------------------------------------------------------------------------

def test_stability_is_one_without_noise_and_lower_under_heavy_noise(squares):
    model = square_model(squares, square_head(squares))
    pixels = torch.stack([model.pixels(item.image) for item in split_items(squares, "test")[:5]])
    calm = stability(model, pixels, sigma=0.0, codes_per_image=3, batch_size=3)
    assert calm["stability"] == 1.0 and calm["activations"] == 2 * len(pixels)  # red or blue, and background
    stormy = stability(model, pixels, sigma=1.0, codes_per_image=3, seed=1)
    assert stormy["stability"] < 1.0


# ---- deletion ---------------------------------------------------------------------------------------------------

def test_paint_and_background_colour():
    image = Image.new("RGB", (20, 10), (10, 20, 30))
    painted = paint(image, (2.5, 1.0, 3.0, 2.0), np.array([200, 100, 50], dtype=np.uint8))
    pixels = np.asarray(painted)
    assert (pixels[1:3, 2:6] == [200, 100, 50]).all() and (pixels[0] == [10, 20, 30]).all()
    assert (pixels[:, 6:] == [10, 20, 30]).all()  # whole pixels covering x 2.5 .. 5.5: columns 2..5
    assert background_colour(painted, (2.5, 1.0, 3.0, 2.0)).tolist() == [10, 20, 30]  # the ring around the box


def test_random_background_box_stays_inside_the_area_and_off_the_object():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y, w, h = random_background_box((10.0, 20.0, 100.0, 50.0), 8.0, 6.0, [(40.0, 30.0, 30.0, 30.0), None], rng)
        assert (w, h) == (8.0, 6.0) and 10 <= x <= 102 and 20 <= y <= 64
        assert not (x < 70 and 40 < x + w and y < 60 and 30 < y + h)


def test_deleting_the_square_drops_the_score_more_than_a_background_patch(squares):
    model = square_model(squares, square_head(squares))
    items = split_items(squares, "test")[:5]
    result = deletion(model, items, squares.preprocessing, seed=0)
    assert result["images"] == len(items) and result["skipped"] == 0
    assert result["part_beats_random"] == 1.0
    assert result["part_drop"] > 0.3 and abs(result["random_drop"]) < 0.1 * result["part_drop"]
