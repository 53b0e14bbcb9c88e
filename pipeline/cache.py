"""The feature cache: a Zarr v3 group that every stage after extraction reads.

    CACHE/                  attrs: format, version, provenance (backbone, weights, data config, grid,
                            dim, versions), classes, source, settings, fingerprint, complete
      <split>/features      (N, H, W, D) float16, inner chunks of R whole images, grouped into shards
      <split>/views         (N, V, H, W, D) float16, augmented views (train only, when asked)
      <split>/labels        (N,) int32          written once by the coordinator before extraction
      <split>/ids           (N,) str            image path relative to DATA, or WebDataset key
      <split>/ok            (N,) uint8          1 = extracted, 0 = skipped bad file (features stay NaN)
      <split>/image_size    (N, 2) int32        original (width, height): maps annotations onto the grid
      <split>/boxes, part_locs, part_boxes      CUB annotations, when the dataset has them
      <split>/done          (P,) uint8          one completion mark per shard, written LAST

A shard (zarr's sharding codec: one storage object holding several inner chunks) is the unit of work
and of resume: exactly one writer fills it, whole, then sets its mark. Zarr has no locks, so every
per-row array is chunked by the shard's rows too: no two writers ever touch the same object.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from pipeline.errors import ProtoquantError

FORMAT = "protoquant-feature-cache"
FORMAT_VERSION = 1
TARGET_CHUNK_BYTES = 16 << 20
CHUNKS_PER_SHARD = 8


@dataclass(frozen=True)
class Layout:
    """How a split's rows are cut: R rows per inner chunk, S rows (a multiple of R) per shard."""

    n: int
    rows_per_chunk: int
    rows_per_shard: int

    @property
    def n_shards(self) -> int:
        return max(1, math.ceil(self.n / self.rows_per_shard))

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.n))


def plan_layout(n: int, bytes_per_image: int, rows_per_shard: int | None = None) -> Layout:
    """Inner chunks of R whole images (the largest power of two with R * image <= 16 MiB, 1..256),
    shards of 8 chunks unless `rows_per_shard` says otherwise (R then divides it)."""
    rows = 1
    while rows < 256 and 2 * rows * bytes_per_image <= TARGET_CHUNK_BYTES:
        rows *= 2
    if rows_per_shard is None:
        return Layout(n, rows, rows * CHUNKS_PER_SHARD)
    if rows_per_shard < 1:
        raise ProtoquantError(f"--shard-rows must be at least 1, got {rows_per_shard}")
    return Layout(n, math.gcd(rows, rows_per_shard), rows_per_shard)


def settings_hash(settings: dict) -> str:
    """A short stable hash of everything that decides a cache's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(settings: dict, splits: dict[str, tuple[list[str], np.ndarray]]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(splits):
        ids, labels = splits[name]
        digest.update(name.encode())
        digest.update("\n".join(ids).encode())
        digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class SplitPlan:
    """What the coordinator writes for one split before any feature is extracted."""

    ids: list[str]
    labels: np.ndarray
    views: int = 0
    boxes: np.ndarray | None = None        # (N, 4) x, y, w, h
    part_locs: np.ndarray | None = None    # (N, P, 3) x, y, visible
    part_boxes: np.ndarray | None = None   # (N, P, 4)


def create_cache(
    path: str | Path,
    *,
    settings: dict,
    attrs: dict,
    splits: dict[str, SplitPlan],
    grid: tuple[int, int],
    dim: int,
    rows_per_shard: int | None = None,
) -> "Cache":
    """Create the store with every array, its labels/ids/annotations, and empty completion marks.

    `settings` decides content (its hash is checked on resume); `attrs` is provenance for people.
    Features are NaN until written, so an unwritten row can never pass for data.
    """
    h, w = grid
    bytes_per_image = h * w * dim * 2
    fingerprint = _fingerprint(settings, {k: (p.ids, p.labels) for k, p in splits.items()})
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update({
        **attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
        "settings_hash": settings_hash(settings), "fingerprint": fingerprint, "grid": [h, w], "dim": dim,
        "dtype": "float16", "splits": list(splits), "complete": False,
    })
    for name, plan in splits.items():
        n = len(plan.ids)
        layout = plan_layout(n, bytes_per_image, rows_per_shard)
        group = root.create_group(name, attributes={
            "n": n, "rows_per_chunk": layout.rows_per_chunk, "rows_per_shard": layout.rows_per_shard,
            "n_shards": layout.n_shards, "views": plan.views,
        })
        shard_shape = (layout.rows_per_shard, h, w, dim)
        group.create_array(
            "features", shape=(n, h, w, dim), dtype="float16", chunks=(layout.rows_per_chunk, h, w, dim),
            shards=shard_shape, compressors=None, fill_value=np.nan, dimension_names=("image", "y", "x", "channel"),
        )
        if plan.views:
            view_rows = plan_layout(n, bytes_per_image * plan.views, layout.rows_per_shard).rows_per_chunk
            group.create_array(
                "views", shape=(n, plan.views, h, w, dim), dtype="float16",
                chunks=(view_rows, plan.views, h, w, dim),
                shards=(layout.rows_per_shard, plan.views, h, w, dim), compressors=None, fill_value=np.nan,
                dimension_names=("image", "view", "y", "x", "channel"),
            )
        per_row = (layout.rows_per_shard,)
        group.create_array("labels", data=np.asarray(plan.labels, dtype=np.int32), chunks=per_row)
        ids = group.create_array("ids", shape=(n,), dtype=str, chunks=per_row)  # variable-length strings
        ids[:] = np.asarray(plan.ids, dtype=object)
        group.create_array("ok", shape=(n,), dtype="uint8", chunks=per_row, fill_value=0)
        group.create_array("image_size", shape=(n, 2), dtype="int32", chunks=(layout.rows_per_shard, 2), fill_value=0)
        for key in ("boxes", "part_locs", "part_boxes"):
            value = getattr(plan, key)
            if value is not None:
                group.create_array(key, data=np.asarray(value, dtype=np.float32), chunks=(layout.rows_per_shard, *value.shape[1:]))
        group.create_array("done", shape=(layout.n_shards,), dtype="uint8", chunks=(1,), fill_value=0)
    return Cache(path)


class CacheSplit:
    """One split of a cache: lazy zarr arrays plus small per-row arrays read eagerly."""

    def __init__(self, group: zarr.Group, name: str):
        self.group = group
        self.name = name
        self.attrs = dict(group.attrs)
        self.n = int(self.attrs["n"])
        self.layout = Layout(self.n, int(self.attrs["rows_per_chunk"]), int(self.attrs["rows_per_shard"]))
        self.features = group["features"]
        self.views = group["views"] if "views" in group else None

    @property
    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    @property
    def ids(self) -> np.ndarray:
        return self.group["ids"][:]

    @property
    def ok(self) -> np.ndarray:
        """True for rows that hold features (False for skipped bad files)."""
        return self.group["ok"][:].astype(bool)

    @property
    def image_size(self) -> np.ndarray:
        return self.group["image_size"][:]

    def done(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def is_complete(self) -> bool:
        return bool(self.done().all())

    def annotations(self) -> dict[str, np.ndarray] | None:
        """CUB boxes and part keypoints (original image pixels), or None when the dataset had none."""
        keys = [k for k in ("boxes", "part_locs", "part_boxes") if k in self.group]
        return {k: self.group[k][:] for k in keys} or None

    def iter_blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, features float16 (R, H, W, D)) in chunk-aligned blocks: bounded memory."""
        step = rows_per_block or self.layout.rows_per_chunk
        step = max(self.layout.rows_per_chunk, step - step % self.layout.rows_per_chunk)
        for start in range(0, self.n, step):
            yield start, self.features[start:start + step]

    def load(self) -> np.ndarray:
        """The whole split in RAM (float16), filled block by block into one pre-allocated array."""
        out = np.empty(self.features.shape, dtype=np.float16)
        for start, block in self.iter_blocks(self.layout.rows_per_shard):
            out[start:start + len(block)] = block
        return out

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.features.shape)) * 2


class Cache:
    """A protoquant feature cache opened for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise ProtoquantError(f"{self.path} is not a feature cache (no zarr.json); make one with `protoquant extract DATA --out {self.path}`")
        self.root = zarr.open_group(str(self.path), mode="r+")
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ProtoquantError(f"{self.path} is a Zarr store but not a protoquant feature cache")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise ProtoquantError(f"{self.path} has cache format version {self.attrs.get('format_version')}, "
                                  f"this protoquant reads version {FORMAT_VERSION}: re-extract it")

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.attrs["grid"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def provenance(self) -> dict:
        return self.attrs["provenance"]

    def split(self, name: str) -> CacheSplit:
        if name not in self.splits:
            raise ProtoquantError(f"{self.path} has no split {name!r}; it has {', '.join(self.splits)}")
        return CacheSplit(self.root[name], name)

    def is_complete(self) -> bool:
        return all(self.split(s).is_complete() for s in self.splits)

    def require_complete(self) -> None:
        """Refuse to read a cache whose extraction has not finished."""
        missing = {s: int((~self.split(s).done()).sum()) for s in self.splits}
        missing = {s: m for s, m in missing.items() if m}
        if missing:
            parts = ", ".join(f"{s}: {m} shards" for s, m in missing.items())
            raise ProtoquantError(f"{self.path} is incomplete ({parts} not extracted); run the same "
                                  "`protoquant extract` command again to resume")

    def update_attrs(self, values: dict) -> None:
        self.root.attrs.update(values)
        self.attrs.update(values)


def check_cache_fingerprint(recorded: str, cache: Cache, what: str) -> None:
    """Refuse an artefact (codebook, run) made from another cache."""
    if recorded != cache.fingerprint:
        raise ProtoquantError(f"{what} was made from the cache with fingerprint {recorded}, but {cache.path} has "
                              f"{cache.fingerprint}: use the cache it was made from, or rebuild it from this one")
