"""Reading the cache: training batches/s from the Zarr store vs from a raw numpy memmap of the same array.

Both read the same random, chunk-aligned blocks (the streaming trainer's access pattern: whole chunks
in a shuffled order) and whole-split loads. The memmap is the floor a hand-rolled .npy cache would
give; the ratio shows what Zarr's format (metadata, shards, object stores) costs.

    python bench/cache_read.py [--images 4096] [--grid 7] [--dim 768]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import Cache, SplitPlan, create_cache  # noqa: E402


def build(root: Path, n: int, grid: int, dim: int) -> tuple[Cache, np.memmap]:
    """The same float16 array written once into a protoquant cache and once as a .npy memmap."""
    rng = np.random.default_rng(0)
    plan = SplitPlan(ids=[f"img{i}" for i in range(n)], labels=rng.integers(0, 10, n).astype(np.int32))
    cache = create_cache(root / "cache.zarr", settings={"bench": True}, attrs={"classes": [str(i) for i in range(10)]},
                         splits={"train": plan}, grid=(grid, grid), dim=dim)
    split = cache.split("train")
    mm = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=np.float16, shape=(n, grid, grid, dim))
    for shard in range(split.layout.n_shards):
        rows = split.layout.shard_rows(shard)
        block = rng.standard_normal((len(rows), grid, grid, dim), dtype=np.float32).astype(np.float16)
        split.features[rows.start:rows.stop] = block
        mm[rows.start:rows.stop] = block
    mm.flush()
    return cache, np.load(root / "features.npy", mmap_mode="r")


def shuffled_blocks(n: int, rows: int, seed: int) -> list[int]:
    starts = list(range(0, n, rows))
    np.random.default_rng(seed).shuffle(starts)
    return starts


def time_blocks(read, starts: list[int], rows: int) -> float:
    begin = time.perf_counter()
    for start in starts:
        np.asarray(read(start, start + rows)).astype(np.float32)  # what a trainer does with a block
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, mm = build(Path(tmp), args.images, args.grid, args.dim)
        split = cache.split("train")
        rows = split.layout.rows_per_chunk
        zarr_s, mm_s, zarr_load, mm_load = [], [], [], []
        for repeat in range(args.repeats):
            starts = shuffled_blocks(args.images, rows, repeat)
            zarr_s.append(time_blocks(lambda a, b: split.features[a:b], starts, rows))
            mm_s.append(time_blocks(lambda a, b: mm[a:b], starts, rows))
            begin = time.perf_counter()
            split.load()
            zarr_load.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            np.array(mm)
            mm_load.append(time.perf_counter() - begin)
    gb = args.images * args.grid * args.grid * args.dim * 2 / 1e9
    batches = len(starts)
    print(f"cache reads: {args.images} x {args.grid}x{args.grid}x{args.dim} float16 ({gb:.2f} GB), "
          f"blocks of {rows} images (one chunk), shuffled, best of {args.repeats} (page cache warm)")
    print("| reader | blocks/s | images/s | whole split GB/s |\n|---|---|---|---|")
    print(f"| zarr store (protoquant cache) | {batches / min(zarr_s):.1f} | {args.images / min(zarr_s):,.0f} | {gb / min(zarr_load):.2f} |")
    print(f"| numpy memmap (.npy) | {batches / min(mm_s):.1f} | {args.images / min(mm_s):,.0f} | {gb / min(mm_load):.2f} |")
    print(f"ratio zarr / memmap throughput = {min(mm_s) / min(zarr_s):.2f} (blocks), {min(mm_load) / min(zarr_load):.2f} (whole split)")


if __name__ == "__main__":
    main()
