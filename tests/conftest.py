"""Shared fixtures: tiny datasets written to tmp_path, each returned with the truth it was built from.

Builders are plain functions (usable from any test or bench) plus one pytest fixture each. Images are
small random-noise pictures saved with PIL in a real format, so readers and decoders run for real.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PART_NAMES = ("beak", "left eye", "right wing", "tail")


@dataclass
class DataTruth:
    """What a generated dataset holds: root, class names, and per split the (relative path, label) list."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    parts: dict[str, tuple[tuple[float, float, int], ...]] = field(default_factory=dict)


@contextmanager
def one_thread():
    """torch on one thread in this process, as in a subprocess started with OMP_NUM_THREADS=1: float sums
    then round alike on both sides (the projection's start, principal directions, turns rounding into heads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_noise_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (32, 24)) -> None:
    """Save a random RGB image of `size` (width, height); the format follows the file extension."""
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_imagefolder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog", "owl"),
    per_class: dict[str, int] | None = None,
    test_dir: str = "test",
    seed: int = 0,
) -> DataTruth:
    """Write DATA/train/<class>/*.{png,jpg} and DATA/<test_dir>/<class>/*; return the truth.

    per_class maps split directory -> images per class (default: 3 train, 2 test).
    """
    per_class = per_class or {"train": 3, test_dir: 2}
    rng = np.random.default_rng(seed)
    files: dict[str, list[tuple[str, int]]] = {}
    for split_dir, count in per_class.items():
        entries = []
        for label, name in enumerate(sorted(classes)):
            for i in range(count):
                ext = ".png" if i % 2 == 0 else ".jpg"
                rel = f"{split_dir}/{name}/img_{i:03d}{ext}"
                write_noise_image(root / rel, rng)
                entries.append((rel, label))
        split = "test" if split_dir == "val" and "test" not in per_class else split_dir
        files[split] = entries
    return DataTruth(root=root, classes=sorted(classes), files=files)


def make_cub(root: Path, *, n_classes: int = 3, per_class: int = 4, seed: int = 0) -> DataTruth:
    """Write a tiny CUB-200-2011 layout (txt files, boxes, parts with spaces in names); return the truth.

    Image ids are assigned in class order; every second image of a class goes to train. The last part
    of each image is invisible (0, 0, 0), as CUB records parts it cannot see.
    """
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    classes = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in range(n_classes)]
    lines: dict[str, list[str]] = {name: [] for name in ("images", "labels", "split", "boxes", "locs")}
    truth = DataTruth(root=root, classes=classes, files={"train": [], "test": []})
    image_id = 0
    for label, name in enumerate(classes):
        for i in range(per_class):
            image_id += 1
            width, height = 40 + 4 * i, 30 + 2 * i
            rel_in_images = f"{name}/{name[4:]}_{i:04d}_{image_id}.jpg"
            write_noise_image(root / "images" / rel_in_images, rng, (width, height))
            box = (float(pyrng.randint(0, 5)), float(pyrng.randint(0, 5)), 20.0 + i, 15.0 + i)
            parts = tuple(
                (float(pyrng.randint(0, width - 1)), float(pyrng.randint(0, height - 1)), 1)
                for _ in PART_NAMES[:-1]
            ) + ((0.0, 0.0, 0),)
            is_train = i % 2 == 0
            lines["images"].append(f"{image_id} {rel_in_images}")
            lines["labels"].append(f"{image_id} {label + 1}")
            lines["split"].append(f"{image_id} {int(is_train)}")
            lines["boxes"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
            for part_id, (x, y, visible) in enumerate(parts, start=1):
                lines["locs"].append(f"{image_id} {part_id} {x:.1f} {y:.1f} {visible}")
            rel = f"images/{rel_in_images}"
            truth.files["train" if is_train else "test"].append((rel, label))
            truth.boxes[rel] = box
            truth.parts[rel] = parts
    (root / "parts").mkdir(parents=True, exist_ok=True)
    texts = {
        "images.txt": lines["images"],
        "image_class_labels.txt": lines["labels"],
        "train_test_split.txt": lines["split"],
        "bounding_boxes.txt": lines["boxes"],
        "classes.txt": [f"{c + 1} {name}" for c, name in enumerate(classes)],
        "parts/parts.txt": [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)],
        "parts/part_locs.txt": lines["locs"],
    }
    for rel, content in texts.items():
        (root / rel).write_text("\n".join(content) + "\n")
    return truth


@pytest.fixture
def imagefolder_data(tmp_path: Path) -> DataTruth:
    """A 3-class ImageFolder (3 train + 2 test images per class, PNG and JPEG) in tmp_path/data."""
    return make_imagefolder(tmp_path / "data")


@pytest.fixture
def cub_data(tmp_path: Path) -> DataTruth:
    """A 3-class CUB-200-2011 layout (4 images per class, boxes and 4 parts) in tmp_path/cub."""
    return make_cub(tmp_path / "cub")


@pytest.fixture(scope="session")
def parts_store(tmp_path_factory) -> dict:
    """The "parts" dataset of tests/test_train.py extracted once (no views) plus a 16-code codebook.

    Shared by every module that needs a real cache: treat it as read-only (copy it before damaging it).
    Returns {"root", "data", "cache", "codebook"}.
    """
    from stages.codebook import CodebookSettings, build_codebook
    from tests.test_train import build_parts_cache

    root = tmp_path_factory.mktemp("parts-store")
    cache = build_parts_cache(root, views=0)
    codebook = root / "codebook.safetensors"
    build_codebook(cache, codebook, CodebookSettings(k=16, seed=0))
    return {"root": root, "data": root / "data", "cache": cache, "codebook": codebook}
