"""The cache never loses or mixes data: --out refusals, resume against a changed dataset, shard checksums,
damaged stores named by every reader, the owner lock, shard planning, and worker errors as one line."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.cache import FORMAT, Cache, plan_shards
from pipeline.data import open_training_data
from pipeline.errors import ProtoquantError
from pipeline.paths import OwnerLock, check_output, remove_ours
from stages.extract import extract
from stages.info import describe
from tests.conftest import make_cub, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
FAST = dict(backbone="test_resnet", workers=0, batch_size=2, image_size=64, rows_per_shard=2)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def cached(tmp_path):
    """An ImageFolder (3 classes x 3 train / 2 test) and its cache with 2-row shards (5 train, 3 test)."""
    truth = make_imagefolder(tmp_path / "data")
    extract(truth.root, tmp_path / "c.zarr", **FAST)
    return truth, tmp_path / "c.zarr"


# ---- shard planning ----

def test_plan_shards_deals_unmarked_shards_disjointly_over_ranks():
    done = {"train": np.array([1, 0, 0, 1, 0], bool), "test": np.array([0, 0, 1], bool)}
    assert plan_shards(done) == {"train": [1, 2, 4], "test": [0, 1]}
    plans = [plan_shards(done, rank, 2) for rank in range(2)]
    assert plans == [{"train": [1, 4], "test": [1]}, {"train": [2], "test": [0]}]  # round-robin over all splits
    for world in (1, 2, 3, 7):
        dealt = [(s, p) for rank in range(world) for s, ps in plan_shards(done, rank, world).items() for p in ps]
        assert sorted(dealt) == sorted([("train", 1), ("train", 2), ("train", 4), ("test", 0), ("test", 1)])
        assert len(dealt) == len(set(dealt))
    assert plan_shards({"train": np.ones(4, bool)}, 1, 2) == {"train": []}
    with pytest.raises(ProtoquantError):
        plan_shards(done, 2, 2)


# ---- --out: nothing protoquant did not make is deleted (fault probe 3a, 3a', 3a'', 3c, 3c', 3c'', 3c''') ----

def _foreign_store(path: Path) -> None:
    zarr.open_group(str(path), mode="w").create_array("x", data=np.arange(4))
    (path / "NOTES.txt").write_text("mine")


def _zarr_array(path: Path) -> None:
    zarr.create_array(str(path), data=np.arange(4))


def _broken_metadata(path: Path) -> None:
    path.mkdir()
    (path / "zarr.json").write_text("{not json")
    (path / "keep.txt").write_text("mine")


def _user_folder(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("mine")
    (path / "sub" / "y").write_text("mine too")


def _older_cache(path: Path) -> None:
    zarr.open_group(str(path), mode="w").attrs.update({"format": FORMAT, "format_version": 0})
    (path / "train").mkdir()
    (path / "train" / "features.bin").write_bytes(b"old features")


def _a_file(path: Path) -> None:
    path.write_text("a user's file")


@pytest.mark.parametrize("make,found", [
    (_foreign_store, "a Zarr group that protoquant did not make"),
    (_zarr_array, "a Zarr array that protoquant did not make"),
    (_broken_metadata, "zarr.json is not valid Zarr metadata"),
    (_user_folder, "a non-empty folder that protoquant did not make"),
    (_older_cache, "an older-format protoquant feature cache (format version 0"),
    (_a_file, "a file"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_protoquant_did_not_make_is_refused_and_kept(tmp_path, make, found, overwrite):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 1, "test": 1})
    out = tmp_path / "out"
    make(out)
    before = _tree(out) if out.is_dir() else out.read_bytes()
    with pytest.raises(ProtoquantError) as err:
        extract(truth.root, out, overwrite=overwrite, **FAST)
    message = str(err.value)
    assert found in message and f"--out {out}" in message and "\n" not in message
    assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
    assert not (tmp_path / ".out.lock").exists()


def test_path_rule_is_generic_for_any_kind_of_output(tmp_path):
    def is_run(path: Path) -> bool:
        return (path / "config.json").is_file()

    rule = dict(is_ours=is_run, what="a run", overwrite=True, protected=[])
    assert check_output(tmp_path / "new", **rule) is False
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", **rule) is False
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert check_output(tmp_path / "run", **rule) is True
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ProtoquantError, match="--out .*user is a non-empty folder that protoquant did not make, not a run"):
        check_output(tmp_path / "user", **rule)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with pytest.raises(ProtoquantError, match="is a symbolic link"):
        check_output(tmp_path / "link", **rule)
    with pytest.raises(ProtoquantError, match="internal: refused to delete"):
        remove_ours(tmp_path / "user", is_run)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    remove_ours(tmp_path / "run", is_run)
    assert not (tmp_path / "run").exists()


def test_out_may_not_be_or_hold_the_dataset_or_the_current_folder(tmp_path, monkeypatch):
    truth = make_imagefolder(tmp_path / "box" / "data", per_class={"train": 1, "test": 1})
    images = _tree(truth.root)
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("mine")
    monkeypatch.chdir(work)
    cases = [(truth.root, "is or contains the input"), (tmp_path / "box", "is or contains the input"),
             (truth.root / "train" / "c.zarr", "lies inside the input"), (Path("."), f"is or contains {work}"),
             (tmp_path, f"is or contains {work}")]
    for out, why in cases:
        with pytest.raises(ProtoquantError, match=why):
            extract(truth.root, out, overwrite=True, **FAST)
    assert _tree(truth.root) == images and (work / "a.txt").read_text() == "mine"
    assert not (truth.root / "train" / "c.zarr").exists()


def test_overwrite_replaces_a_protoquant_cache_and_an_empty_folder_is_used(cached, tmp_path):
    truth, path = cached
    first = Cache(path).fingerprint
    extract(truth.root, path, overwrite=True, **{**FAST, "rows_per_shard": 4})
    assert Cache(path).split("train").layout.rows_per_shard == 4 and Cache(path).fingerprint != first
    (tmp_path / "empty").mkdir()
    extract(truth.root, tmp_path / "empty", **FAST)
    assert Cache(tmp_path / "empty").fingerprint == first


def test_object_store_urls_are_one_line(tmp_path):
    for url in ("s3://bucket/c.zarr", "gs://bucket/c.zarr"):
        with pytest.raises(ProtoquantError, match="is a URL; protoquant reads and writes local paths only"):
            Cache(url)
        with pytest.raises(ProtoquantError, match="--out s3:/bucket/c.zarr is a URL"):
            extract(tmp_path, Path("s3://bucket/c.zarr"), **FAST)  # typer hands the CLI a Path: one slash left


# ---- resume compares the dataset's ids and labels (fault probe 3d, 3d') ----

def test_resume_refuses_a_renamed_or_relabelled_dataset(cached):
    truth, path = cached
    split = zarr.open_group(str(path), mode="r+")["train"]
    split["done"][2:] = 0  # as if killed after two shards
    stored = Cache(path).split("train").ids
    (truth.root / "train/cat/img_001.jpg").rename(truth.root / "train/cat/img_009.jpg")
    with pytest.raises(ProtoquantError) as err:
        extract(truth.root, path, **FAST)
    row = int(np.flatnonzero(stored == "train/cat/img_001.jpg")[0])
    assert "another listing of the dataset" in str(err.value) and f"row {row}: train/cat/img_001.jpg" in str(err.value)
    (truth.root / "train/cat/img_009.jpg").rename(truth.root / "train/cat/img_001.jpg")
    (truth.root / "train/cat/img_001.jpg").rename(truth.root / "train/dog/img_009.jpg")  # to another class
    with pytest.raises(ProtoquantError, match=r"rows of the train split differ \(row \d+: train/\w+/img_\d+\.\w+ \(label \d\) is now"):
        extract(truth.root, path, **FAST)
    assert not Cache(path).split("train").is_complete()  # nothing was written on the changed dataset
    extract(truth.root, path, overwrite=True, **FAST)
    train = Cache(path).split("train")
    assert dict(zip(train.ids, train.labels))["train/dog/img_009.jpg"] == 1


# ---- checksums, fingerprints and damage (fault probe 3f, 3f', 3f'', 3f''', 3f5, 3f6, 4a') ----

def test_fingerprint_covers_the_pixels(tmp_path):
    a = make_imagefolder(tmp_path / "a", seed=0)
    b = make_imagefolder(tmp_path / "b", seed=1)  # the same names and labels, other pixels
    extract(a.root, tmp_path / "a.zarr", **FAST)
    extract(b.root, tmp_path / "b.zarr", **FAST)
    extract(a.root, tmp_path / "a2.zarr", **FAST)
    fa, fb = Cache(tmp_path / "a.zarr"), Cache(tmp_path / "b.zarr")
    assert list(fa.split("train").ids) == list(fb.split("train").ids)
    assert fa.fingerprint != fb.fingerprint
    assert fa.fingerprint == Cache(tmp_path / "a2.zarr").fingerprint  # the same pixels: the same cache


def test_verify_names_missing_truncated_and_altered_shards(cached):
    truth, path = cached
    assert describe(path, verify=True)["damaged"] == []
    (path / "train/features/c/1/0/0/0").unlink()
    with open(path / "test/features/c/0/0/0/0", "r+b") as fh:
        fh.truncate(100)
    altered = path / "train/features/c/3/0/0/0"
    data = bytearray(altered.read_bytes())
    data[10:12] = b"\x00\x3c"  # one float16 becomes 1.0: same size, valid shard, other content
    altered.write_bytes(bytes(data))

    cheap = describe(path)
    assert not cheap["complete"] and len(cheap["damaged"]) == 2  # missing and truncated need no reading
    full = describe(path, verify=True)["damaged"]
    assert len(full) == 3
    assert "train shard 1 (rows 2..3" in full[0] and "features file missing" in full[0]
    assert "train shard 3 (rows 6..7" in full[1] and "altered" in full[1]
    assert "test shard 0" in full[2] and "truncated" in full[2]

    result = CliRunner().invoke(app, ["info", str(path), "--verify"])
    assert result.exit_code == 2 and "damaged: 3 problems" in result.output
    assert "train shard 1" in result.output and "Traceback" not in result.output

    extract(truth.root, path, **FAST)  # resume redoes the missing and truncated shards, not the altered one
    left = describe(path, verify=True)["damaged"]
    assert len(left) == 1 and "train shard 3" in left[0] and "altered" in left[0]


def test_readers_refuse_a_damaged_cache_by_name(cached):
    truth, path = cached
    (path / "train/features/c/1/0/0/0").unlink()
    with pytest.raises(ProtoquantError, match=r"is damaged: train shard 1 \(rows 2\.\.3, .*train/features/c/1/0/0/0\)"):
        Cache(path).require_complete()  # what train, evaluate, codebook and prune run first
    split = Cache(path).split("train")
    with pytest.raises(ProtoquantError, match=r"damaged: train shard 1 \(rows 2\.\.3.*features file missing"):
        open_training_data(split, val_fraction=0.2, seed=0, batch_size=4, max_memory=1 << 30)  # RAM path: re-hashed
    with pytest.raises(ProtoquantError, match="read as NaN"):
        training = open_training_data(split, val_fraction=0.2, seed=0, batch_size=4, max_memory=0)  # streaming
        list(training.train.batches(0))

    with open(path / "test/features/c/0/0/0/0", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ProtoquantError, match=r"cannot read features of the test split \(.*test/features/c/0/0/0/0\)"):
        Cache(path).split("test").read_features(0, 2)


def test_nan_features_in_extracted_rows_stop_codebook_and_training(cached, tmp_path):
    _, path = cached
    row = int(np.flatnonzero(Cache(path).split("train").ok)[0])
    zarr.open_group(str(path), mode="r+")["train/features"][row] = np.nan  # same file size: passes the cheap check
    Cache(path).require_complete()
    runner = CliRunner()
    result = runner.invoke(app, ["codebook", str(path), "-k", "2", "--out", str(tmp_path / "cb.safetensors")])
    assert result.exit_code == 2 and f"rows {row}) are marked extracted but read as NaN" in result.output
    assert not (tmp_path / "cb.safetensors").exists()
    with pytest.raises(ProtoquantError, match=r"train shard 0 .*altered"):  # the RAM path re-hashes first
        open_training_data(Cache(path).split("train"), val_fraction=0.2, seed=0, batch_size=4, max_memory=1 << 30)
    with pytest.raises(ProtoquantError, match=f"rows {row}\\) are marked extracted"):  # streaming: the NaN check
        list(open_training_data(Cache(path).split("train"), val_fraction=0.2, seed=0, batch_size=4,
                                max_memory=0).train.batches(0))
    assert "altered" in describe(path, verify=True)["damaged"][0]


def test_lost_labels_or_marks_are_named_and_restored_by_resume(cached):
    truth, path = cached
    expected = Cache(path).split("test").labels
    (path / "test/labels/c/1").unlink()
    (path / "train/ok/c/2").unlink()
    with pytest.raises(ProtoquantError, match=r"2 rows of the test split \(rows 2, 3\) hold no valid label"):
        Cache(path).split("test").labels  # never read as class 0
    with pytest.raises(ProtoquantError, match=r"rows of the train split \(rows 4, 5\) belong to done shards but have no mark"):
        Cache(path).split("train").ok     # never read as skipped
    extract(truth.root, path, **FAST)
    np.testing.assert_array_equal(Cache(path).split("test").labels, expected)
    assert Cache(path).split("train").ok.all() and describe(path, verify=True)["damaged"] == []


def test_a_torn_unmarked_shard_is_rewritten_on_resume(cached):
    truth, path = cached
    expected = Cache(path).split("train").features[:]
    zarr.open_group(str(path), mode="r+")["train/done"][4] = 0        # killed while writing shard 4
    with open(path / "train/features/c/4/0/0/0", "r+b") as fh:
        fh.truncate(50)
    summary = extract(truth.root, path, **FAST)
    assert summary.resumed_shards == 7 and summary.images == 1
    np.testing.assert_array_equal(Cache(path).split("train").features[:], expected)


def test_a_cache_without_checksums_reads_but_does_not_resume(cached):
    truth, path = cached
    for split in ("train", "test"):  # as an older protoquant wrote it (the same format version)
        for array in ("checksum", "nbytes"):
            shutil.rmtree(path / split / array)
    cache = Cache(path)
    cache.require_complete()
    assert cache.split("train").recorded() is None and cache.split("train").shard_problems(verify=True) == []
    assert not describe(path)["splits"]["train"]["checksums"]
    with pytest.raises(ProtoquantError, match="recorded no shard checksums: pass --overwrite"):
        extract(truth.root, path, **FAST)
    extract(truth.root, path, overwrite=True, **FAST)
    assert Cache(path).split("train").recorded() is not None


def test_readers_open_the_store_read_only(cached):
    _, path = cached
    cache = Cache(path)
    with pytest.raises(ProtoquantError, match="read-only"):
        cache.update_attrs({"complete": False})
    with pytest.raises(ValueError, match="read-only"):
        cache.split("train").group["done"][0] = 0
    assert Cache(path).split("train").done().all()


# ---- one writer at a time (fault probe 3e) ----

def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 1, "test": 1})
    out = tmp_path / "c.zarr"
    lock = tmp_path / ".c.zarr.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(ProtoquantError, match=f"being written by process {sleeper.pid} on {socket.gethostname()}"):
            extract(truth.root, out, **FAST)
    finally:
        sleeper.kill()
        sleeper.wait()
    extract(truth.root, out, **FAST)  # the holder is dead: its lock is stale
    assert Cache(out).attrs["complete"] and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(ProtoquantError, match="process 1 on another-host"):
        extract(truth.root, out, **FAST)
    with pytest.raises(ProtoquantError, match="being written"), OwnerLock(out, "the cache"):
        pass
    assert lock.exists()  # a lock of another host is never taken over


def test_two_extractions_on_one_out_one_is_refused(tmp_path):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 14, "test": 6})
    out = tmp_path / "c.zarr"
    args = ["--backbone", "test_resnet", "--image-size", "64", "--workers", "0", "--batch-size", "1", "--shard-rows", "1"]
    first = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract", str(truth.root), "--out", str(out), *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (tmp_path / ".c.zarr.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(ProtoquantError, match=f"being written by process {first.pid}"):
        extract(truth.root, out, **FAST)
    assert first.wait(timeout=240) == 0, first.stderr.read()
    assert Cache(out).attrs["complete"]


# ---- worker errors come back as data: one line with any --workers (fault probe 2b-2e, 9g) ----

@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 not a jpeg", b""])
def test_a_bad_image_is_the_same_one_line_with_worker_processes(tmp_path, content):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 2, "test": 1})
    (truth.root / "train/cat/bad.jpg").write_bytes(content)
    messages = []
    for workers in (0, 2):
        with pytest.raises(ProtoquantError) as err:
            extract(truth.root, tmp_path / f"c{workers}.zarr", **{**FAST, "workers": workers})
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert not list(tmp_path.glob(".*.lock"))  # released on the error
    assert "train/cat/bad.jpg" in messages[1] and "DataLoader" not in messages[1] and "Traceback" not in messages[1]


def test_a_box_outside_its_image_names_the_image(tmp_path):
    truth = make_cub(tmp_path / "cub")
    lines = (truth.root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 10000 10000 20 20"
    (truth.root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    first_image = (truth.root / "images.txt").read_text().split()[1]
    with pytest.raises(ProtoquantError, match=f"{first_image}.*bounding box .* lies outside"):
        extract(truth.root, tmp_path / "c.zarr", crop_to_box=True, **{**FAST, "workers": 2})


def test_cli_worker_error_is_one_line_and_kind_exists(tmp_path):
    truth = make_imagefolder(tmp_path / "data", per_class={"train": 2, "test": 1})
    (truth.root / "train/cat/bad.jpg").write_bytes(b"junk")
    common = ["--backbone", "test_resnet", "--image-size", "64", "--workers", "2"]
    bad = subprocess.run([sys.executable, str(REPO / "cli.py"), "extract", str(truth.root), "--out", str(tmp_path / "c.zarr"),
                          *common], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]  # beside the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: cannot decode image") and "train/cat/bad.jpg" in errors[0]
    (truth.root / "train/cat/bad.jpg").unlink()
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    empty = runner.invoke(app, ["extract", str(tmp_path / "empty"), *common, "--out", str(tmp_path / "e.zarr")])
    assert empty.exit_code == 2 and "empty" in empty.output
    options = {param.opts[0] for param in typer.main.get_command(app).commands["extract"].params}
    assert set(re.findall(r"--[a-z][a-z-]+", empty.output)) <= options  # a hint names only options extract has
    wrong = runner.invoke(app, ["extract", str(truth.root), *common, "--kind", "cub", "--out", str(tmp_path / "k.zarr")])
    assert wrong.exit_code == 2 and "No such option" not in wrong.output
    ok = runner.invoke(app, ["extract", str(truth.root), *common, "--kind", "imagefolder", "--workers", "0",
                             "--out", str(tmp_path / "k.zarr")])
    assert ok.exit_code == 0, ok.output
    assert Cache(tmp_path / "k.zarr").attrs["source"]["kind"] == "imagefolder"


def test_an_altered_shard_is_refused_by_training_in_ram_and_by_evaluate(cached):
    """Same size, finite values, other content: only the checksum tells; the RAM path and evaluate re-hash."""
    from pipeline.data import evaluation_source

    _, path = cached
    altered = path / "train/features/c/3/0/0/0"
    data = bytearray(altered.read_bytes())
    data[10:12] = b"\x00\x3c"  # one float16 becomes 1.0
    altered.write_bytes(bytes(data))
    split = Cache(path).split("train")
    with pytest.raises(ProtoquantError, match=r"train shard 3 \(rows 6\.\.7.*altered"):
        open_training_data(split, val_fraction=0.2, seed=0, batch_size=4, max_memory=1 << 30)
    with pytest.raises(ProtoquantError, match="altered"):
        evaluation_source(split, batch_size=4, verify=True)
    assert len(evaluation_source(split, batch_size=4)) > 0  # without verify (streamed scoring inside train): sizes only
