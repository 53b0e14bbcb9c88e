"""Reading the cache: protoquant's read path vs a numpy memmap of the same array, warm and cold.

Contenders, all on the same float16 array, in one run:
- protoquant: CacheSplit.read_features / load (plain shards read straight from their files in a thread
  pool, every block checked: rows marked extracted must be finite);
- zarr: the same store through zarr-python's own reader (default codec pipeline), and through the
  `zarrs` Rust codec pipeline when it is installed (`pip install -e .[fast-zarr]`);
- numpy memmap of a .npy file: the floor a hand-rolled cache gives;
- cold: the files' pages dropped first (posix_fadvise DONTNEED), against a plain sequential `readinto`
  of the same shard files, the physical limit of this disk.
Shuffled blocks are whole inner chunks in a random order (the streaming trainer's access pattern), each
converted to float32 with numpy's astype; "prefetched" reads the next blocks in the background meanwhile.
The trainer converts with torch (`.float()`), about 10x faster than numpy's astype here, which leaves the
read's own cost in view: protoquant and memmap are also timed that way ("torch" rows). The finiteness check
runs once per block and process while its files are unchanged: the block rows reuse one split, so their
best repeat is a later epoch's read (checked before); whole-split loads and cold reads open a fresh split
each time and pay the check, as a process that loads once does.
"Stream" is the trainer's whole pattern, one epoch of float32 batches of 256 (a later epoch, and a first
epoch on a fresh split, which checks every row): protoquant's streaming
FeatureSource (chunks in a shuffled order, 8 a buffer, each chunk's rows read straight into their shuffled
places, the next 2 buffers read in the background) against the same plan over the memmap (each buffer
gathered from the mapped rows in a shuffled order, in the background too). Any reader that shuffles rows
copies them once before the conversion; a memmap that is only sliced does not, which is why the block rows'
memmap is the harder floor.

    python bench/cache_read.py [--images 4096] [--grid 7] [--dim 768] [--write-results]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zarr  # noqa: E402

from pipeline.cache import Cache, SplitPlan, create_cache, write_shard  # noqa: E402
from pipeline.data import FeatureSource, SourceSettings  # noqa: E402
from pipeline.rawshards import read_pool  # noqa: E402

TITLE = "Reading the cache vs a numpy memmap"  # the section bench/run_all.py writes too
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # torch on a memmap: read only here


def build(root: Path, n: int, grid: int, dim: int) -> tuple[Cache, Path]:
    """The same float16 array written once into a protoquant cache (shard by shard, marked done) and once
    as a .npy file; both synced to disk so their pages can be dropped."""
    rng = np.random.default_rng(0)
    plan = SplitPlan(ids=[f"img{i}" for i in range(n)], labels=rng.integers(0, 10, n).astype(np.int32))
    cache = create_cache(root / "cache.zarr", settings={"bench": True}, attrs={"classes": [str(i) for i in range(10)]},
                         splits={"train": plan}, grid=(grid, grid), dim=dim)
    split = cache.split("train")
    mm = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=np.float16, shape=(n, grid, grid, dim))
    for shard in range(split.layout.n_shards):
        rows = split.layout.shard_rows(shard)
        block = rng.standard_normal((len(rows), grid, grid, dim), dtype=np.float32).astype(np.float16)
        write_shard(split.group, split.directory, shard, rows, {
            "features": block, "ok": np.ones(len(rows), np.uint8), "image_size": np.full((len(rows), 2), 64, np.int32)})
        mm[rows.start:rows.stop] = block
    mm.flush()
    del mm
    _fsync(root / "features.npy")
    return Cache(root / "cache.zarr"), root / "features.npy"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_pages(paths: list[Path]) -> None:
    """Ask the kernel to forget the cached pages of these (synced) files: the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def shard_files(cache: Cache) -> list[Path]:
    split = cache.split("train")
    return [split.shard_file("features", s) for s in range(split.layout.n_shards)]


def sequential_readinto(paths: list[Path]) -> np.ndarray:
    """Every byte of the files, one after the other, with plain readinto into one buffer."""
    out = np.empty(sum(p.stat().st_size for p in paths), dtype=np.uint8)
    view, at = memoryview(out), 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view[at:at + (64 << 20)])
                if not got:
                    break
                at += got
    return out


def shuffled_blocks(n: int, rows: int, seed: int) -> list[tuple[int, int]]:
    starts = list(range(0, n, rows))
    np.random.default_rng(seed).shuffle(starts)
    return [(s, min(s + rows, n)) for s in starts]


def numpy_float(block) -> np.ndarray:
    return np.asarray(block).astype(np.float32)


def torch_float(block) -> torch.Tensor:
    return torch.from_numpy(np.asarray(block)).float()  # the trainer's conversion (pipeline/data.py)


def time_blocks(read, blocks: list[tuple[int, int]], convert=numpy_float) -> float:
    begin = time.perf_counter()
    for start, stop in blocks:
        convert(read(start, stop))
    return time.perf_counter() - begin


def time_prefetched(read, blocks: list[tuple[int, int]], ahead: int = 2, convert=numpy_float) -> float:
    """The same blocks, the next `ahead` read in the background while this one is converted."""
    begin = time.perf_counter()
    pending: deque = deque()
    for start, stop in blocks:
        pending.append(read_pool().submit(read, start, stop))
        if len(pending) > ahead:
            convert(pending.popleft().result())
    while pending:
        convert(pending.popleft().result())
    return time.perf_counter() - begin


STREAM_BATCH, STREAM_BUFFER = 256, 8


def stream_protoquant(split, epoch: int) -> None:
    source = FeatureSource(split, np.arange(split.n), SourceSettings(batch_size=STREAM_BATCH, seed=0, buffer_chunks=STREAM_BUFFER))
    for grids, _ in source.batches(epoch):
        assert grids.dtype == torch.float32


def stream_memmap(mm: np.ndarray, rows_per_chunk: int, epoch: int, ahead: int = 2) -> None:
    """The same plan over a memmap: chunks in a shuffled order, 8 a buffer gathered in a shuffled row
    order by the reader threads, each batch a slice converted with torch."""
    rng = np.random.default_rng([0, epoch])
    chunks = rng.permutation(-(-len(mm) // rows_per_chunk))
    groups = [chunks[first:first + STREAM_BUFFER] for first in range(0, len(chunks), STREAM_BUFFER)]

    def shuffled_rows(group: np.ndarray) -> np.ndarray:  # drawn here, in order: the reader threads only gather
        rows = np.concatenate([np.arange(c * rows_per_chunk, min((c + 1) * rows_per_chunk, len(mm))) for c in group])
        return rng.permutation(rows)

    pending: deque = deque()
    for group in groups:
        pending.append(read_pool().submit(mm.__getitem__, shuffled_rows(group)))
        if len(pending) > ahead:
            _batches_of(pending.popleft().result())
    while pending:
        _batches_of(pending.popleft().result())


def _batches_of(buffer: np.ndarray) -> None:
    for start in range(0, len(buffer), STREAM_BATCH):
        torch.from_numpy(buffer[start:start + STREAM_BATCH]).float()


def timed(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def zarrs_array(cache: Cache):
    """The features array opened with the zarrs codec pipeline, or None when zarrs is not installed."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return None
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        return zarr.open_array(str(cache.path / "train" / "features"), mode="r")


def measure(cache: Cache, npy: Path, repeats: int) -> dict[str, list[float]]:
    split = cache.split("train")
    mm = np.load(npy, mmap_mode="r")
    fast = zarrs_array(cache)
    files = shard_files(cache)
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for repeat in range(repeats):
        blocks = shuffled_blocks(split.n, split.layout.rows_per_chunk, repeat)
        split.load(), np.array(mm)  # warm the page cache
        record("blocks protoquant", time_blocks(split.read_features, blocks))
        record("blocks protoquant prefetched", time_prefetched(split.read_features, blocks))
        record("blocks zarr", time_blocks(lambda a, b: split.features[a:b], blocks))
        if fast is not None:
            record("blocks zarrs", time_blocks(lambda a, b: fast[a:b], blocks))
        record("blocks memmap", time_blocks(lambda a, b: mm[a:b], blocks))
        record("blocks protoquant torch", time_blocks(split.read_features, blocks, torch_float))
        record("blocks protoquant torch prefetched", time_prefetched(split.read_features, blocks, convert=torch_float))
        record("blocks memmap torch", time_blocks(lambda a, b: mm[a:b], blocks, torch_float))
        record("stream protoquant", timed(lambda: stream_protoquant(split, repeat)))
        record("stream protoquant first epoch", timed(lambda: stream_protoquant(cache.split("train"), repeat)))
        record("stream memmap", timed(lambda: stream_memmap(mm, split.layout.rows_per_chunk, repeat)))
        record("load protoquant", timed(lambda: cache.split("train").load()))
        record("load zarr", timed(lambda: split.features[:]))
        if fast is not None:
            record("load zarrs", timed(lambda: fast[:]))
        record("load memmap", timed(lambda: np.array(mm)))
        for name, fn in (("cold protoquant", lambda: cache.split("train").load()), ("cold readinto", lambda: sequential_readinto(files)),
                         ("cold memmap", lambda: np.array(np.load(npy, mmap_mode="r")))):
            del mm  # a mapped page is never dropped: unmap first
            drop_pages(files + [npy])
            record(name, timed(fn))
            mm = np.load(npy, mmap_mode="r")
    return times


def report(times: dict[str, list[float]], args, rows: int, gb: float) -> str:
    best = {name: min(values) for name, values in times.items()}
    n_blocks = -(-args.images // rows)
    lines = [f"cache reads: {args.images} x {args.grid}x{args.grid}x{args.dim} float16 ({gb:.2f} GB), blocks of {rows} "
             f"images (one inner chunk), shuffled, best of {args.repeats}; {os.cpu_count()} cores",
             "| reader | shuffled blocks/s (warm) | images/s | whole split GB/s (warm) | cold GB/s |", "|---|---|---|---|---|"]
    for label, key in (("protoquant cache (raw shard reads + checks)", "protoquant"),
                       ("  same, next blocks prefetched", "protoquant prefetched"), ("zarr-python 3.1 reader", "zarr"),
                       ("zarrs codec pipeline", "zarrs"), ("numpy memmap (.npy)", "memmap"), ("sequential readinto", "readinto")):
        block, load, cold = best.get(f"blocks {key}"), best.get(f"load {key}"), best.get(f"cold {key}")
        if block is None and load is None and cold is None:
            continue
        cells = [f"{n_blocks / block:.1f}" if block else "", f"{args.images / block:,.0f}" if block else "",
                 f"{gb / load:.2f}" if load else "", f"{gb / cold:.2f}" if cold else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    memmap_blocks, memmap_load = best["blocks memmap"], best["load memmap"]
    lines.append(f"ratio protoquant / memmap: shuffled blocks {memmap_blocks / best['blocks protoquant']:.2f} "
                 f"(prefetched {memmap_blocks / best['blocks protoquant prefetched']:.2f}; target >= 0.9), "
                 f"whole split {memmap_load / best['load protoquant']:.2f} (warm; target >= 0.5)")
    torch_blocks = best["blocks memmap torch"]
    lines.append(f"the same blocks converted with torch, as the trainer does: protoquant / memmap "
                 f"{torch_blocks / best['blocks protoquant torch']:.2f} (prefetched "
                 f"{torch_blocks / best['blocks protoquant torch prefetched']:.2f}; memmap {n_blocks / torch_blocks:.1f} blocks/s)")
    stream = best["stream memmap"]
    lines.append(f"the trainer's stream (one shuffled epoch of float32 batches of {STREAM_BATCH}): protoquant / memmap "
                 f"{stream / best['stream protoquant']:.2f} for a later epoch, {stream / best['stream protoquant first epoch']:.2f} "
                 f"for a first (protoquant {args.images / best['stream protoquant']:,.0f} images/s, memmap {args.images / stream:,.0f})")
    lines.append(f"ratio protoquant / raw sequential readinto (cold): {best['cold readinto'] / best['cold protoquant']:.2f} "
                 "(target >= 0.8)")
    zarr_line = (f"for reference, zarr's own reader / memmap: blocks {memmap_blocks / best['blocks zarr']:.2f}, "
                 f"whole split {memmap_load / best['load zarr']:.2f}")
    if "blocks zarrs" in best:
        zarr_line += (f"; with zarrs: blocks {memmap_blocks / best['blocks zarrs']:.2f}, "
                      f"whole split {memmap_load / best['load zarrs']:.2f}")
    lines.append(zarr_line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-results", action="store_true", help=f"also write the table into bench/RESULTS.md ({TITLE})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("PROTOQUANT_BENCH_DIR")) as tmp:
        cache, npy = build(Path(tmp), args.images, args.grid, args.dim)
        times = measure(cache, npy, args.repeats)
        rows = cache.split("train").layout.rows_per_chunk
    gb = args.images * args.grid * args.grid * args.dim * 2 / 1e9
    text = report(times, args, rows, gb)
    print(text)
    if args.write_results:
        from results_section import replace_section

        replace_section(TITLE, f"`python bench/cache_read.py --images {args.images} --dim {args.dim}`\n\n{text}")


if __name__ == "__main__":
    main()
