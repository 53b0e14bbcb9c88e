"""Quality on real images: Fashion-MNIST, 3,000 train / 1,000 test, Lite0 (built-in ImageNet weights), 96 px.

extract -> codebook -> train -> evaluate with protoquant's default settings, then prints the probe's
and the ProtoQuant head's test top-1. Target (issue #3): ProtoQuant >= 0.85 and >= probe - 0.02.

Needs the Debian package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`).

    python bench/fashion_mnist.py [--work DIR] [--k 256] [--train 3000] [--test 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.codebook import CodebookSettings, build_codebook  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.extract import extract  # noqa: E402
from stages.train import TrainSettings, train  # noqa: E402

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
           "8_bag", "9_ankle_boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array: images (N, 28, 28) or labels (N,)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def stratified(labels: np.ndarray, total: int, seed: int) -> np.ndarray:
    """total // 10 random indices of each class."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:total // len(CLASSES)]
                           for c in range(len(CLASSES))])


def write_imagefolder(root: Path, n_train: int, n_test: int, seed: int) -> None:
    """DATA/train/<class>/*.png and DATA/test/<class>/*.png from the IDX files."""
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} is missing: apt-get install dataset-fashion-mnist")
    for split, prefix, count in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz")
        for i in stratified(labels, count, seed):
            path = root / split / CLASSES[labels[i]] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep data, cache and run here (default: a temp dir)")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--views", type=int, default=0, help="augmented views cached per training image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pq-fmnist-"))
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    data, cache = work / "data", work / f"cache-v{args.views}.zarr"
    if not (data / "test").is_dir():
        write_imagefolder(data, args.train, args.test, args.seed)
    started = time.perf_counter()
    if not (cache / "zarr.json").is_file():
        extract(data, cache, backbone="tf_efficientnet_lite0", pretrained=True, image_size=96, batch_size=64,
                workers=2, views=args.views, progress=True)
    timings["extract_s"] = time.perf_counter() - started
    started = time.perf_counter()
    build_codebook(cache, work / "codebook.safetensors", CodebookSettings(k=args.k, seed=args.seed))
    timings["codebook_s"] = time.perf_counter() - started
    started = time.perf_counter()
    result = train(cache, work / "codebook.safetensors", work / "run", TrainSettings(seed=args.seed, device="cpu"),
                   overwrite=True, progress=True)
    timings["train_s"] = time.perf_counter() - started
    test = evaluate(work / "run", split="test", device="cpu")
    report = {"probe_top1": test.probe_top1, "protoquant_top1": test.top1, "top5": test.top5, "n_test": test.n,
              "codes_used": test.codes_used, "local_size": test.local_size, "val": result.metrics["val_top1"],
              **{k: round(v, 1) for k, v in timings.items()}}
    print(json.dumps(report, indent=2))
    ok = test.top1 >= 0.85 and test.top1 >= test.probe_top1 - 0.02
    print(f"Fashion-MNIST {args.train}/{args.test}, Lite0 96 px, 2-core CPU: probe {test.probe_top1:.3f}, "
          f"ProtoQuant {test.top1:.3f} -> {'meets' if ok else 'MISSES'} the target (>= 0.85 and >= probe - 0.02)")


if __name__ == "__main__":
    main()
