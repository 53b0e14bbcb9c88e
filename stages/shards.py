"""The `shards` stage: convert an ImageFolder or CUB-200-2011 dataset into WebDataset tar shards.

Shards turn many small image files into a few large sequential files (faster on network and object
storage, easy to copy); `protoquant extract` reads them as it reads the original folders.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets import CLASSES_JSON, CLASSES_TXT, SHARD_INDEX, open_dataset, write_shards
from pipeline.errors import ProtoquantError


def make_shards(
    data: str | Path,
    out: Path,
    *,
    max_count: int = 1000,
    seed: int = 0,
    kind: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Write DATA as OUT/train-000000.tar, ..., OUT/test-000000.tar, ... and return the shard index.

    Args:
        data: the dataset (ImageFolder or CUB layout).
        out: output directory; it must be empty unless `overwrite`.
        max_count: samples per shard (the last shard of a split holds the rest).
        seed: shuffle seed (each split is shuffled once, so every shard mixes classes).
        kind: dataset layout, "auto" to detect it.
        overwrite: replace the shards already in OUT (deletes OUT/*.tar and the index files only).
    """
    if max_count < 1:
        raise ProtoquantError(f"--max-count must be at least 1 (got {max_count}).")
    out = Path(out)
    dataset = open_dataset(data, kind=kind)  # before touching OUT: a bad DATA must not cost old shards
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ProtoquantError(
                f"{out} is not empty: choose an empty --out directory, or pass --overwrite to replace the "
                "shards in it (deletes its *.tar, classes and index files, nothing else)."
            )
        _remove_previous_shards(out)
    return write_shards(dataset, out, max_count=max_count, seed=seed)


def _remove_previous_shards(out: Path) -> None:
    """Delete what a previous `shards` run wrote: the top-level tars and the index/class files."""
    for path in out.glob("*.tar"):
        path.unlink()
    for name in (SHARD_INDEX, CLASSES_JSON, CLASSES_TXT):
        (out / name).unlink(missing_ok=True)
