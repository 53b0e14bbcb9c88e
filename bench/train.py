"""What the cache buys: a stage B epoch from the cache vs the same head trained the reference way.

Reference way: every batch is decoded from its file, preprocessed and pushed through the frozen
backbone again (no gradient), then the head takes its step. From the cache: the batch's grids are
read from RAM. Same images (generated birds, train split), same head, loss, optimizer and batch
size; each epoch timed `--repeats` times, best kept. Target (issue #3): >= 20x faster on CPU with
tf_efficientnet_lite0 at 224 px. The time of a probe and a stage A epoch from the cache is printed
too. Second table: FAISS k-means vs scikit-learn's KMeans on the same sample (spherical: the sample
is L2-normalised; same k, same iterations, one init each).

    python bench/train.py [--images-per-class 64] [--classes 4] [--image-size 224] [--k 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import extract_grid, load_backbone_for_cache  # noqa: E402
from pipeline.birds import make_birds  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.codebook import load_codebook, spherical_kmeans  # noqa: E402
from pipeline.data import open_training_data  # noqa: E402
from pipeline.model import ProbeHead, ProtoQuantHead, stage_a_loss  # noqa: E402
from pipeline.training import classification_loss  # noqa: E402
from stages.codebook import CodebookSettings, build_codebook, read_sample, sample_plan  # noqa: E402
from stages.extract import extract  # noqa: E402


class _Files(Dataset):
    """The reference way's input: decode + preprocess one file per item."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), int(self.labels[i])


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def head_and_optimizer(codes: torch.Tensor, classes: int):
    head = ProtoQuantHead(codes, classes, train_codes=True)
    optimizer = torch.optim.AdamW([{"params": [head.weight], "lr": 3e-2}, {"params": [head.codes], "lr": 2e-2}])
    return head, optimizer, classification_loss(head, classes, label_smoothing=0.1)


def epoch_from_cache(data, codes: torch.Tensor, classes: int) -> float:
    head, optimizer, loss = head_and_optimizer(codes, classes)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for features, labels in data.train.batches(0):
        _step(optimizer, loss(features, labels, rng)[0])
    return time.perf_counter() - start


def epoch_reference(files: _Files, backbone, codes: torch.Tensor, classes: int, batch_size: int, workers: int) -> float:
    head, optimizer, loss = head_and_optimizer(codes, classes)
    rng = np.random.default_rng(0)
    loader = DataLoader(files, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for images, labels in loader:
        with torch.inference_mode():
            grid = extract_grid(backbone, images).clone()  # (B, H, W, D), the frozen backbone every batch
        _step(optimizer, loss(grid, labels, rng)[0])
    return time.perf_counter() - start


def other_phases_from_cache(data, codes: torch.Tensor, dim: int, classes: int) -> tuple[float, float]:
    """Seconds of one probe epoch and one stage A epoch from the cache."""
    probe = ProbeHead(dim, classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    loss = classification_loss(probe, classes, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for features, labels in data.train.batches(0):
        _step(optimizer, loss(features, labels, rng)[0])
    probe_s = time.perf_counter() - start
    probe.eval().requires_grad_(False)
    book = torch.nn.Parameter(codes.clone())
    optimizer = torch.optim.Adam([book], lr=5e-4)
    start = time.perf_counter()
    for features, labels in data.train.batches(0):
        _step(optimizer, stage_a_loss(features, book, probe, labels)[0])
    return probe_s, time.perf_counter() - start


def kmeans_ratio(cache: Cache, k: int, sample: int, iters: int) -> tuple[float, float, int, float, float]:
    """(faiss s, sklearn s, n vectors, faiss objective, sklearn objective) on one normalised sample."""
    from sklearn.cluster import KMeans

    split = cache.split("train")
    rows = np.flatnonzero(split.ok)
    chosen, per_image = sample_plan(split.labels, rows, cache.grid[0] * cache.grid[1], sample, 0)
    x = read_sample(split, chosen, per_image, 0)  # (n, D)
    start = time.perf_counter()
    result = spherical_kmeans(x, k, iters=iters, seed=0, backend="faiss", device="cpu")
    faiss_s = time.perf_counter() - start
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    start = time.perf_counter()
    reference = KMeans(n_clusters=k, n_init=1, max_iter=iters, tol=0.0, random_state=0, algorithm="lloyd").fit(unit)
    sklearn_s = time.perf_counter() - start
    centres = reference.cluster_centers_ / np.linalg.norm(reference.cluster_centers_, axis=1, keepdims=True)
    sklearn_objective = float((unit @ centres.T).max(axis=1).mean())
    return faiss_s, sklearn_s, len(x), result.objective, sklearn_objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--kmeans-sample", type=int, default=20_000)
    parser.add_argument("--kmeans-iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_birds(root / "birds", classes=args.classes, per_class=args.images_per_class, size=args.image_size, seed=0)
        extract(root / "birds", root / "cache.zarr", backbone="tf_efficientnet_lite0", pretrained=True,
                image_size=args.image_size, batch_size=args.batch_size, workers=args.workers)
        cache = Cache(root / "cache.zarr")
        build_codebook(cache.path, root / "codebook.safetensors", CodebookSettings(k=args.k, seed=0))
        codes, _ = load_codebook(root / "codebook.safetensors")
        split = cache.split("train")
        data = open_training_data(split, val_fraction=0.0, seed=0, batch_size=args.batch_size, max_memory=10**10)
        rows = data.train_rows
        files = _Files([root / "birds" / str(i) for i in split.ids[rows]], split.labels[rows], None)
        backbone = load_backbone_for_cache(cache.provenance)
        files.transform = backbone.transform
        n_classes = len(cache.classes)
        cached, reference = [], []
        for _ in range(args.repeats):
            cached.append(epoch_from_cache(data, codes, n_classes))
            reference.append(epoch_reference(files, backbone, codes, n_classes, args.batch_size, args.workers))
        probe_s, stage_a_s = other_phases_from_cache(data, codes, cache.dim, n_classes)
        faiss_s, sklearn_s, n_vectors, faiss_obj, sklearn_obj = kmeans_ratio(cache, args.k, args.kmeans_sample,
                                                                             args.kmeans_iters)
    n = len(rows)
    h, w = cache.grid
    print(f"stage B epoch: {n} images, tf_efficientnet_lite0 @ {args.image_size}px ({h}x{w}x{cache.dim} grid), "
          f"K={args.k}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("| stage B epoch | best s | images/s |\n|---|---|---|")
    print(f"| reference (decode + backbone every batch) | {min(reference):.2f} | {n / min(reference):.0f} |")
    print(f"| from the cache (RAM) | {min(cached):.3f} | {n / min(cached):.0f} |")
    print(f"ratio reference / cache = {min(reference) / min(cached):.1f}x (target >= 20x)")
    print(f"from the cache, one epoch each: probe {probe_s:.3f} s, stage A {stage_a_s:.3f} s")
    print(f"\nk-means: {n_vectors} vectors x {cache.dim} dims, k={args.k}, {args.kmeans_iters} iterations")
    print("| k-means | s | mean cosine to nearest centre |\n|---|---|---|")
    print(f"| FAISS (spherical) | {faiss_s:.2f} | {faiss_obj:.4f} |")
    print(f"| scikit-learn KMeans (lloyd, normalised input) | {sklearn_s:.2f} | {sklearn_obj:.4f} |")
    print(f"ratio sklearn / FAISS = {sklearn_s / faiss_s:.1f}x")


if __name__ == "__main__":
    main()
