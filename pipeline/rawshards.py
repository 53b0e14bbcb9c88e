"""Rows read straight from Zarr v3 shard files when the codec chain is plain: the cache's fast read path.

A shard written by zarr's `sharding_indexed` codec is one file: the encoded inner chunks, and an index
of one (offset, nbytes) little-endian uint64 pair per inner chunk (C order over the shard's chunk grid)
followed by its crc32c, at the end of the file (`index_location` "end", the default) or at its start.
An inner chunk that was never written has offset = nbytes = 2**64 - 1 and reads as the fill value.

When the inner codecs are `bytes` alone (no compression, no transpose) an inner chunk's bytes ARE the
array's C-order values, and our inner chunks hold whole rows, so a run of rows is one contiguous byte
range: `os.preadv` puts it straight into the caller's array, without the GIL and without a copy.
Anything else (compression, another layout, a big-endian machine, an object store) returns None from
`RawShardArray.open`, and the caller reads through zarr. The format stays plain Zarr v3: this module
only reads it.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

EMPTY = 2**64 - 1
_LITTLE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_DTYPES = {"float16": np.float16, "float32": np.float32}
_pool: ThreadPoolExecutor | None = None


def read_threads() -> int:
    """Threads that read shards in the background: PROTOQUANT_READ_THREADS, else 4 (reads wait on the disk
    or on memory copies, not on Python, so a few more than the cores keep a disk queue full)."""
    try:
        return max(1, int(os.environ.get("PROTOQUANT_READ_THREADS", "4")))
    except ValueError:
        return 4


def read_pool() -> ThreadPoolExecutor:
    """The process's one pool of reader threads, made on first use."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=read_threads(), thread_name_prefix="protoquant-read")
    return _pool


@dataclass(frozen=True)
class RawShardArray:
    """A sharded array on local disk whose shards can be read as raw bytes."""

    folder: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int        # rows per inner chunk
    shard_rows: int        # rows per shard (a multiple of chunk_rows)
    index_at_end: bool
    separator: str

    @classmethod
    def open(cls, folder: Path) -> "RawShardArray | None":
        """The raw reader of the array stored in `folder`, or None when its layout is not plain."""
        try:
            meta = json.loads((Path(folder) / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        return cls._from_metadata(Path(folder), meta) if sys.byteorder == "little" else None

    @classmethod
    def _from_metadata(cls, folder: Path, meta: dict) -> "RawShardArray | None":
        try:
            shape = tuple(int(s) for s in meta["shape"])
            grid = meta["chunk_grid"]
            keys = meta["chunk_key_encoding"]
            (codec,) = meta["codecs"]
            config = codec["configuration"]
            inner = tuple(int(s) for s in config["chunk_shape"])
            outer = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
            index_codecs = [c for c in config["index_codecs"]]
        except (KeyError, TypeError, ValueError):
            return None
        plain = (
            meta.get("zarr_format") == 3 and meta.get("data_type") in _DTYPES and not meta.get("storage_transformers")
            and grid.get("name") == "regular" and keys.get("name") == "default"
            and codec.get("name") == "sharding_indexed" and config.get("codecs") == [_LITTLE_BYTES]
            and [c.get("name") for c in index_codecs] == ["bytes", "crc32c"] and index_codecs[0] == _LITTLE_BYTES
            and config.get("index_location", "end") in ("end", "start")
            and len(shape) >= 1 and inner[1:] == shape[1:] and outer[1:] == shape[1:]
            and inner[0] > 0 and outer[0] % inner[0] == 0
        )
        if not plain:
            return None
        return cls(folder, shape, np.dtype(_DTYPES[meta["data_type"]]), inner[0], outer[0],
                   config.get("index_location", "end") == "end", keys.get("configuration", {}).get("separator", "/"))

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def shard_path(self, shard: int) -> Path:
        parts = ["c", str(shard), *["0"] * (len(self.shape) - 1)]
        return self.folder / self.separator.join(parts) if self.separator != "/" else self.folder.joinpath(*parts)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, shape (stop - start, *shape[1:])) with rows [start, stop)."""
        if out.shape != (stop - start, *self.shape[1:]) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"internal: a raw read of rows {start}..{stop} needs a C-contiguous {self.dtype} buffer")
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1 if stop > start else 0):
            lo, hi = max(start, shard * self.shard_rows), min(stop, (shard + 1) * self.shard_rows)
            self._read_shard_rows(shard, lo, hi, out[lo - start:hi - start])

    def read_rows_into(self, start: int, stop: int, targets: list[np.ndarray]) -> None:
        """Row start + i into targets[i] (each C-contiguous, one row's shape), e.g. rows of a shuffled buffer:
        one scattering preadv per contiguous run, so no byte is copied twice."""
        if len(targets) != stop - start or any(t.shape != self.shape[1:] or t.dtype != self.dtype or not t.flags.c_contiguous
                                               for t in targets):
            raise ValueError(f"internal: a scattered read of rows {start}..{stop} needs one C-contiguous {self.dtype} row each")
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1 if stop > start else 0):
            lo, hi = max(start, shard * self.shard_rows), min(stop, (shard + 1) * self.shard_rows)
            self._scatter_shard_rows(shard, lo, hi, targets[lo - start:hi - start])

    def _scatter_shard_rows(self, shard: int, lo: int, hi: int, targets: list[np.ndarray]) -> None:
        try:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            for target in targets:
                target[...] = np.nan
            return
        try:
            size = os.fstat(fd).st_size
            for file_offset, first, last in self._runs(shard, self._index(fd, size), lo, hi, size):
                views = [memoryview(t).cast("B") for t in targets[first - lo:last - lo]]
                if file_offset is None:
                    for target in targets[first - lo:last - lo]:
                        target[...] = np.nan
                else:
                    _preadv_exact(fd, views, file_offset)
        finally:
            os.close(fd)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self.read_into(start, stop, out)
        return out

    def read_index(self, shard: int) -> np.ndarray | None:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) of the shard's inner chunks; None when it has no file."""
        try:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return self._index(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _read_shard_rows(self, shard: int, lo: int, hi: int, out: np.ndarray) -> None:
        try:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            out[...] = np.nan  # zarr's reading of a shard never written: its fill value
            return
        try:
            size = os.fstat(fd).st_size
            index = self._index(fd, size)
            for file_offset, first, last in self._runs(shard, index, lo, hi, size):
                if file_offset is None:
                    out[first - lo:last - lo] = np.nan
                else:
                    _pread_exact(fd, memoryview(out[first - lo:last - lo]).cast("B"), file_offset)
        finally:
            os.close(fd)

    def _index(self, fd: int, size: int) -> np.ndarray:
        if size < self.index_nbytes:
            raise ValueError(f"shard file is {size} bytes, shorter than its {self.index_nbytes}-byte index")
        raw = bytearray(self.index_nbytes)
        _pread_exact(fd, memoryview(raw), size - self.index_nbytes if self.index_at_end else 0)
        body, stored = bytes(raw[:-4]), bytes(raw[-4:])
        if np.uint32(google_crc32c.value(body)).tobytes() != stored:
            raise ValueError("shard index checksum does not match (a damaged shard file)")
        return np.frombuffer(body, dtype="<u8").reshape(self.chunks_per_shard, 2)

    def _runs(self, shard: int, index: np.ndarray, lo: int, hi: int, size: int):
        """(file offset or None for an empty chunk, first row, stop row) per contiguous run of rows [lo, hi),
        neighbouring chunks that lie back to back in the file merged into one run."""
        base, r, row_bytes = shard * self.shard_rows, self.chunk_rows, self.row_bytes
        data_start, data_end = (0, size - self.index_nbytes) if self.index_at_end else (self.index_nbytes, size)
        runs: list[list] = []
        for chunk in range((lo - base) // r, (hi - 1 - base) // r + 1):
            offset, nbytes = (int(v) for v in index[chunk])
            first, last = max(lo, base + chunk * r), min(hi, base + (chunk + 1) * r)
            if offset == EMPTY and nbytes == EMPTY:
                at = None
            elif nbytes != r * row_bytes or offset < data_start or offset + nbytes > data_end:
                raise ValueError(f"inner chunk {chunk} lies outside the shard file or has a wrong size "
                                 f"({nbytes} bytes at {offset}, file of {size})")
            else:
                at = offset + (first - base - chunk * r) * row_bytes
            previous = runs[-1] if runs else None
            if previous and previous[0] is not None and at is not None and previous[0] + (previous[2] - previous[1]) * row_bytes == at:
                previous[2] = last
            elif previous and previous[0] is None and at is None:
                previous[2] = last
            else:
                runs.append([at, first, last])
        return [tuple(run) for run in runs]


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Read len(view) bytes at `offset` into `view` (a read may return less than asked: loop)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"shard file ends at byte {offset + done}, before the {len(view)} bytes its index promises")
        done += got


def _preadv_exact(fd: int, views: list[memoryview], offset: int, per_call: int = 512) -> None:
    """Fill the views one after the other from the bytes at `offset`: a scattering read of at most
    `per_call` buffers a call (the system's limit is 1024); after a short read, the rest view by view."""
    for first in range(0, len(views), per_call):
        group = views[first:first + per_call]
        got = os.preadv(fd, group, offset)
        for view in group:
            if got >= len(view):
                got -= len(view)
            else:
                _pread_exact(fd, view[got:], offset + got)
                got = 0
            offset += len(view)
