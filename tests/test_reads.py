"""The cache's fast read path: raw shard-file reads agree with zarr's own byte for byte, refuse damage, and
streaming keeps memory flat in N (a small run of bench/scale.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache import Cache, SplitPlan, create_cache, nonfinite_in, nonfinite_rows, write_shard
from pipeline.data import FeatureSource, SourceSettings
from pipeline.errors import ProtoquantError
from pipeline.rawshards import RawShardArray

ROOT = Path(__file__).resolve().parents[1]


def _sharded(path: Path, shape, chunk_rows: int, shard_rows: int, *, index_location: str = "end", **extra) -> zarr.Array:
    return zarr.create_array(str(path), shape=shape, chunks=(chunk_rows, *shape[1:]), dtype="float16", fill_value=np.nan,
                             shards={"shape": (shard_rows, *shape[1:]), "index_location": index_location}, **extra)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("index_location", ["end", "start"])
def test_raw_reads_equal_zarr_reads_byte_for_byte(tmp_path, index_location):
    shape = (45, 2, 3, 5, 4)  # 5-d like the views array; the last shard is partial
    array = _sharded(tmp_path / "a", shape, 4, 12, index_location=index_location, compressors=None)
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    values[7, 1, 2, 3, 0] = np.inf
    array.with_config({"write_empty_chunks": True})[:24] = values[:24]  # shards 0-1 whole
    array[30:45] = values[30:45]  # shard 2 gets inner chunks 8 (rows 32-35)... partly, shard 3 whole
    array[32:36] = np.nan  # an all-fill inner chunk: zarr drops it from the shard (an empty index entry)
    raw = RawShardArray.open(tmp_path / "a")
    assert raw is not None and raw.index_at_end == (index_location == "end")
    index = raw.read_index(2)
    assert (index[0] == 2**64 - 1).all() and (index[2] == 2**64 - 1).all()  # rows 24-27 never written, 32-35 fill
    for start, stop in [(0, 45), (0, 1), (5, 17), (11, 13), (23, 37), (44, 45), (30, 31)]:
        assert _bits(raw.read(start, stop)) == _bits(array[start:stop]), (start, stop)
    shuffled = np.empty(shape, dtype=np.float16)  # the streaming path: each row read straight into a shuffled place
    order = np.random.default_rng(1).permutation(45)
    raw.read_rows_into(0, 45, [shuffled[i] for i in order])
    assert _bits(shuffled[order]) == _bits(array[:])
    (tmp_path / "a" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # a shard never written reads as fill
    assert _bits(raw.read(10, 26)) == _bits(array[10:26])
    assert np.isnan(raw.read(12, 24)).all() and _bits(raw.read(0, 12)) == _bits(values[:12])


def test_layouts_that_are_not_plain_shards_read_through_zarr(tmp_path):
    compressed = _sharded(tmp_path / "zstd", (8, 4), 2, 4, compressors=zarr.codecs.ZstdCodec())
    unsharded = zarr.create_array(str(tmp_path / "plain"), shape=(8, 4), chunks=(2, 4), dtype="float16", compressors=None)
    compressed[:], unsharded[:] = np.ones((8, 4)), np.ones((8, 4))
    assert RawShardArray.open(tmp_path / "zstd") is None
    assert RawShardArray.open(tmp_path / "plain") is None
    assert RawShardArray.open(tmp_path / "missing") is None


def _cache(path: Path, n: int = 40, rows_per_shard: int = 16) -> np.ndarray:
    rng = np.random.default_rng(1)
    plan = SplitPlan(ids=[f"i{i}" for i in range(n)], labels=(np.arange(n) % 3).astype(np.int32))
    cache = create_cache(path, settings={"t": 1}, attrs={"classes": ["a", "b", "c"]}, splits={"train": plan},
                         grid=(2, 2), dim=8, rows_per_shard=rows_per_shard)
    split = cache.split("train")
    values = rng.standard_normal((n, 2, 2, 8)).astype(np.float16)
    for shard in range(split.layout.n_shards):
        rows = split.layout.shard_rows(shard)
        write_shard(split.group, split.directory, shard, rows, {
            "features": values[rows.start:rows.stop], "ok": np.ones(len(rows), np.uint8),
            "image_size": np.full((len(rows), 2), 8, np.int32)})
    return values


def test_cache_reads_match_zarr_whole_in_blocks_and_streamed(tmp_path, monkeypatch):
    values = _cache(tmp_path / "c")
    split = Cache(tmp_path / "c").split("train")
    assert split.raw_reader("features") is not None
    assert _bits(split.load()) == _bits(values) == _bits(split.features[:])
    blocks = list(split.iter_blocks(prefetch=3))
    assert [start for start, _ in blocks] == list(range(0, 40, split.layout.rows_per_chunk))
    assert _bits(np.concatenate([b for _, b in blocks])) == _bits(values)
    rows = np.arange(3, 37)
    source = FeatureSource(split, rows, SourceSettings(batch_size=5, shuffle=True, seed=2, buffer_chunks=2))
    streamed = list(source.batches(0))
    assert [len(f) for f, _ in streamed[:-1]] == [5] * (len(streamed) - 1)
    got = np.concatenate([f.numpy() for f, _ in streamed])
    assert sorted(map(bytes, got.astype(np.float16).reshape(len(got), -1))) == sorted(map(bytes, values[rows].reshape(len(rows), -1)))
    monkeypatch.setenv("PROTOQUANT_RAW_READS", "0")  # the zarr path gives the very same batches
    through_zarr = Cache(tmp_path / "c").split("train")
    assert through_zarr.raw_reader("features") is None
    again = list(FeatureSource(through_zarr, rows, SourceSettings(batch_size=5, shuffle=True, seed=2, buffer_chunks=2)).batches(0))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(streamed, again))


def test_a_damaged_shard_index_is_refused_by_name(tmp_path):
    _cache(tmp_path / "c")
    shard = tmp_path / "c" / "train" / "features" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0xFF  # inside the index: its checksum no longer matches
    shard.write_bytes(bytes(data))
    split = Cache(tmp_path / "c").split("train")
    with pytest.raises(ProtoquantError, match=r"cannot read features of the train split \(.*features/c/1/0/0/0\).*checksum"):
        split.read_features(16, 20)
    with pytest.raises((ValueError, RuntimeError), match="checksum"):
        split.features[16:20]  # zarr refuses it too (zarr-python: ValueError, zarrs: RuntimeError)
    assert _bits(split.read_features(0, 16)) == _bits(split.features[0:16])  # the other shards still read


def test_nonfinite_rows_finds_every_nan_and_infinity():
    grid = np.random.default_rng(0).standard_normal((200, 3, 5)).astype(np.float16)
    specials = [np.nan, np.inf, -np.inf, 65504.0, -65504.0, 6e-8, -0.0]
    for row, value in enumerate(specials):
        grid[row * 20 + 3, row % 3, row % 5] = value
    expected = ~np.isfinite(grid.reshape(200, -1)).all(axis=1)
    assert expected.sum() == 3
    np.testing.assert_array_equal(nonfinite_rows(grid, rows_per_pass=7), expected)
    np.testing.assert_array_equal(nonfinite_rows(grid.astype(np.float32)), expected)
    np.testing.assert_array_equal(nonfinite_in(list(grid[::-1])), expected[::-1])  # rows scattered in a buffer
    np.testing.assert_array_equal(nonfinite_in(list(grid.astype(np.float32))), expected)


def test_streaming_memory_stays_flat_in_n(tmp_path):
    """bench/scale.py at two sizes 8x apart (reads only): peak RSS grows by far less than the store does."""
    command = [sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "2048,16384", "--grid", "4", "--dim", "256",
               "--max-memory", "4MB", "--buffer-chunks", "2", "--no-head", "--dir", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    small, big = json.loads(done.stdout.strip().splitlines()[-1])
    assert big["store_bytes"] - small["store_bytes"] > 110e6
    assert big["peak_rss"] - small["peak_rss"] < 0.25 * (big["store_bytes"] - small["store_bytes"])
    assert small["source_units"] == small["train_rows"] and big["source_units"] == big["train_rows"]  # every row streamed
    assert not list(tmp_path.iterdir())  # the generated caches are deleted


def test_zarrs_pipeline_reads_the_same_values_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("zarrs")
    values = _cache(tmp_path / "c")
    monkeypatch.setenv("PROTOQUANT_RAW_READS", "0")
    split = Cache(tmp_path / "c").split("train")
    assert "zarrs" in type(split.features._async_array.codec_pipeline).__module__
    assert _bits(split.load()) == _bits(values)


def test_scattering_reads_fill_many_buffers_across_calls(tmp_path):
    from pipeline.rawshards import _preadv_exact

    data = np.arange(1000, dtype=np.uint16).astype(np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    outs = [bytearray(7) for _ in range(100)]
    with open(tmp_path / "f", "rb") as fh:
        _preadv_exact(fh.fileno(), [memoryview(o) for o in outs], 5, per_call=3)  # 34 calls of 3 buffers
        assert b"".join(outs) == data[5:705].tobytes()
        with pytest.raises(ValueError, match="ends at byte 1000"):
            _preadv_exact(fh.fileno(), [memoryview(bytearray(8)) for _ in range(3)], 990)


def test_a_block_is_checked_once_while_its_shard_file_is_unchanged(tmp_path, monkeypatch):
    """A later epoch's read of the same block skips the finiteness pass; a file rewritten in place
    (its mtime moves) is checked again, so a NaN written into a marked row is still refused."""
    import pipeline.cache as cache_module

    _cache(tmp_path / "c")
    split = Cache(tmp_path / "c").split("train")
    r = split.layout.rows_per_chunk
    passes = []  # rows each check pass looked at: the block read's and the streaming read's
    by_block, by_row = cache_module.nonfinite_rows, cache_module.nonfinite_in
    monkeypatch.setattr(cache_module, "nonfinite_rows", lambda block, **kw: passes.append(len(block)) or by_block(block, **kw))
    monkeypatch.setattr(cache_module, "nonfinite_in", lambda rows: passes.append(len(rows)) or by_row(rows))
    first = split.read_features(0, r)
    assert _bits(split.read_features(0, r)) == _bits(first) and passes == [r]
    buffer = np.empty((r, 2, 2, 8), np.float16)
    split.read_features_scattered(0, r, buffer, np.arange(r)[::-1].copy())  # the streaming read: same block, same files
    assert passes == [r] and _bits(buffer[::-1]) == _bits(first)
    split.read_features(r, 2 * r)
    assert passes == [r, r]  # another block is checked

    shard = split.shard_file("features", 0)
    offset = int(split.raw_reader("features").read_index(0)[0, 0])
    before = shard.stat()
    with open(shard, "r+b") as fh:  # rewritten in place (zarr itself writes a new file and renames it: below)
        fh.seek(offset + 3 * 2 * 2 * 8 * 2)
        fh.write(np.full(2 * 2 * 8, np.nan, np.float16).tobytes())
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a coarse clock may not have moved
    with pytest.raises(ProtoquantError, match=r"rows 3\) are marked extracted but read as NaN"):
        split.read_features(0, r)
    with pytest.raises(ProtoquantError, match=r"rows 3\) are marked extracted but read as NaN"):
        split.read_features_scattered(0, r, buffer, np.arange(r))


def test_a_block_of_another_layout_is_checked_on_every_read(tmp_path):
    """Features re-stored in plain 4-row chunks (no shards) read through zarr, whose files the shard layout does
    not name: nothing is remembered, so a NaN written after a first read is refused on the next."""
    values = _cache(tmp_path / "c", n=32)
    group = zarr.open_group(str(tmp_path / "c" / "train"), mode="a")
    del group["features"], group["nbytes"], group["checksum"]  # as a cache written before sizes were recorded
    array = group.create_array("features", shape=values.shape, dtype="float16", chunks=(4, 2, 2, 8), fill_value=np.nan,
                               compressors=None)
    array[:] = values
    split = Cache(tmp_path / "c").split("train")
    assert split.raw_reader("features") is None
    assert _bits(split.read_features(0, 16)) == _bits(values[:16])
    array[4:8] = np.nan
    with pytest.raises(ProtoquantError, match=r"rows 4, 5, 6, 7\) are marked extracted but read as NaN"):
        split.read_features(0, 16)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_shard_replaced_during_a_read_is_checked(tmp_path, monkeypatch, streaming):
    """zarr rewrites a shard as a new file renamed over the old one: when that lands between the files'
    identity (taken before the read) and the read itself, the block read from the new file is checked."""
    values = _cache(tmp_path / "c")
    split = Cache(tmp_path / "c").split("train")
    r = split.layout.rows_per_chunk
    buffer = np.empty((r, 2, 2, 8), np.float16)
    read = (lambda: split.read_features_scattered(0, r, buffer, np.arange(r))) if streaming else (lambda: split.read_features(0, r))
    read()  # checked, remembered
    name = "read_rows_into" if streaming else "read_into"
    original = getattr(RawShardArray, name)

    def rewritten_first(self, *args):
        bad = values[:16].copy()
        bad[3] = np.nan
        zarr.open_group(str(tmp_path / "c" / "train"), mode="a")["features"][0:16] = bad
        monkeypatch.setattr(RawShardArray, name, original)
        return original(self, *args)

    monkeypatch.setattr(RawShardArray, name, rewritten_first)
    with pytest.raises(ProtoquantError, match=r"rows 3\) are marked extracted but read as NaN"):
        read()
