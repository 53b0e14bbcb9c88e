"""Extraction overhead: `protoquant extract` vs a bare timm loop over the same images, side by side.

Both decode the same JPEGs with the same DataLoader workers and batch size, preprocess with the model's
timm transform and run `forward_features`; the bare loop discards the output, protoquant writes the
Zarr cache (writer thread, shards, marks). Each is run `--repeats` times, alternating, and the best
time of each is compared (the CPU here swings by 3x from minute to minute: read the ratio).

    python bench/extract.py [--images 256] [--backbone tf_efficientnet_lite0] [--image-size 224]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import load_backbone  # noqa: E402
from stages.extract import extract  # noqa: E402


def write_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n smooth random 320x240 JPEGs (real decode cost) in an ImageFolder train/ split (+ a 2-image test/)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n + 2):
        split = "train" if i < n else "test"
        path = root / split / f"c{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


class _Files(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def bare_loop(paths: list[Path], backbone: str, pretrained: bool, image_size: int, batch_size: int, workers: int) -> float:
    """Decode, preprocess, forward, discard: the floor any extractor pays."""
    start = time.perf_counter()
    net = load_backbone(backbone, pretrained=pretrained, image_size=image_size)
    loader = DataLoader(_Files(paths, net.transform), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode():
        for images in loader:
            net.model.forward_features(images.contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - start


def protoquant_extract(data: Path, out: Path, backbone: str, pretrained: bool, image_size: int, batch_size: int,
                       workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    extract(data, out, backbone=backbone, pretrained=pretrained, image_size=image_size,
            batch_size=batch_size, workers=workers,
            layers="final", crop_mode=None, crop_pct=None)  # what the bare loop runs: forward_features, timm's crop
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    pretrained = args.backbone == "tf_efficientnet_lite0"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root / "data", args.images)
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(paths, args.backbone, pretrained, args.image_size, args.batch_size, args.workers))
            ours.append(protoquant_extract(root / "data", root / "cache.zarr", args.backbone, pretrained,
                                           args.image_size, args.batch_size, args.workers))
    n = len(paths)
    print(f"extraction: {n} images, {args.backbone} @ {args.image_size}px, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} threads")
    print("| run | best s | images/s |\n|---|---|---|")
    print(f"| bare timm loop (decode+forward, discard) | {min(bare):.2f} | {n / min(bare):.1f} |")
    print(f"| protoquant extract (+ Zarr cache) | {min(ours):.2f} | {n / min(ours):.1f} |")
    print(f"ratio extract / bare = {min(ours) / min(bare):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
