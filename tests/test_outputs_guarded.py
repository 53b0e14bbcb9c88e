"""Outputs found by the issue-8 review to lose data, each reproduced and refused: a codebook written over a
user's (or the dataset's) file, shards --overwrite deleting what it did not write, a run replacing the inputs
that live inside it, a truncated WebDataset tar read as a shorter one, two commands writing one run."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from pipeline.errors import ProtoquantError
from pipeline.run import prepare_run_dir
from stages.codebook import CodebookSettings, build_codebook
from stages.shards import make_shards

FAST = ["--epochs", "1", "--probe-epochs", "1", "--codebook-epochs", "1", "--batch-size", "16"]


def test_codebook_never_writes_over_a_file_it_did_not_make(parts_store, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    for out, why in ((notes, "not a protoquant codebook"), (tmp_path, "is a directory"),
                     (parts_store["cache"] / "zarr.json", "inside")):
        before = out.read_bytes() if out.is_file() else None
        with pytest.raises(ProtoquantError, match=why):
            build_codebook(parts_store["cache"], out, CodebookSettings(k=4, seed=0))
        assert before is None or out.read_bytes() == before
    again = tmp_path / "cb.safetensors"
    build_codebook(parts_store["cache"], again, CodebookSettings(k=4, seed=0))
    build_codebook(parts_store["cache"], again, CodebookSettings(k=4, seed=1))  # its own codebook: rebuilt in place


def test_shards_overwrite_deletes_only_its_own_files_and_never_writes_into_data(imagefolder_data, tmp_path: Path) -> None:
    data = imagefolder_data.root
    out = tmp_path / "shards"
    make_shards(data, out, max_count=5)
    (out / "backup.tar").write_text("precious")  # the user's file, beside the shards
    with pytest.raises(ProtoquantError, match="not a shards folder"):
        make_shards(data, out, max_count=100, overwrite=True)
    assert (out / "backup.tar").read_text() == "precious" and (out / "train-000001.tar").is_file()
    (out / "backup.tar").unlink()
    make_shards(data, out, max_count=100, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    for target in (data, data / "train", tmp_path):  # DATA itself, inside it, around it
        with pytest.raises(ProtoquantError, match="input"):
            make_shards(data, target, overwrite=True)
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(imagefolder_data.classes)


def test_a_truncated_shard_is_named_not_read_short(imagefolder_data, tmp_path: Path) -> None:
    from pipeline.datasets import open_dataset

    out = tmp_path / "shards"
    make_shards(imagefolder_data.root, out, max_count=100)
    tar = out / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])  # tar pads to 10 KiB: what is left still parses as a tar
    with pytest.raises(ProtoquantError, match="truncated"):
        open_dataset(out)


def test_train_overwrite_refuses_a_run_that_holds_its_inputs(parts_store, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.app, ["train", str(parts_store["cache"]), "-c", str(parts_store["codebook"]), "--out",
                                     str(run), *FAST])
    assert result.exit_code == 0, result.output
    inner = run / "inner.zarr"
    shutil.copytree(parts_store["cache"], inner)
    result = runner.invoke(cli.app, ["train", str(inner), "-c", str(parts_store["codebook"]), "--out", str(run),
                                     "--overwrite", *FAST])
    assert result.exit_code == 2 and "input" in result.stderr, result.output
    assert (inner / "zarr.json").is_file() and (run / "head.safetensors").is_file()


def test_a_second_writer_of_one_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # pid 1 is alive: another writer
    with pytest.raises(ProtoquantError, match="being written by process 1"):
        prepare_run_dir(out, overwrite=False, resume=False)
    assert not (tmp_path / ".run.partial").exists()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # an earlier call of ours
    assert prepare_run_dir(out, overwrite=False, resume=False).work.is_dir()
