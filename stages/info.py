"""`protoquant info`: what a cache holds, whether it is complete and intact, as data (cli.py prints it).

Without --verify the check is cheap (every done shard's files exist with the size written); with
--verify every shard is re-read and re-hashed against the checksum its completion mark carries.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import Cache
from pipeline.errors import ProtoquantError


def describe(path: str | Path, *, verify: bool = False) -> dict:
    """A JSON-able description of a cache: provenance, splits (shape, shards done, skipped), completeness,
    and the damage found (`damaged`: one line per problem; re-hashed when `verify`)."""
    cache = Cache(path)
    splits, damaged = {}, []
    for name in cache.splits:
        split = cache.split(name)
        done = split.done()
        problems = [str(p) for p in split.shard_problems(verify=verify)]
        try:
            skipped = int((~split.ok & split.done_rows()).sum())
            split.labels, split.ids  # a lost labels or ids chunk reads as fill values: refused by name
        except ProtoquantError as err:
            problems.append(str(err))
            skipped = None
        damaged += problems
        splits[name] = {
            "shape": list(split.features.shape),
            "views": int(split.views.shape[1]) if split.views is not None else 0,
            "shards_done": int(done.sum()),
            "shards": int(done.size),
            "skipped": skipped,
            "gigabytes": round(split.nbytes / 1e9, 4),
            "annotations": sorted(split.annotations() or {}),
            "checksums": split.recorded() is not None,
            "damaged": problems,
        }
    return {
        "path": str(cache.path),
        "complete": all(s["shards_done"] == s["shards"] for s in splits.values()) and not damaged,
        "verified": verify,
        "damaged": damaged,
        "fingerprint": cache.fingerprint,
        "provenance": cache.provenance,
        "source": cache.attrs.get("source"),
        "classes": cache.classes,
        "part_names": cache.attrs.get("part_names"),
        "splits": splits,
        "grid_cost": grid_cost(cache.provenance, sum(s["shape"][0] * (1 + s["views"]) for s in splits.values())),
    }


def grid_cost(provenance: dict, images: int) -> dict:
    """What the cache's choice of grid costs: cells per image (stage B work grows with them), float16
    bytes per image and for the whole cache, and the layers it came from (a cache made before --layers
    was recorded read the final map)."""
    height, width = (int(v) for v in provenance["grid"])
    dim = int(provenance["dim"])
    per_image = height * width * dim * 2  # float16
    return {
        "layers": provenance.get("layers") or ["final"],
        "layer_shapes": provenance.get("layer_shapes") or [[height, width, dim]],
        "cells": height * width,
        "dim": dim,
        "bytes_per_image": per_image,
        "images": images,
        "gigabytes": round(per_image * images / 1e9, 4),
    }


def require_intact(description: dict) -> None:
    """One line naming the damage, after the description was shown (exit code 2 for scripts)."""
    damaged = description["damaged"]
    if damaged:
        shown = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise ProtoquantError(f"{description['path']} is damaged: {shown}. Run the same extract command again: it "
                              "redoes missing or truncated shards; an altered shard needs extract --overwrite")
