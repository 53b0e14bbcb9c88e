"""Which feature map and which crop: side by side on make-birds (the demo's data) and Fashion-MNIST.

For each (data set, --layers, --crop-mode) it runs extract -> codebook -> train (protoquant's defaults)
-> evaluate and prints one JSON line: the pooled linear probe's and the ProtoQuant head's test top-1,
the grid, the bytes per image and the seconds each step took. Lite0 with the built-in ImageNet weights.
Every configuration sees the same images; compare the ratios within one run (CPU speed swings 3x).

    python bench/layers_grid.py [--work DIR] [--sets birds,fmnist] [--configs final:center,3:squash,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fashion_mnist import write_imagefolder  # noqa: E402
from pipeline.birds import make_birds  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from stages.codebook import CodebookSettings, build_codebook  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.extract import extract  # noqa: E402
from stages.train import TrainSettings, train  # noqa: E402

SETS = {  # name: (image size, codebook K), as the demo and bench/fashion_mnist.py run them
    "birds": (224, 128),
    "fmnist": (96, 256),
}
CONFIGS = ("final:center", "3,4:squash", "final:squash", "3:squash", "3,4:center")


def prepare(name: str, work: Path) -> Path:
    data = work / name
    if name == "birds" and not (data / "images.txt").is_file():
        make_birds(data, classes=6, per_class=150, size=224, seed=0, overwrite=True)  # the demo's settings
    if name == "fmnist" and not (data / "test").is_dir():
        write_imagefolder(data, 3000, 1000, 0)
    return data


def measure(name: str, data: Path, work: Path, layers: str, mode: str) -> dict:
    size, k = SETS[name]
    tag = f"{name}-{layers.replace(',', '+')}-{mode}"
    cache, codebook, run = work / f"{tag}.zarr", work / f"{tag}.codebook.safetensors", work / f"{tag}.run"
    timings = {}
    started = time.perf_counter()
    if not (cache / "zarr.json").is_file() or not Cache(cache).attrs.get("complete"):
        extract(data, cache, backbone="tf_efficientnet_lite0", pretrained=True, image_size=size, batch_size=32,
                workers=2, layers=layers, crop_pct=1.0 if mode == "squash" else None, crop_mode=mode)  # resumes a killed extraction
    timings["extract_s"] = time.perf_counter() - started
    started = time.perf_counter()
    build_codebook(cache, codebook, CodebookSettings(k=k, seed=0))
    timings["codebook_s"] = time.perf_counter() - started
    started = time.perf_counter()
    train(cache, codebook, run, TrainSettings(seed=0, device="cpu"), overwrite=True)
    timings["train_s"] = time.perf_counter() - started
    test = evaluate(run, split="test", device="cpu")
    store = Cache(cache)
    h, w = store.grid
    return {"set": name, "layers": layers, "crop_mode": mode, "grid": f"{h}x{w}", "dim": store.dim,
            "bytes_per_image": h * w * store.dim * 2, "probe_top1": round(test.probe_top1, 4),
            "protoquant_top1": round(test.top1, 4), "n_test": test.n,
            **{key: round(value, 1) for key, value in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pq-layers"))
    parser.add_argument("--sets", default="birds,fmnist")
    parser.add_argument("--configs", default=";".join(CONFIGS),
                        help="';'-separated LAYERS:MODE pairs, e.g. 'final:center;3,4:squash'")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        data = prepare(name, args.work)
        for config in args.configs.split(";"):
            layers, mode = config.split(":")
            print(json.dumps(measure(name, data, args.work, layers, mode)), flush=True)


if __name__ == "__main__":
    main()
