"""Streaming at scale: a synthetic cache far larger than the RAM budget, a head trained by streaming it.

For each size N (built in one child process, measured in a fresh one, so its peak RSS is its own) a protoquant
cache of N generated grids is built (no backbone: pooled noise plus a class signal in a few channels), then,
with every pass starting cold (the store's pages dropped with posix_fadvise DONTNEED):
- raw read: a plain sequential readinto of the features' shard files into one reused buffer;
- source epoch: the streaming FeatureSource (`open_training_data` with --max-memory below the store,
  so it streams), shuffled float16 batches of the training rows, nothing done with them;
- head epoch: the same, each batch stepping a stage B head (K codes, frozen, Adam on the weights).
It prints rows/s of each vs the raw read rate, and peak RSS per size while reading and training (the
high-water mark is reset after the build, through /proc/self/clear_refs): RSS must not grow with N.

    python bench/scale.py [--sizes 50000,100000] [--grid 7] [--dim 1024] [--max-memory 2GB] [--k 16]
                          [--dir /var/tmp] [--keep] [--write-results]

The default is >= 10 GB on disk (100k x 7x7x1024 float16); caches are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_read import drop_pages  # noqa: E402  (one page-dropping helper for both benches)

TITLE = "Streaming a cache larger than the RAM budget (bench/scale.py)"
POOL_ROWS = 512


def build(path: Path, n: int, grid: int, dim: int, classes: int, rows_per_shard: int | None) -> None:
    """Write N generated rows shard by shard through the extractor's own writer (marks, checksums, fsync)."""
    from pipeline.cache import SplitPlan, create_cache, write_shard

    rng = np.random.default_rng(n)
    labels = rng.integers(0, classes, n).astype(np.int32)
    plan = SplitPlan(ids=[f"synthetic/{i:07d}" for i in range(n)], labels=labels)
    cache = create_cache(path, settings={"bench": "scale", "n": n}, attrs={"classes": [f"c{c}" for c in range(classes)]},
                         splits={"train": plan}, grid=(grid, grid), dim=dim, rows_per_shard=rows_per_shard)
    split = cache.split("train")
    pool = rng.standard_normal((POOL_ROWS, grid, grid, dim), dtype=np.float32).astype(np.float16)
    width = max(1, dim // (4 * classes))
    for shard in range(split.layout.n_shards):
        rows = split.layout.shard_rows(shard)
        block = pool[rng.integers(0, POOL_ROWS, len(rows))]  # (S, H, W, D): a gather, not a fresh draw per value
        for c in range(classes):
            block[labels[rows.start:rows.stop] == c, : grid // 2 + 1, :, c * width:(c + 1) * width] = 2.0
        write_shard(split.group, split.directory, shard, rows, {
            "features": block, "ok": np.ones(len(rows), np.uint8), "image_size": np.full((len(rows), 2), 64, np.int32)})
    cache.update_attrs({"complete": True})


def store_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "train" / "features").rglob("*") if p.is_file() and p.name != "zarr.json")


def raw_read(paths: list[Path]) -> tuple[float, int]:
    """(seconds, bytes) of reading every file sequentially with readinto into one reused 64 MiB buffer."""
    buffer = memoryview(bytearray(64 << 20))
    total, begin = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while got := fh.readinto(buffer):
                total += got
    return time.perf_counter() - begin, total


def source_epoch(source) -> tuple[float, int]:
    rows, begin = 0, time.perf_counter()
    for features, _ in source.batches(0):
        rows += len(features)
    return time.perf_counter() - begin, rows


def head_epoch(source, split, k: int, classes: int) -> tuple[float, int]:
    """One stage B epoch (frozen codes drawn from the first chunk's patches, Adam on the weights)."""
    import torch

    from pipeline.model import ProtoQuantHead

    torch.manual_seed(0)
    patches = torch.from_numpy(split.read_features(0, split.layout.rows_per_chunk)).float().reshape(-1, split.features.shape[-1])
    codes = patches[torch.randperm(len(patches))[:k]]
    head = ProtoQuantHead(codes, classes, seed=0)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
    rows, begin = 0, time.perf_counter()
    for features, labels in source.batches(0):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows += len(features)
    return time.perf_counter() - begin, rows


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: VmHWM since the last reset, else the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    """Measure one built size cold, report as JSON (peak RSS of this process included); then delete it."""
    import torch

    from pipeline.cache import Cache
    from pipeline.data import FeatureSource, SourceSettings, open_training_data, parse_memory

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = Path(args.dir) / f"scale-{args.child}.zarr"
    files = store_files(path)
    split = Cache(path).split("train")
    data = open_training_data(split, val_fraction=0.05, seed=0, batch_size=args.batch_size,
                              max_memory=parse_memory(args.max_memory))
    if data.in_ram:
        raise SystemExit(f"--max-memory {args.max_memory} holds the whole store: give a smaller budget")
    settings = SourceSettings(args.batch_size, shuffle=True, seed=0, buffer_chunks=args.buffer_chunks, half=True)
    source = FeatureSource(split, data.train_rows, settings)
    results = {"n": args.child, "store_bytes": sum(p.stat().st_size for p in files),
               "train_rows": len(data.train_rows), "peak_reset": reset_peak_rss()}
    phases = [("raw", lambda: raw_read(files)), ("source", lambda: source_epoch(source))]
    phases += [] if args.no_head else [("head", lambda: head_epoch(source, split, args.k, args.classes))]
    for name, measure in phases:
        drop_pages(files)
        results[f"{name}_s"], results[f"{name}_units"] = measure()
    results["peak_rss"] = peak_rss()  # while reading and training (the build's own peak left out where Linux allows)
    if not args.keep:
        shutil.rmtree(path)
    return results


def run_sizes(args) -> list[dict]:
    results = []
    for n in args.sizes:
        begin = time.perf_counter()
        for role in ("--build", "--child"):  # built in a process of its own: the measured one starts fresh
            command = [sys.executable, __file__, role, str(n), *forwarded(args)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the size {n} run failed:\n{done.stderr[-3000:]}")
            if role == "--build":
                built_s = time.perf_counter() - begin
        results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "build_s": built_s})
    return results


def forwarded(args) -> list[str]:
    values = ["--grid", str(args.grid), "--dim", str(args.dim), "--max-memory", args.max_memory, "--k", str(args.k),
              "--classes", str(args.classes), "--batch-size", str(args.batch_size), "--dir", args.dir,
              "--buffer-chunks", str(args.buffer_chunks)]
    values += ["--shard-rows", str(args.shard_rows)] if args.shard_rows else []
    return values + (["--keep"] if args.keep else []) + (["--no-head"] if args.no_head else [])


def report(results: list[dict], args) -> str:
    lines = [f"scale: grids {args.grid}x{args.grid}x{args.dim} float16, --max-memory {args.max_memory} (streaming), "
             f"K={args.k}, batch {args.batch_size}; every pass cold (pages dropped); {os.cpu_count()} cores",
             "| N | store GB | raw read GB/s | raw rows/s | source rows/s (ratio) | head epoch rows/s (ratio) | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        row_bytes = r["store_bytes"] / r["n"]
        raw_rows = r["raw_units"] / row_bytes / r["raw_s"]
        source_rows = r["source_units"] / r["source_s"]
        head = f"{r['head_units'] / r['head_s']:,.0f} ({r['head_units'] / r['head_s'] / raw_rows:.2f})" if "head_s" in r else "-"
        lines.append(f"| {r['n']:,} | {r['store_bytes'] / 1e9:.2f} | {r['raw_units'] / r['raw_s'] / 1e9:.2f} | {raw_rows:,.0f} | "
                     f"{source_rows:,.0f} ({source_rows / raw_rows:.2f}) | {head} | "
                     f"{r['peak_rss'] / 1e6:.0f} |")
    if len(results) >= 2:
        small, big = results[0], results[-1]
        lines.append(f"peak RSS {small['peak_rss'] / 1e6:.0f} MB at N={small['n']:,} vs {big['peak_rss'] / 1e6:.0f} MB at "
                     f"N={big['n']:,} ({big['store_bytes'] / small['store_bytes']:.1f}x the store): "
                     f"{big['peak_rss'] / small['peak_rss']:.2f}x (target: flat)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[50_000, 100_000])
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--buffer-chunks", type=int, default=8, help="chunks in the streaming shuffle buffer")
    parser.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: the cache's plan)")
    parser.add_argument("--dir", default=os.environ.get("PROTOQUANT_BENCH_DIR", tempfile.gettempdir()))
    parser.add_argument("--no-head", action="store_true", help="measure the reads only (no head epoch)")
    parser.add_argument("--keep", action="store_true", help="keep the generated caches")
    parser.add_argument("--write-results", action="store_true", help=f"also write the table into bench/RESULTS.md ({TITLE})")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON too")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.build is not None:
        build(Path(args.dir) / f"scale-{args.build}.zarr", args.build, args.grid, args.dim, args.classes, args.shard_rows)
        return
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    results = run_sizes(args)
    text = report(results, args)
    print(text)
    if args.json:
        print(json.dumps(results))
    if args.write_results:
        from results_section import replace_section

        sizes = ",".join(str(n) for n in args.sizes)
        replace_section(TITLE, f"`python bench/scale.py --sizes {sizes} --dim {args.dim} --max-memory {args.max_memory}`\n\n{text}")


if __name__ == "__main__":
    main()
