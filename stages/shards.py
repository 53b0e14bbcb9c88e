"""The `shards` stage: convert an ImageFolder or CUB-200-2011 dataset into WebDataset tar shards.

Shards turn many small image files into a few large sequential files (faster on network and object
storage, easy to copy); `protoquant extract` reads them as it reads the original folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.datasets import CLASSES_JSON, CLASSES_TXT, SHARD_INDEX, open_dataset, write_shards
from pipeline.errors import ProtoquantError
from pipeline.paths import check_output


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
        overwrite: replace the shards an earlier run wrote in OUT (only the files its index lists); a folder
            holding anything else, DATA itself, or a folder inside or around DATA is refused.
    """
    if max_count < 1:
        raise ProtoquantError(f"--max-count must be at least 1 (got {max_count}).")
    out = Path(out)
    dataset = open_dataset(data, kind=kind)  # before touching OUT: a bad DATA must not cost old shards
    ours = check_output(out, is_ours=_written_by_shards, what="a shards folder", overwrite=overwrite,
                        sources=[Path(dataset.root)])
    if ours:
        if not overwrite:
            raise ProtoquantError(f"{out} already holds shards: choose an empty --out directory, or pass --overwrite "
                                  "to replace them (only the files `protoquant shards` wrote there).")
        _remove_previous_shards(out)
    return write_shards(dataset, out, max_count=max_count, seed=seed)


def _previous_files(out: Path) -> set[str] | None:
    """The files an earlier `shards` run wrote in OUT (from its index), or None without an index."""
    index = out / SHARD_INDEX
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8")).get("splits") or {}
        tars = {str(entry["url"]) for entries in splits.values() for entry in entries}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return tars | {SHARD_INDEX, CLASSES_JSON, CLASSES_TXT}


def _written_by_shards(out: Path) -> bool:
    """OUT holds nothing but what an earlier `shards` run listed in its index."""
    ours = _previous_files(out)
    return ours is not None and all(path.name in ours for path in out.iterdir())


def _remove_previous_shards(out: Path) -> None:
    """Delete what a previous `shards` run wrote (the tars its index lists, the index and class files)."""
    for name in sorted(_previous_files(out) or ()):
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
