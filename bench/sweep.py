"""Many heads per pass: `protoquant sweep` against separate `protoquant train` commands, side by side.

On the Fashion-MNIST cache (Lite0, built-in ImageNet weights, 96 px; bench/fashion_mnist.py's subset):
    1. 4 heads (2 codebooks x 2 seeds), split in RAM: one `sweep` command vs 4 `train` commands
       (target: sweep <= 0.6x)
    2. streamed (--max-memory 0): a sweep of 8 heads (2 codebooks x 2 seeds x 2 --l1) vs ONE `train`
       command (target: <= 2x)
Every command is a fresh process (`python cli.py ...`), as a user would run it; both sides run the
same defaults, the sparse refit after stage B included. Each sweep runs twice: with its path refits side
by side in worker processes (the default, pipeline/refits.py) and with PROTOQUANT_REFIT_WORKERS=1 (one by
one, as before), so the workers' own gain is measured in the same run.

Needs the Debian package dataset-fashion-mnist.

    python bench/sweep.py [--work DIR] [--train 3000] [--test 1000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fashion_mnist import write_imagefolder  # noqa: E402
from stages.codebook import CodebookSettings, build_codebook  # noqa: E402
from stages.extract import extract  # noqa: E402

SIZES = (64, 128)


def command(*args, env: dict | None = None) -> float:
    """Run `python cli.py ARGS` to the end (with `env` added to the environment); its wall time in seconds
    (a failure stops the bench)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"failed: cli.py {' '.join(map(str, args))}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def prepare(work: Path, n_train: int, n_test: int) -> tuple[Path, list[Path]]:
    data, cache = work / "data", work / "cache.zarr"
    if not (data / "test").is_dir():
        write_imagefolder(data, n_train, n_test, 0)
    if not (cache / "zarr.json").is_file():
        extract(data, cache, backbone="tf_efficientnet_lite0", pretrained=True, image_size=96, batch_size=64, workers=2)
    books = []
    for k in SIZES:
        book = work / f"k{k}.safetensors"
        if not book.is_file():
            build_codebook(cache, book, CodebookSettings(k=k, seed=0))
        books.append(book)
    return cache, books


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep data, cache and runs here (default: a temp dir)")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every phase (stage A: a third)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pq-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, books = prepare(work, args.train, args.test)
    phases = ["--epochs", args.epochs, "--probe-epochs", args.epochs, "--codebook-epochs", max(1, args.epochs // 3),
              "--device", "cpu"]
    seconds = {}

    seconds["train x4 (RAM)"] = sum(
        command("train", cache, "-c", book, "--out", work / f"run-{book.stem}-s{seed}", "--seed", seed,
                *phases, "--overwrite", "--json") for book in books for seed in (0, 1))
    one_by_one = {"PROTOQUANT_REFIT_WORKERS": "1"}
    four = [*[a for b in books for a in ("-c", b)], "--seeds", "0,1", "--out", work / "sweep4", *phases, "--overwrite", "--json"]
    seconds["sweep 4 heads (RAM)"] = command("sweep", cache, *four)
    seconds["sweep 4 heads (RAM), refits one by one"] = command("sweep", cache, *four, env=one_by_one)
    seconds["train x1 (streamed)"] = command("train", cache, "-c", books[0], "--out", work / "run-stream",
                                             *phases, "--max-memory", "0", "--overwrite", "--json")
    eight = [*[a for b in books for a in ("-c", b)], "--seeds", "0,1", "--l1", "0,0.002", "--out", work / "sweep8",
             *phases, "--max-memory", "0", "--overwrite", "--json"]
    seconds["sweep 8 heads (streamed)"] = command("sweep", cache, *eight)
    seconds["sweep 8 heads (streamed), refits one by one"] = command("sweep", cache, *eight, env=one_by_one)

    print(f"Fashion-MNIST {args.train}/{args.test}, tf_efficientnet_lite0 96 px (extract's defaults), K = {SIZES}, "
          f"{args.epochs} epochs per phase, CPU; every command a fresh process")
    print("| plan | wall s |\n|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} |")
    ram = seconds["sweep 4 heads (RAM)"] / seconds["train x4 (RAM)"]
    stream = seconds["sweep 8 heads (streamed)"] / seconds["train x1 (streamed)"]
    print(f"4 heads, RAM: sweep / 4 trains = {ram:.2f}x (target <= 0.6x: {'met' if ram <= 0.6 else 'MISSED'})")
    print(f"streamed: 8-head sweep / 1 train = {stream:.2f}x (target <= 2x: {'met' if stream <= 2 else 'MISSED'})")
    for plan in ("sweep 4 heads (RAM)", "sweep 8 heads (streamed)"):
        print(f"{plan}: refits side by side / one by one = "
              f"{seconds[plan] / seconds[plan + ', refits one by one']:.2f}x ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
