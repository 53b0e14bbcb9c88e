"""A sweep: N heads (different K and seeds) on ONE cache vs N full runs that each recompute the backbone.

This is the cache's main promise measured: the backbone pass is paid once, every further head costs
only a codebook and a training run from the cache.

    python bench/sweep.py [--heads 3] [--classes 4] [--per-class 20] [--size 160]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.birds import make_birds  # noqa: E402
from stages.codebook import CodebookSettings, build_codebook  # noqa: E402
from stages.extract import extract  # noqa: E402
from stages.train import TrainSettings, train  # noqa: E402

BACKBONE = dict(backbone="tf_efficientnet_lite0", pretrained=True, workers=2, batch_size=32)


def head_configs(n: int) -> list[tuple[int, int]]:
    """(K, seed) pairs: alternate codebook sizes, new seed each."""
    sizes = (32, 64, 128)
    return [(sizes[i % len(sizes)], i) for i in range(n)]


def one_head(cache: Path, work: Path, k: int, seed: int, epochs: int) -> None:
    codebook = work / f"codebook-k{k}-s{seed}.safetensors"
    build_codebook(cache, codebook, CodebookSettings(k=k, seed=seed, sample=20_000))
    train(cache, codebook, work / f"run-k{k}-s{seed}",
          TrainSettings(epochs=epochs, probe_epochs=epochs, codebook_epochs=max(1, epochs // 2), seed=seed), overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    configs = head_configs(args.heads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_birds(work / "birds", classes=args.classes, per_class=args.per_class, size=args.size, seed=0)

        begin = time.perf_counter()
        extract(work / "birds", work / "cache.zarr", image_size=args.size, **BACKBONE)
        extract_once = time.perf_counter() - begin
        for k, seed in configs:
            one_head(work / "cache.zarr", work, k, seed, args.epochs)
        cached = time.perf_counter() - begin

        begin = time.perf_counter()
        for k, seed in configs:
            shutil.rmtree(work / "full.zarr", ignore_errors=True)
            extract(work / "birds", work / "full.zarr", image_size=args.size, **BACKBONE)
            one_head(work / "full.zarr", work, k, seed, args.epochs)
        full = time.perf_counter() - begin
    n_images = args.classes * args.per_class
    print(f"sweep: {args.heads} heads (K, seed) = {configs} on {n_images} make-birds images at {args.size} px, "
          f"tf_efficientnet_lite0, {args.epochs} head epochs")
    print("| plan | wall s |\n|---|---|")
    print(f"| one cache (extract once: {extract_once:.1f} s) + {args.heads} heads | {cached:.1f} |")
    print(f"| {args.heads} full runs (extract + codebook + train each) | {full:.1f} |")
    print(f"ratio full / cached = {full / cached:.2f}x")


if __name__ == "__main__":
    main()
