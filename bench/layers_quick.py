"""The grid choices of bench/layers_grid.py, measured in memory from caches it made (minutes, not hours).

For a cache extracted with --layers 3,4 (Lite0: 14x14x112 at stride 16, then 7x7x320 at stride 32
upsampled), the stride-16 map alone is its first 112 dims and the stride-32 map alone every second
cell of the rest, so one extraction gives three grids. On each grid: a pooled linear probe and a plain
ProtoQuant head (spherical k-means codes, softmax over codes tau 0.1, spatial max, relu(W); Adam on
W and the codes; no validation split, no L1), the same recipe for every grid.

    python bench/layers_quick.py CACHE [--k 128] [--epochs 30] [--final]   (--final: the cache is a 'final' one)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import Cache  # noqa: E402
from pipeline.model import ProtoQuantHead  # noqa: E402

STAGE16_DIMS = 112  # tf_efficientnet_lite0 blocks.4 (stride 16)


def spherical_kmeans(patches: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    unit = F.normalize(patches, dim=1)
    centres = unit[torch.randperm(len(unit), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = (unit @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, patches)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
    return centres


def probe(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, yt: torch.Tensor, classes: int) -> float:
    pooled, pooled_test = train.mean((1, 2)), test.mean((1, 2))
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6
    linear = torch.nn.Linear(pooled.shape[1], classes)
    optimiser = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        optimiser.zero_grad()
        F.cross_entropy(linear((pooled - mean) / std), y).backward()
        optimiser.step()
    return float((linear((pooled_test - mean) / std).argmax(1) == yt).float().mean())


def plain_head(train, y, test, yt, classes: int, k: int, epochs: int) -> float:
    generator = torch.Generator().manual_seed(0)
    flat = train.flatten(0, 2)
    sample = flat[torch.randperm(len(flat), generator=generator)[:200 * k]]
    head = ProtoQuantHead(spherical_kmeans(sample, k), classes, tau=0.1, train_codes=True, seed=0)
    optimiser = torch.optim.Adam(head.parameters(), lr=5e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            optimiser.zero_grad()
            F.cross_entropy(head(train[batch]), y[batch], label_smoothing=0.1).backward()
            optimiser.step()
    with torch.no_grad():
        predicted = torch.cat([head(part).argmax(1) for part in test.split(128)])
    return float((predicted == yt).float().mean())


def grids(cache: Cache, final: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    train, test = (torch.from_numpy(cache.split(s).features[:].astype(np.float32)) for s in ("train", "test"))
    if final:
        return {"final": (train, test)}
    return {"s16": (train[..., :STAGE16_DIMS], test[..., :STAGE16_DIMS]),
            "s32": (train[:, ::2, ::2, STAGE16_DIMS:], test[:, ::2, ::2, STAGE16_DIMS:]),
            "s16+s32": (train, test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--final", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    cache = Cache(args.cache)
    y, yt = (torch.from_numpy(cache.split(s).labels.astype(np.int64)) for s in ("train", "test"))
    classes = len(cache.classes)
    for name, (train, test) in grids(cache, args.final).items():
        started = time.perf_counter()
        row = {"cache": args.cache.name, "grid": name, "shape": list(train.shape[1:]),
               "probe_top1": round(probe(train, y, test, yt, classes), 4),
               "plain_head_top1": round(plain_head(train, y, test, yt, classes, args.k, args.epochs), 4)}
        print(json.dumps({**row, "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
