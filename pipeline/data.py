"""Cache -> training batches: which rows to use, RAM or streaming, and shuffled batches of grids.

    usable_rows          rows of a split that hold features (skipped bad files never train or score)
    carve_validation     a seeded, stratified validation subset of the training rows (METHOD.md pitfall 2)
    parse_memory         "2GB" / "512MiB" / "auto" -> bytes, for --max-memory (format_bytes: back, for messages)
    RamRows              the chosen rows (and their augmented views) loaded once into one array
    FeatureSource        shuffled (features float32 (B, H, W, D), labels int64 (B,)) batches

Two read paths give the same batches up to order (tech-stack notes 2.9):
- RAM: every requested row is loaded once into a pre-allocated float16 array; each epoch is a
  random permutation of those rows.
- streaming: each epoch permutes the split's inner chunks and reads them whole; a shuffle buffer
  of `buffer_chunks` chunks mixes rows across chunks. Rows were permuted once at extraction, so a
  chunk is already a random sample and this is close to i.i.d. sampling. The next buffer is read
  in the background (pipeline/rawshards.py's reader threads) while this one is batched, so memory
  holds two buffers whatever N is (bench/scale.py measures it).
Both are deterministic: the same seed and epoch give the same order within a path. When the split
holds augmented views, each epoch draws one of (original, view 1..V) per row from (seed, epoch),
the same draw on both paths (METHOD.md pitfall 5: never one baked-in augmentation).

Under torchrun each rank takes a disjoint slice of the epoch's permutation (of rows in RAM, of
chunks when streaming), and `steps` is the same on every rank so collective calls stay in step.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.cache import CacheSplit
from pipeline.errors import ProtoquantError
from pipeline.rawshards import read_pool

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'2GB' -> 2e9, '512MiB' -> 536870912, '0' -> 0 (always stream), 'auto' -> half the available RAM."""
    value = str(text).strip().lower().replace(" ", "")
    if value == "auto":
        return available_memory() // 2
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise ProtoquantError(f"--max-memory {text!r} is not a size: write e.g. 2GB, 512MiB, 0 (always stream) or auto")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(nbytes: float) -> str:
    """parse_memory's inverse for messages, in its decimal units: 3.2 GB, 450.0 MB, 200.0 KB."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (4 GB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


def usable_rows(split: CacheSplit) -> np.ndarray:
    """Indices of the rows that hold features; rows of skipped bad files (ok == False) are left out."""
    return np.flatnonzero(split.ok)


def carve_validation(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (train, val), stratified by class, deterministic in (rows, labels, fraction, seed).

    labels holds the label of every row of the split (indexed by row). Each class gives
    round(fraction * its count) rows to validation (at least one when it has two or more), so a
    validation split exists for model selection even on tiny data. Both results are sorted.
    """
    if not 0 <= fraction < 1:
        raise ProtoquantError(f"--val-fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0x5EED])
    val = []
    for label in np.unique(labels[rows]):
        members = rows[labels[rows] == label]
        take = int(round(fraction * len(members)))
        if fraction > 0 and take == 0 and len(members) >= 2:
            take = 1
        val.append(rng.permutation(members)[:take])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    train_rows = np.setdiff1d(rows, val_rows)
    return train_rows.astype(np.int64), val_rows.astype(np.int64)


def rows_nbytes(split: CacheSplit, n_rows: int, with_views: bool) -> int:
    """Bytes that `n_rows` rows take in RAM (float16), with their views when asked."""
    per_row = split.nbytes // max(split.n, 1)
    return n_rows * per_row * (1 + (view_count(split) if with_views else 0))


def view_count(split: CacheSplit) -> int:
    """How many augmented views per row the split holds (0 when none)."""
    return 0 if split.views is None else int(split.views.shape[1])


def view_choices(n: int, n_views: int, seed: int, epoch: int) -> np.ndarray:
    """Per row of the split, which grid this epoch uses: 0 = original, v = augmented view v; (n,) int."""
    if n_views == 0:
        return np.zeros(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0xA06]).integers(0, n_views + 1, size=n)


def _chunk_reads(split: CacheSplit, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, selected rows) for each inner chunk that holds some of `rows` (sorted)."""
    r = split.layout.rows_per_chunk
    for chunk in np.unique(rows // r):
        start, stop = int(chunk) * r, min(int(chunk) * r + r, split.n)
        yield start, stop, rows[np.searchsorted(rows, start):np.searchsorted(rows, stop)]


def _read_rows(split: CacheSplit, start: int, stop: int, selected: np.ndarray, with_views: bool) -> np.ndarray:
    """Rows `selected` (within [start, stop)) as float16 (n, H, W, D), or (n, 1 + V, H, W, D) with views."""
    features = split.read_features(start, stop)  # (n, H, W, D); a damaged or lost shard is one named error
    at = selected - start
    if len(selected) < stop - start:
        features = features[at]
    if not with_views:
        return features
    views = split.read_views(start, stop)[at]  # (n, V, H, W, D)
    return np.concatenate([features[:, None], views], axis=1)  # (n, 1 + V, H, W, D)


def _read_rows_into(split: CacheSplit, start: int, stop: int, selected: np.ndarray, with_views: bool, out: np.ndarray) -> None:
    """_read_rows into `out`; a chunk wanted whole (and without views) is read straight into it."""
    if not with_views and len(selected) == stop - start:
        split.read_features(start, stop, out=out)
    else:
        out[...] = _read_rows(split, start, stop, selected, with_views)


@dataclass
class RamRows:
    """Chosen rows of one split held in RAM: grids (n, H, W, D), or (n, 1 + V, H, W, D) with views."""

    rows: np.ndarray          # (n,) sorted split row indices
    grids: torch.Tensor       # float16
    with_views: bool

    @classmethod
    def load(cls, split: CacheSplit, rows: np.ndarray, *, with_views: bool = False) -> "RamRows":
        """Read whole chunks once, in the reader threads, into one pre-allocated array of the requested rows."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        h, w, d = split.features.shape[1:]
        shape = (len(rows), 1 + view_count(split), h, w, d) if with_views else (len(rows), h, w, d)
        grids = np.empty(shape, dtype=np.float16)
        futures, filled = [], 0
        split.ok  # read the marks once, before the reader threads need them
        for start, stop, selected in _chunk_reads(split, rows):
            place = grids[filled:filled + len(selected)]
            futures.append(read_pool().submit(_read_rows_into, split, start, stop, selected, with_views, place))
            filled += len(selected)
        for future in futures:
            future.result()  # a damaged chunk raises its one named error here
        return cls(rows=rows, grids=torch.from_numpy(grids), with_views=with_views)

    def move_to_gpu_if_it_fits(self, device: torch.device, reserve: int = 2 << 30) -> bool:
        """Keep the grids in GPU memory when they fit with `reserve` bytes to spare: batches then need no copy."""
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        if self.grids.numel() * self.grids.element_size() > free - reserve:
            return False
        self.grids = self.grids.to(device)
        return True

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each split row sits in `grids`; every row must have been loaded."""
        at = np.searchsorted(self.rows, rows)
        if len(rows) and (at.max() >= len(self.rows) or not np.array_equal(self.rows[at], rows)):
            raise ProtoquantError("internal: asked RamRows for rows it did not load")
        return at


@dataclass(frozen=True)
class SourceSettings:
    """How batches are drawn. `views` uses the split's augmented views (training only)."""

    batch_size: int = 128
    shuffle: bool = True
    views: bool = False
    seed: int = 0
    buffer_chunks: int = 8
    half: bool = False        # batches stay float16: the device converts (half the bytes to move)


class FeatureSource:
    """Batches (features float32 (B, H, W, D), labels int64 (B,)) over given rows of one split.

    Pass `ram` (a RamRows holding these rows) to read from RAM; leave it None to stream from the
    cache. rank/world give this process's disjoint share under torchrun.
    """

    def __init__(self, split: CacheSplit, rows: np.ndarray, settings: SourceSettings, *,
                 ram: RamRows | None = None, rank: int = 0, world: int = 1):
        self.split = split
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.settings = settings
        self.ram = ram
        self.rank, self.world = rank, world
        self.labels = torch.from_numpy(split.labels.astype(np.int64))  # (N,) every row of the split
        self.n_views = view_count(split) if settings.views else 0
        if settings.views and ram is not None and not ram.with_views:
            raise ProtoquantError("internal: a source with views needs RamRows loaded with_views=True")
        self._ram_at = ram.positions(self.rows) if ram is not None else None
        r = split.layout.rows_per_chunk
        self._chunks, self._chunk_sizes = np.unique(self.rows // r, return_counts=True)  # chunks holding requested rows

    def __len__(self) -> int:
        return len(self.rows)

    # --- the epoch's plan: which rows (RAM) or chunks (streaming) this rank reads, in which order ---

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.settings.seed, epoch, 0xDA7A])

    def _ram_order(self, epoch: int) -> np.ndarray:
        """Positions into self.rows for this rank; equal length on every rank when shuffling."""
        order = self._rng(epoch).permutation(len(self.rows)) if self.settings.shuffle else np.arange(len(self.rows))
        if self.settings.shuffle and self.world > 1:
            order = order[:len(order) - len(order) % self.world]  # equal shares keep ranks in step
        return order[self.rank::self.world]

    def _chunk_order(self, epoch: int) -> np.ndarray:
        """Indices into self._chunks for this rank."""
        n = len(self._chunks)
        order = self._rng(epoch).permutation(n) if self.settings.shuffle else np.arange(n)
        return order[self.rank::self.world]

    def steps(self, epoch: int) -> int:
        """Batches this rank yields in `epoch`; with shuffling under torchrun, the minimum over ranks."""
        b = self.settings.batch_size
        if self.ram is not None:
            return math.ceil(len(self._ram_order(epoch)) / b)
        if not self.settings.shuffle or self.world == 1:
            return math.ceil(int(self._chunk_sizes[self._chunk_order(epoch)].sum()) / b)
        order = self._rng(epoch).permutation(len(self._chunks))
        return min(math.ceil(int(self._chunk_sizes[order[r::self.world]].sum()) / b) for r in range(self.world))

    def batches(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's batches for `epoch`: exactly steps(epoch) of them."""
        choices = view_choices(self.split.n, self.n_views, self.settings.seed, epoch)  # (N,)
        source = self._ram_batches(epoch, choices) if self.ram is not None else self._stream_batches(epoch, choices)
        for _, batch in zip(range(self.steps(epoch)), source):
            yield batch

    def _ram_batches(self, epoch: int, choices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._ram_order(epoch)
        for start in range(0, len(order), self.settings.batch_size):
            picked = order[start:start + self.settings.batch_size]
            where = self.ram.grids.device  # the CPU, or the GPU when the rows were moved there
            at = torch.from_numpy(self._ram_at[picked]).to(where)  # (B,) into ram.grids
            rows = self.rows[picked]
            if self.ram.with_views:
                view = torch.from_numpy(choices[rows]) if self.n_views else torch.zeros(len(rows), dtype=torch.long)
                grids = self.ram.grids[at, view.to(where)]  # (n, 1 + V, H, W, D) -> (B, H, W, D)
            else:
                grids = self.ram.grids[at]  # (B, H, W, D)
            yield (grids if self.settings.half else grids.float()), self.labels[torch.from_numpy(rows)]

    def _stream_batches(self, epoch: int, choices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Read whole chunks in the epoch's order; shuffle rows within a buffer of chunks.

        A buffer holds the previous buffer's rest (under one batch) and its chunks' rows, permuted. The
        permutation is drawn when the buffer's reads start, so the reader threads put every row straight
        into its shuffled place and a batch is a slice of the buffer, not a copy. The next buffer is read
        in the background while this one is cut into batches: memory holds two buffers, whatever N.
        """
        rng = self._rng(epoch + 1_000_003)  # separate stream from the chunk permutation
        b, per_buffer = self.settings.batch_size, self.settings.buffer_chunks
        order = self._chunk_order(epoch)
        groups = [self._chunks[order[first:first + per_buffer]] for first in range(0, len(order), per_buffer)]
        pending: deque = deque()
        carry_grids, carry_rows, carry_next = None, np.empty(0, dtype=np.int64), 0
        for index in range(len(groups)):
            while len(pending) < 2 and index + len(pending) < len(groups):
                buffer = self._read_buffer(groups[index + len(pending)], choices, carry_next, rng)
                carry_next = len(buffer[1]) % b
                pending.append(buffer)
            buffer, rows, place, futures = pending.popleft()
            for future in futures:
                future.result()  # a damaged chunk raises its one named error here
            if carry_grids is not None:
                buffer[place[:len(carry_rows)]] = carry_grids  # the previous buffer's rest, at its shuffled places
                rows[place[:len(carry_rows)]] = carry_rows
            full = len(rows) - len(rows) % b
            for start in range(0, full, b):
                yield self._as_batch(buffer[start:start + b], rows[start:start + b])
            carry_grids, carry_rows = buffer[full:].copy(), rows[full:]  # a copy: the buffer itself can go
        if len(carry_rows):
            yield self._as_batch(carry_grids, carry_rows)

    def _read_buffer(self, chunks: np.ndarray, choices: np.ndarray, carry: int, rng: np.random.Generator):
        """Start reading `chunks` into one new shuffled buffer that also takes `carry` rows of the previous
        one. Returns (buffer float16 (n, H, W, D), its rows (n,) with the carried ones still to fill, where
        each of the n unshuffled rows (carried first) goes, the reader tasks' futures)."""
        r = self.split.layout.rows_per_chunk
        spans = [(int(c) * r, min(int(c) * r + r, self.split.n)) for c in chunks]
        selected = [self.rows[np.searchsorted(self.rows, start):np.searchsorted(self.rows, stop)] for start, stop in spans]
        n = carry + sum(len(s) for s in selected)
        mix = rng.permutation(n) if self.settings.shuffle else np.arange(n)  # buffer[j] = unshuffled row mix[j]
        place = np.empty(n, dtype=np.int64)
        place[mix] = np.arange(n)  # unshuffled row k goes to buffer[place[k]]
        buffer = np.empty((n, *self.split.features.shape[1:]), dtype=np.float16)
        rows = np.empty(n, dtype=np.int64)
        self.split.ok  # read the marks once, before the reader threads need them
        futures, at = [], carry
        for (start, stop), wanted in zip(spans, selected):
            where = place[at:at + len(wanted)]
            rows[where] = wanted
            futures.append(read_pool().submit(self._read_chunk_into, start, stop, wanted, choices, buffer, where))
            at += len(wanted)
        return buffer, rows, place, futures

    def _read_chunk_into(self, start: int, stop: int, rows: np.ndarray, choices: np.ndarray,
                         buffer: np.ndarray, where: np.ndarray) -> None:
        """Rows `rows` of the chunk [start, stop) (this epoch's view of each, with views) into buffer[where]."""
        if not self.n_views and len(rows) == stop - start:
            self.split.read_features_scattered(start, stop, buffer, where)  # every row wanted: no copy in between
            return
        grids = _read_rows(self.split, start, stop, rows, self.n_views > 0)
        buffer[where] = grids[np.arange(len(rows)), choices[rows]] if self.n_views else grids  # (n, 1 + V, ...) -> (n, H, W, D)

    def _as_batch(self, grids: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        grids = torch.from_numpy(grids)
        return (grids if self.settings.half else grids.float()), self.labels[torch.from_numpy(rows)]


@dataclass
class TrainingData:
    """The train split cut into training and validation sources, from RAM or streamed."""

    train: FeatureSource
    val: FeatureSource
    train_rows: np.ndarray
    val_rows: np.ndarray
    in_ram: bool
    views: int              # augmented views per row drawn from during training (0: none)
    ram: RamRows | None = None

    def scan(self, rows: np.ndarray, batch_size: int = 256) -> FeatureSource:
        """Original grids of `rows` in row order (no shuffle, no views), from RAM when loaded."""
        split, (rank, world) = self.train.split, (self.train.rank, self.train.world)
        return FeatureSource(split, rows, SourceSettings(batch_size, shuffle=False), ram=self.ram, rank=rank, world=world)


def open_training_data(split: CacheSplit, *, val_fraction: float, seed: int, batch_size: int, max_memory: int,
                       use_views: bool = True, rank: int = 0, world: int = 1) -> TrainingData:
    """Carve validation from the usable rows; load them into RAM when they fit max_memory, else stream.

    Training batches are shuffled and draw one view per row and epoch when the split holds views;
    validation batches are the original grids in row order.
    """
    rows = usable_rows(split)
    if len(rows) == 0:
        raise ProtoquantError(f"the {split.name} split holds no usable images (every file was skipped at extraction)")
    train_rows, val_rows = carve_validation(rows, split.labels, val_fraction, seed)
    with_views = use_views and view_count(split) > 0
    in_ram = rows_nbytes(split, len(rows), with_views) <= max_memory
    if in_ram:
        require_unaltered(split)  # a split small enough for RAM is cheap to re-hash: altered shards are named
    ram = RamRows.load(split, rows, with_views=with_views) if in_ram else None
    train = FeatureSource(split, train_rows, SourceSettings(batch_size, shuffle=True, views=with_views, seed=seed),
                          ram=ram, rank=rank, world=world)
    val = FeatureSource(split, val_rows, SourceSettings(batch_size, shuffle=False, seed=seed),
                        ram=ram, rank=rank, world=world)
    return TrainingData(train, val, train_rows, val_rows, in_ram, view_count(split) if with_views else 0, ram)


def evaluation_source(split: CacheSplit, *, batch_size: int, rows: np.ndarray | None = None,
                      verify: bool = False) -> FeatureSource:
    """Usable rows (or the given ones) of a split in row order, streamed chunk by chunk: for scoring.
    With `verify`, the split's shards are re-hashed against their checksums first (evaluate does this)."""
    if verify:
        require_unaltered(split)
    rows = usable_rows(split) if rows is None else rows
    return FeatureSource(split, rows, SourceSettings(batch_size, shuffle=False))


def require_unaltered(split: CacheSplit) -> None:
    """Re-hash the split's finished shards against the checksums written with them; one line naming the
    altered ones. Costs one extra read of the split (train does it when the split fits in RAM, evaluate
    for the split it scores; streamed training trusts sizes and finiteness, and `info --verify` re-hashes)."""
    problems = split.shard_problems(verify=True)
    if problems:
        shown = "; ".join(str(p) for p in problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ProtoquantError(f"the cache is damaged: {shown}; re-extract it (extract --overwrite redoes altered "
                              "shards) or see `protoquant info CACHE --verify`")
