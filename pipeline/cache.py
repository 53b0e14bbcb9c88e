"""The feature cache: a Zarr v3 group that every stage after extraction reads.

    CACHE/                  attrs: format, version, provenance (backbone, weights, data config, grid,
                            dim, versions), classes, source, settings, fingerprint, complete
      <split>/features      (N, H, W, D) float16, inner chunks of R whole images, grouped into shards
      <split>/views         (N, V, H, W, D) float16, augmented views (train only, when asked)
      <split>/labels        (N,) int32          written once by the coordinator before extraction (-1: lost)
      <split>/ids           (N,) str            image path relative to DATA, or WebDataset key
      <split>/ok            (N,) uint8          1 = extracted, 0 = skipped bad file (features stay NaN),
                                                255 = not written yet (a lost chunk in a done shard)
      <split>/image_size    (N, 2) int32        original (width, height): maps annotations onto the grid
      <split>/boxes, part_locs, part_boxes      CUB annotations, when the dataset has them
      <split>/checksum      (P,) str            per shard: blake2b of its rows' features, views, ok,
                                                sizes, labels and ids, as written
      <split>/nbytes        (P,) int64          per shard: bytes of its features (+ views) shard files
      <split>/done          (P,) uint8          one completion mark per shard, written LAST

A shard (zarr's sharding codec: one storage object holding several inner chunks) is the unit of work
and of resume: exactly one writer fills it, whole, fsyncs it, records its checksum and size, then sets
its mark. Zarr has no locks, so every per-row array is chunked by the shard's rows too: no two writers
ever touch the same object. The fingerprint of a complete cache covers its settings, ids, labels and
every shard's checksum: a cache of other pixels is another cache.

Integrity is checked at three costs: `require_complete` (every reader) stats each done shard's files
against the recorded sizes; every block read checks that rows marked extracted hold finite features
(once per block and process while its shard files are unchanged: a later epoch's read of the same
block skips the pass) and that labels and marks are not fill values; `verify` re-hashes every shard
(`info --verify`).
Caches written before checksums existed (same format version) read as before and verify as unknown.

Reads: features and views in plain shards (the layout written here: no compression) are read straight
from the shard files (pipeline/rawshards.py parses the zarr v3 shard index), by a pool of reader
threads for whole-split loads and prefetched blocks; any other layout reads through zarr, with the
`zarrs` codec pipeline when it is installed. The store stays a plain Zarr v3 group either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from pipeline.errors import ProtoquantError
from pipeline.paths import refuse_url
from pipeline.rawshards import RawShardArray, read_pool

FORMAT = "protoquant-feature-cache"
FORMAT_VERSION = 1
TARGET_CHUNK_BYTES = 16 << 20
CHUNKS_PER_SHARD = 8
NOT_WRITTEN = 255           # fill value of `ok`: a done shard never holds it
LOST_LABEL = -1             # fill value of `labels`: a label that reads -1 was lost
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}  # an all-NaN shard (every file skipped) is a file too


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

    def shard_of(self, row: int) -> int:
        return row // self.rows_per_shard


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


def plan_shards(done: dict[str, np.ndarray], rank: int = 0, world: int = 1) -> dict[str, list[int]]:
    """Which shards this rank extracts: the unmarked shards of every split, in split order, dealt out
    round-robin over ranks (so ranks get equal counts across splits). Pure: the same marks, rank and
    world always give the same plan, and the ranks' plans are disjoint and cover every unmarked shard."""
    if not 0 <= rank < world:
        raise ProtoquantError(f"internal: rank {rank} is outside a world of {world}")
    todo = [(name, int(shard)) for name, marks in done.items() for shard in np.flatnonzero(~np.asarray(marks, dtype=bool))]
    plan: dict[str, list[int]] = {name: [] for name in done}
    for name, shard in todo[rank::world]:
        plan[name].append(shard)
    return plan


def settings_hash(settings: dict) -> str:
    """A short stable hash of everything that decides a cache's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(settings: dict, splits: dict[str, tuple[list[str], np.ndarray]],
                 checksums: dict[str, list[str]] | None = None) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(splits):
        ids, labels = splits[name]
        digest.update(name.encode())
        digest.update("\n".join(ids).encode())
        digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
        if checksums is not None:
            digest.update("\n".join(checksums[name]).encode())
    return digest.hexdigest()[:16]


def shard_checksum(values: dict[str, np.ndarray], labels: np.ndarray, ids: np.ndarray) -> str:
    """blake2b over a shard's rows: each per-row array (by name, in name order), then labels and ids."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(values):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values[name]).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    digest.update("\n".join(str(i) for i in ids).encode())
    return digest.hexdigest()


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
    Features are NaN until written, so an unwritten row can never pass for data. The caller has
    checked (pipeline/paths.py) that `path` is free or a cache of ours: mode "w" clears it.
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
        _create_split(root, name, plan, (h, w), dim, plan_layout(len(plan.ids), bytes_per_image, rows_per_shard))
    return Cache(path, writable=True)


def _create_split(root: zarr.Group, name: str, plan: SplitPlan, grid: tuple[int, int], dim: int, layout: Layout) -> None:
    h, w = grid
    n = len(plan.ids)
    group = root.create_group(name, attributes={
        "n": n, "rows_per_chunk": layout.rows_per_chunk, "rows_per_shard": layout.rows_per_shard,
        "n_shards": layout.n_shards, "views": plan.views,
    })
    group.create_array(
        "features", shape=(n, h, w, dim), dtype="float16", chunks=(layout.rows_per_chunk, h, w, dim),
        shards=(layout.rows_per_shard, h, w, dim), compressors=None, fill_value=np.nan,
        dimension_names=("image", "y", "x", "channel"),
    )
    if plan.views:
        view_rows = plan_layout(n, h * w * dim * 2 * plan.views, layout.rows_per_shard).rows_per_chunk
        group.create_array(
            "views", shape=(n, plan.views, h, w, dim), dtype="float16",
            chunks=(view_rows, plan.views, h, w, dim),
            shards=(layout.rows_per_shard, plan.views, h, w, dim), compressors=None, fill_value=np.nan,
            dimension_names=("image", "view", "y", "x", "channel"),
        )
    per_row = (layout.rows_per_shard,)
    group.create_array("labels", data=np.asarray(plan.labels, dtype=np.int32), chunks=per_row, fill_value=LOST_LABEL)
    ids = group.create_array("ids", shape=(n,), dtype=str, chunks=per_row)  # variable-length strings
    ids[:] = np.asarray(plan.ids, dtype=object)
    group.create_array("ok", shape=(n,), dtype="uint8", chunks=per_row, fill_value=NOT_WRITTEN)
    group.create_array("image_size", shape=(n, 2), dtype="int32", chunks=(layout.rows_per_shard, 2), fill_value=0)
    for key in ("boxes", "part_locs", "part_boxes"):
        value = getattr(plan, key)
        if value is not None:
            group.create_array(key, data=np.asarray(value, dtype=np.float32), chunks=(layout.rows_per_shard, *value.shape[1:]))
    group.create_array("checksum", shape=(layout.n_shards,), dtype=str, chunks=(1,))
    group.create_array("nbytes", shape=(layout.n_shards,), dtype="int64", chunks=(1,), fill_value=-1)
    group.create_array("done", shape=(layout.n_shards,), dtype="uint8", chunks=(1,), fill_value=0)


def is_protoquant_cache(path: Path) -> bool:
    """A folder whose root zarr.json carries this protoquant's cache format marker and version."""
    attrs = _root_attributes(Path(path))
    return bool(attrs) and attrs.get("format") == FORMAT and attrs.get("format_version") == FORMAT_VERSION


def describe_foreign_cache(path: Path) -> str | None:
    """Name a protoquant cache of another format version (for paths.check_output); None otherwise."""
    attrs = _root_attributes(Path(path))
    if attrs and attrs.get("format") == FORMAT and attrs.get("format_version") != FORMAT_VERSION:
        return (f"an older-format protoquant feature cache (format version {attrs.get('format_version')}; this "
                f"protoquant writes version {FORMAT_VERSION}), which it does not replace: re-extract into a new "
                "path, or delete it yourself")
    return None


def _root_attributes(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        return None
    return meta["attributes"]


@dataclass(frozen=True)
class ShardProblem:
    """A done shard whose stored bytes do not match its mark."""

    split: str
    shard: int
    rows: range
    file: Path
    problem: str   # missing, truncated, unreadable (...), altered

    def __str__(self) -> str:
        return f"{self.split} shard {self.shard} (rows {self.rows.start}..{self.rows.stop - 1}, {self.file}): {self.problem}"


class CacheSplit:
    """One split of a cache: lazy zarr arrays plus small per-row arrays read eagerly and checked."""

    def __init__(self, group: zarr.Group, name: str, *, directory: Path | None = None, n_classes: int | None = None):
        self.group = group
        self.name = name
        self.directory = directory            # the split's folder on disk (None: not known)
        self.n_classes = n_classes
        self.attrs = dict(group.attrs)
        self.n = int(self.attrs["n"])
        self.layout = Layout(self.n, int(self.attrs["rows_per_chunk"]), int(self.attrs["rows_per_shard"]))
        with _zarr_read_pipeline(group):
            self.features = group["features"]
            self.views = group["views"] if "views" in group else None
        self._ok: np.ndarray | None = None
        self._raw: dict[str, RawShardArray | None] = {}
        self._checked: dict[tuple[str, int, int], tuple] = {}  # (what, start, stop) -> its files' identity then

    # --- small per-row arrays: a lost chunk reads as its fill value, which is refused by name ---

    @property
    def labels(self) -> np.ndarray:
        labels = self._read(self.group["labels"], "labels")
        bad = (labels < 0) | (labels >= (self.n_classes or np.iinfo(np.int32).max))
        if bad.any():
            raise self._damaged("labels", np.flatnonzero(bad), "hold no valid label (a lost labels chunk?)")
        return labels

    @property
    def ids(self) -> np.ndarray:
        ids = self._read(self.group["ids"], "ids")
        lost = ids == ""
        if lost.any():
            raise self._damaged("ids", np.flatnonzero(lost), "have no id (a lost ids chunk?)")
        return ids

    @property
    def ok(self) -> np.ndarray:
        """True for rows that hold features (False for skipped bad files and unextracted rows)."""
        if self._ok is None:
            raw = self._read(self.group["ok"], "ok")
            lost = (raw == NOT_WRITTEN) & self.done_rows()
            if lost.any():
                raise self._damaged("ok", np.flatnonzero(lost), "belong to done shards but have no mark (a lost ok chunk?)")
            self._ok = raw == 1
        return self._ok

    @property
    def image_size(self) -> np.ndarray:
        return self._read(self.group["image_size"], "image_size")

    def done(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def done_rows(self) -> np.ndarray:
        """(N,) bool: rows that belong to a shard marked done."""
        rows = np.zeros(self.n, dtype=bool)
        for shard in np.flatnonzero(self.done()):
            r = self.layout.shard_rows(int(shard))
            rows[r.start:r.stop] = True
        return rows

    def is_complete(self) -> bool:
        return bool(self.done().all())

    def annotations(self) -> dict[str, np.ndarray] | None:
        """CUB boxes and part keypoints (original image pixels), or None when the dataset had none."""
        keys = [k for k in ("boxes", "part_locs", "part_boxes") if k in self.group]
        return {k: self.group[k][:] for k in keys} or None

    # --- feature reads: errors name the shard file; rows marked extracted must be finite ---
    # Plain shards (no compression: the default) are read straight from their files by
    # pipeline/rawshards.py, in a background thread pool; any other layout reads through zarr.

    def read_features(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as float16 (n, H, W, D), checked; into `out` (C-contiguous) when given."""
        return self._read_block(self.features, "features", start, stop, out)

    def read_features_scattered(self, start: int, stop: int, buffer: np.ndarray, where: np.ndarray) -> None:
        """Row start + i into buffer[where[i]] (a shuffled buffer), checked: from plain shards the kernel
        puts each row straight into its place."""
        raw = self.raw_reader("features")
        if raw is None:
            buffer[where] = self.read_features(start, stop)
            return
        targets = [buffer[int(i)] for i in where]
        identity = self._files_identity("features", start, stop)  # before the read: a later change is checked again
        try:
            raw.read_rows_into(start, stop, targets)
        except Exception as err:  # the raw reader raises ValueError, OSError on a damaged object
            raise self._read_error("features", slice(start, stop), err) from None
        if self._checked_before("features", start, stop, identity):
            return
        broken = np.flatnonzero(self.ok[start:stop] & nonfinite_in(targets))
        if len(broken):
            raise self._damaged("features", start + broken, "are marked extracted but read as NaN (a lost or damaged shard?)")
        self._remember_checked("features", start, stop, identity)

    def read_views(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the augmented views as float16 (n, V, H, W, D), checked."""
        return self._read_block(self.views, "views", start, stop)

    def _read_block(self, array: zarr.Array, what: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        identity = self._files_identity(what, start, stop)  # before the read: a later change is checked again
        block = self._read(array, what, slice(start, stop), out)
        if self._checked_before(what, start, stop, identity):
            return block
        marked = self.ok[start:stop]
        broken = np.flatnonzero(marked & nonfinite_rows(block))
        if len(broken):
            raise self._damaged(what, start + broken, "are marked extracted but read as NaN (a lost or damaged shard?)")
        self._remember_checked(what, start, stop, identity)
        return block

    def _files_identity(self, what: str, start: int, stop: int) -> tuple | None:
        """(device, inode, size, mtime, ctime) of each shard file the raw reader reads rows [start, stop) of
        `what` from; None (every read checked) for reads through zarr, whose files another layout need not
        name so, and when one is missing."""
        raw = self.raw_reader(what)
        if raw is None or stop <= start:
            return None
        identity = []
        for shard in range(start // raw.shard_rows, (stop - 1) // raw.shard_rows + 1):
            try:
                st = os.stat(raw.shard_path(shard))
            except OSError:
                return None
            identity.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(identity)

    def _checked_before(self, what: str, start: int, stop: int, identity: tuple | None) -> bool:
        """Whether this very block was read and checked already from files of this identity (taken before
        the read) and they still have it now, after the read: a file replaced in between is checked."""
        return (identity is not None and self._checked.get((what, start, stop)) == identity
                and self._files_identity(what, start, stop) == identity)

    def _remember_checked(self, what: str, start: int, stop: int, identity: tuple | None) -> None:
        if identity is not None:
            self._checked[(what, start, stop)] = identity

    def block_starts(self, rows_per_block: int | None = None) -> list[tuple[int, int]]:
        """(start, stop) of chunk-aligned blocks of about `rows_per_block` rows (one inner chunk by default)."""
        step = rows_per_block or self.layout.rows_per_chunk
        step = max(self.layout.rows_per_chunk, step - step % self.layout.rows_per_chunk)
        return [(start, min(start + step, self.n)) for start in range(0, self.n, step)]

    def iter_blocks(self, rows_per_block: int | None = None, *, prefetch: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, features float16 (R, H, W, D)) in chunk-aligned blocks, the next `prefetch` blocks
        read in the background meanwhile: memory bounded by (1 + prefetch) blocks."""
        self.ok  # read the marks once, before the reader threads need them
        pending: deque = deque()
        for start, stop in self.block_starts(rows_per_block):
            pending.append((start, read_pool().submit(self.read_features, start, stop)))
            if len(pending) > prefetch:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()

    def load(self) -> np.ndarray:
        """The whole split in RAM (float16): blocks of about 32 MiB read in parallel straight into one array."""
        out = np.empty(self.features.shape, dtype=np.float16)
        self.ok  # read the marks once, before the reader threads need them
        rows_per_block = max(1, (32 << 20) // max(1, self.nbytes // max(self.n, 1)))
        futures = [read_pool().submit(self.read_features, start, stop, out[start:stop])
                   for start, stop in self.block_starts(rows_per_block)]
        for future in futures:
            future.result()
        return out

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.features.shape)) * 2

    def raw_reader(self, what: str) -> RawShardArray | None:
        """The direct shard-file reader of `features` or `views`, or None (not on local disk, not a plain
        layout, or PROTOQUANT_RAW_READS=0): then reads go through zarr."""
        if what not in self._raw:
            usable = self.directory is not None and what in ("features", "views") and os.environ.get("PROTOQUANT_RAW_READS") != "0"
            self._raw[what] = RawShardArray.open(self.directory / what) if usable else None
        return self._raw[what]

    def _read(self, array: zarr.Array, what: str, where: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
        try:
            raw = self.raw_reader(what)
            if raw is not None and where.step in (None, 1):
                rows = range(*where.indices(self.n))
                if out is None:
                    return raw.read(rows.start, rows.stop)
                raw.read_into(rows.start, rows.stop, out)
                return out
            if out is None:
                return array[where]
            out[...] = array[where]
            return out
        except Exception as err:  # zarr/numcodecs/the raw reader raise ValueError, OSError, ... on a damaged object
            raise self._read_error(what, where, err) from None

    def _read_error(self, what: str, where: slice, err: BaseException) -> ProtoquantError:
        rows = range(*where.indices(self.n))
        shards = sorted({self.layout.shard_of(r) for r in (rows.start, max(rows.start, rows.stop - 1))})
        files = ", ".join(str(self.shard_file(what, s)) for s in shards)
        return ProtoquantError(f"cannot read {what} of the {self.name} split ({files}): {_reason(err)}; the cache "
                               f"is damaged: run `protoquant info {self._cache_path()} --verify` and re-extract "
                               "the damaged shards (run the same extract command again)")

    def _damaged(self, what: str, rows: np.ndarray, problem: str) -> ProtoquantError:
        shards = sorted({self.layout.shard_of(int(r)) for r in rows})
        listed = ", ".join(str(int(r)) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
        files = ", ".join(str(self.shard_file(what, s)) for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
        return ProtoquantError(f"the cache is damaged: {len(rows)} rows of the {self.name} split (rows {listed}) {problem}; "
                               f"see {files}; run `protoquant info {self._cache_path()} --verify`, then run the same "
                               "extract command again (it redoes damaged shards) or re-extract with --overwrite")

    def _cache_path(self) -> str:
        return str(self.directory.parent) if self.directory else "CACHE"

    # --- shard files, and their agreement with the marks ---

    def shard_file(self, array: str, shard: int) -> Path:
        """The storage object of `array` that holds shard `shard` (every array is cut by shard rows)."""
        known = {"features": self.features, "views": self.views}.get(array)
        ndim = known.ndim if known is not None else self.group[array].ndim if array in self.group else 1
        key = Path("c", str(shard), *["0"] * (ndim - 1))
        return (self.directory or Path(self.name)) / array / key

    def _shard_arrays(self) -> list[str]:
        return ["features"] + (["views"] if self.views is not None else [])

    def shard_nbytes(self, shard: int) -> int:
        """Bytes on disk of the shard's features (+ views) files; -1 when one is missing."""
        sizes = [self.shard_file(a, shard).stat().st_size if self.shard_file(a, shard).is_file() else -1
                 for a in self._shard_arrays()]
        return -1 if min(sizes) < 0 else sum(sizes)

    def recorded(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(checksums, nbytes) per shard, or None for a cache written before they were recorded."""
        if "checksum" not in self.group:
            return None
        return self.group["checksum"][:], self.group["nbytes"][:]

    def shard_problems(self, *, verify: bool = False) -> list[ShardProblem]:
        """Done shards whose files are missing or of another size than recorded; with `verify`, also
        those whose re-hashed content differs from the recorded checksum."""
        if self.directory is None:
            return []
        recorded = self.recorded()
        problems = []
        for shard in np.flatnonzero(self.done()):
            shard = int(shard)
            problem = self._shard_problem(shard, recorded, verify)
            if problem:
                problems.append(ShardProblem(self.name, shard, self.layout.shard_rows(shard),
                                             self.shard_file("features", shard), problem))
        return problems

    def _shard_problem(self, shard: int, recorded, verify: bool) -> str | None:
        missing = [a for a in self._shard_arrays() if not self.shard_file(a, shard).is_file()]
        if missing:
            return f"{' and '.join(missing)} file missing"
        if recorded is None:
            return None  # no sizes or checksums recorded (an older protoquant): nothing more to compare
        checksums, nbytes = recorded
        if nbytes[shard] >= 0 and self.shard_nbytes(shard) != nbytes[shard]:
            return f"truncated or resized ({self.shard_nbytes(shard)} bytes, {int(nbytes[shard])} written)"
        if not verify:
            return None
        try:
            actual = self.checksum_on_disk(shard)
        except Exception as err:
            return f"unreadable ({_reason(err)})"
        return None if actual == checksums[shard] else "altered (checksum differs from the one written)"

    def checksum_on_disk(self, shard: int) -> str:
        """Re-hash what the store holds for the shard, the way the writer hashed what it wrote."""
        rows = self.layout.shard_rows(shard)
        at = slice(rows.start, rows.stop)
        values = {name: self.group[name][at] for name in ("features", "ok", "image_size")}
        if self.views is not None:
            values["views"] = self.views[at]
        return shard_checksum(values, self.group["labels"][at], self.group["ids"][at])


def _zarr_read_pipeline(group: zarr.Group):
    """Where zarr itself reads features (layouts the raw reader does not take, or PROTOQUANT_RAW_READS=0),
    use the zarrs Rust codec pipeline when it is installed (`pip install protoquant[fast-zarr]`) and the
    store is open read-only; PROTOQUANT_ZARRS=0 keeps zarr-python's own pipeline."""
    if not group.read_only or os.environ.get("PROTOQUANT_ZARRS") == "0" or importlib.util.find_spec("zarrs") is None:
        return contextlib.nullcontext()
    return zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def nonfinite_rows(block: np.ndarray, rows_per_pass: int = 64) -> np.ndarray:
    """(n,) bool: rows of `block` holding a NaN or an infinity. For float16 a value is not finite exactly
    when its exponent bits are all set, which an integer max finds several times faster than np.isfinite."""
    if len(block) == 0:
        return np.zeros(0, dtype=bool)
    flat = block.reshape(len(block), -1)
    if block.dtype != np.float16:
        return ~np.isfinite(flat).all(axis=1)
    bits = flat.view(np.uint16)
    out = np.zeros(len(block), dtype=bool)
    for first in range(0, len(block), rows_per_pass):  # bounded temporaries
        part = bits[first:first + rows_per_pass]
        out[first:first + len(part)] = (part & 0x7FFF).max(axis=1, initial=0) >= 0x7C00
    return out


def nonfinite_in(rows: list[np.ndarray]) -> np.ndarray:
    """(n,) bool: which of these same-shape rows (a shuffled buffer's, scattered) hold a NaN or an infinity;
    nonfinite_rows' test, row by row through one scratch array."""
    if not rows or rows[0].dtype != np.float16:
        return np.array([bool(nonfinite_rows(row[None])[0]) for row in rows], dtype=bool)
    scratch = np.empty(rows[0].size, dtype=np.uint16)
    return np.array([np.bitwise_and(row.reshape(-1).view(np.uint16), 0x7FFF, out=scratch).max(initial=0) >= 0x7C00
                     for row in rows], dtype=bool)


def grid_maps(provenance: dict) -> list[tuple[int, int, int, int]]:
    """(first channel, end channel, block rows, block columns) of each map in the cached grid, in channel
    order, from the layer shapes extraction recorded: a coarser map was upsampled onto the grid by copying
    each of its values over a block of cells (pipeline.backbones.extract_grid: nearest, by an integer
    factor); a map at the grid's own resolution has blocks of 1 x 1. Caches of one map (and caches from
    before layers) are one map of 1 x 1 blocks."""
    grid, dim = [int(v) for v in provenance["grid"]], int(provenance["dim"])
    shapes = provenance.get("layer_shapes") or [[*grid, dim]]
    maps, start = [], 0
    for h, w, d in shapes:
        maps.append((start, start + int(d), grid[0] // int(h), grid[1] // int(w)))
        start += int(d)
    return maps


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def write_shard(group: zarr.Group, directory: Path | None, shard: int, rows: range, buffers: dict[str, np.ndarray]) -> None:
    """Write one whole shard, make its bytes durable, record its checksum and size, then set its mark.

    The mark comes last and only after fsync, so a crash leaves a shard either unmarked (redone on
    resume) or complete on disk. On a local file system fsync makes the bytes durable; on a network
    file system it is as strong as that file system's close-to-open guarantee.
    """
    at = slice(rows.start, rows.stop)
    for name, values in buffers.items():
        group[name].with_config(_WRITE_EVERY_CHUNK)[at] = values
    checksum = shard_checksum(buffers, group["labels"][at], group["ids"][at])
    split = CacheSplit(group, group.basename, directory=directory)
    if directory is not None:
        for name in buffers:
            _fsync(split.shard_file(name, shard))
    group["checksum"][shard] = checksum
    group["nbytes"][shard] = split.shard_nbytes(shard) if directory is not None else -1
    if directory is not None:
        _fsync(split.shard_file("checksum", shard))
        _fsync(split.shard_file("nbytes", shard))
    group["done"][shard] = 1
    if directory is not None:
        _fsync(split.shard_file("done", shard))


def _fsync(path: Path) -> None:
    """Flush a file and its folder entry to disk (a missing file is left to the checks that follow)."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
        try:
            fd = os.open(target, flags)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems refuse fsync on folders
        finally:
            os.close(fd)


class Cache:
    """A protoquant feature cache, opened read-only unless `writable` (extraction only)."""

    def __init__(self, path: str | Path, *, writable: bool = False):
        refuse_url(path, "the cache")
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            if (self.path / "config.json").is_file():
                raise ProtoquantError(f"{self.path} is a run directory, not a feature cache: pass the cache the run "
                                      "was trained on (its path is in the run's config.json)")
            raise ProtoquantError(f"{self.path} is not a feature cache (no zarr.json); make one with `protoquant extract DATA --out {self.path}`")
        attrs = _root_attributes(self.path)
        if attrs is None or attrs.get("format") != FORMAT:
            raise ProtoquantError(f"{self.path} is a Zarr store but not a protoquant feature cache")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ProtoquantError(f"{self.path} has cache format version {attrs.get('format_version')}, "
                                  f"this protoquant reads version {FORMAT_VERSION}: re-extract it")
        self.writable = writable
        self.root = zarr.open_group(str(self.path), mode="r+" if writable else "r")
        self.attrs = dict(self.root.attrs)

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
        return CacheSplit(self.root[name], name, directory=self.path / name, n_classes=len(self.attrs.get("classes", [])) or None)

    def is_complete(self) -> bool:
        return all(self.split(s).is_complete() for s in self.splits)

    def require_complete(self) -> None:
        """Refuse to read a cache whose extraction has not finished, or whose shard files no longer
        match their marks (missing or truncated): the cheap check every reader runs."""
        missing = {s: int((~self.split(s).done()).sum()) for s in self.splits}
        missing = {s: m for s, m in missing.items() if m}
        if missing:
            parts = ", ".join(f"{s}: {m} shards" for s, m in missing.items())
            raise ProtoquantError(f"{self.path} is incomplete ({parts} not extracted); run the same "
                                  "`protoquant extract` command again to resume")
        problems = self.shard_problems()
        if problems:
            raise ProtoquantError(f"{self.path} is damaged: {_listed(problems)}; run the same extract command again "
                                  f"to redo those shards, or see `protoquant info {self.path} --verify`")

    def shard_problems(self, *, verify: bool = False) -> list[ShardProblem]:
        return [p for s in self.splits for p in self.split(s).shard_problems(verify=verify)]

    def update_attrs(self, values: dict) -> None:
        if not self.writable:
            raise ProtoquantError(f"internal: {self.path} was opened read-only")
        self.root.attrs.update(values)
        self.attrs.update(values)

    def content_fingerprint(self) -> str:
        """The fingerprint of a complete cache: settings, ids, labels and every shard's checksum."""
        splits, checksums = {}, {}
        for name in self.splits:
            split = self.split(name)
            splits[name] = (split.ids.tolist(), split.labels)
            recorded = split.recorded()
            checksums[name] = [str(c) for c in recorded[0]] if recorded else []
        return _fingerprint(self.attrs["settings"], splits, checksums)


def _listed(problems: list[ShardProblem], limit: int = 3) -> str:
    shown = "; ".join(str(p) for p in problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")
