"""Fault-probe cases for train and the commands that read a run (ids from ../shared/notes/fault-probe.md).

Each case was a traceback, a silently wrong run or lost data when probed. Now bad input is refused
with one line that names the option or the file, and a path protoquant did not make is never touched.
Through typer's CliRunner a refusal is the ProtoquantError that cli.py prints as `error: ...` (exit 2);
one subprocess case checks that printing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.errors import ProtoquantError
from stages.train import train
from tests.test_train import FAST

REPO = Path(__file__).resolve().parents[1]
TINY = replace(FAST, epochs=2, probe_epochs=1, codebook_epochs=1)
runner = CliRunner()


def refusal(result) -> str:
    """The message of a refused command: a one-line ProtoquantError, or a typer usage error (exit 2)."""
    if isinstance(result.exception, ProtoquantError):
        message = str(result.exception).strip()
        assert "\n" not in message, message
        return message
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.output,
                                                                                 repr(result.exception))
    return result.output


def train_args(store: dict, out: Path, *extra: str) -> list[str]:
    return ["train", str(store["cache"]), "-c", str(store["codebook"]), "--out", str(out), "--epochs", "1",
            "--probe-epochs", "1", "--codebook-epochs", "0", "--device", "cpu", "--json", *extra]


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (hidden ones too) with a file's bytes: what must stay as it was."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def run_a(parts_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "runA"
    train(parts_store["cache"], parts_store["codebook"], run, TINY)
    return run


@pytest.fixture
def image(parts_store) -> Path:
    return parts_store["data"] / "test" / "class_0" / "000.png"


# --- 5k' 5l 5m 5n: training options ------------------------------------------------------------------

BAD_OPTIONS = [
    pytest.param("--val-fraction", "0", id="5k'-val-fraction-0"),  # gave NaN validation scores
    pytest.param("--head-lr", "-1", id="5l-head-lr"),
    pytest.param("--probe-lr", "-1", id="5l-probe-lr"),
    pytest.param("--codebook-lr", "-1", id="5l-codebook-lr"),
    pytest.param("--codes-lr", "-1", id="5l-codes-lr"),
    pytest.param("--l1", "-1", id="5l-l1"),
    pytest.param("--mixup", "-1", id="5l-mixup"),
    pytest.param("--warmup-epochs", "-5", id="5l-warmup-epochs"),
    pytest.param("--tau", "nan", id="5m-tau-nan"),
    pytest.param("--head-lr", "nan", id="5m-head-lr-nan"),
    pytest.param("--probe-lr", "nan", id="5m-probe-lr-nan"),
    pytest.param("--label-smoothing", "2", id="5n-label-smoothing-2"),
    pytest.param("--label-smoothing", "1", id="5n-label-smoothing-1"),
    pytest.param("--label-smoothing", "-0.1", id="5n-label-smoothing-negative"),
]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_bad_training_option_is_refused_naming_it_and_writes_nothing(parts_store, tmp_path, option, value) -> None:
    out = tmp_path / "run"
    message = refusal(runner.invoke(app, train_args(parts_store, out, option, value)))
    assert option in message
    assert list(tmp_path.iterdir()) == []  # neither RUN nor its .partial work dir


def test_a_refused_option_is_one_error_line_with_exit_2(parts_store, tmp_path) -> None:
    done = subprocess.run([sys.executable, "cli.py", *train_args(parts_store, tmp_path / "run", "--tau", "nan")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--tau" in lines[0], done.stderr


# --- 8g 8h 8i: what train and prune may replace -----------------------------------------------------------

def test_train_without_resume_over_a_checkpoint_says_it_discards_it(parts_store, tmp_path) -> None:
    """8g: the stopped run's checkpoint used to be deleted without a word."""
    out = tmp_path / "run"

    def stop(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(parts_store["cache"], parts_store["codebook"], out, TINY, on_epoch=stop)
    assert (tmp_path / ".run.partial" / "checkpoint.safetensors").is_file()
    result = runner.invoke(app, train_args(parts_store, out))
    assert result.exit_code == 0, result.output
    assert re.search(r"discard", result.output, re.IGNORECASE) and "--resume" in result.output, result.output
    assert (out / "head.safetensors").is_file()


def test_train_overwrite_replaces_an_earlier_run(parts_store, tmp_path) -> None:
    """What held: --overwrite over a run protoquant wrote replaces it, leaving nothing beside it."""
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(parts_store, out)).exit_code == 0
    (out / "log.jsonl").write_text("")  # so the replacement can be told apart
    result = runner.invoke(app, train_args(parts_store, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # one probe epoch + one head epoch
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("command", ["train", "prune"])
def test_overwrite_refuses_a_folder_that_is_not_a_run(parts_store, run_a, tmp_path, command) -> None:
    """8h: `--overwrite` deleted the user's thesis.tex and put the run in its place."""
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("\\section{years of work}\n")
    before = listing(tmp_path)
    args = (train_args(parts_store, user, "--overwrite") if command == "train" else
            ["prune", str(run_a), "--out", str(user), "--overwrite", "--top-k-per-class", "2", "--device", "cpu"])
    message = refusal(runner.invoke(app, args))
    assert str(user) in message or "userdir" in message
    assert listing(tmp_path) == before  # nothing deleted, renamed or left beside it


def test_train_overwrite_refuses_a_file(parts_store, tmp_path) -> None:
    """8i: the user's file was renamed to .userfile.txt.old-PID and the run left in .userfile.txt.partial."""
    user_file = tmp_path / "userfile.txt"
    user_file.write_text("notes\n")
    before = listing(tmp_path)
    message = refusal(runner.invoke(app, train_args(parts_store, user_file, "--overwrite")))
    assert "userfile.txt" in message
    assert listing(tmp_path) == before


# --- 4d 4d': a damaged RUN/config.json --------------------------------------------------------------------

def _with_cache_path_12345(config: dict) -> str:
    return json.dumps({**config, "cache": {**config["cache"], "path": 12345}})


CORRUPTIONS = {
    "4d-garbage": lambda config: "garbage {{{",
    "4d'-list": lambda config: "[1, 2, 3]",
    "4d'-empty-object": lambda config: "{}",
    "4d'-cache-path-number": _with_cache_path_12345,
}


def _run_command(name: str, run: Path, image: Path, out: Path) -> list[str]:
    return {
        "evaluate": ["evaluate", str(run), "--device", "cpu"],
        "predict": ["predict", str(run), str(image), "--device", "cpu"],
        "gallery": ["gallery", str(run), "--out", str(out)],
        "explain": ["explain", str(run), str(image), "--out", str(out)],
        "prune": ["prune", str(run), "--out", str(out), "--top-k-per-class", "2", "--device", "cpu"],
    }[name]


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["evaluate", "predict", "gallery", "explain", "prune"])
def test_a_damaged_config_is_one_line_naming_it(run_a, image, tmp_path, command, corruption) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    config = json.loads((run_a / "config.json").read_text())
    (run / "config.json").write_text(CORRUPTIONS[corruption](config))
    message = refusal(runner.invoke(app, _run_command(command, run, image, tmp_path / "out")))
    assert "config.json" in message or (corruption == "4d'-cache-path-number" and "--cache" in message), message
    assert not (tmp_path / "out").exists()


# --- 9j 4d'': a moved cache, info on a run ------------------------------------------------------------------

def test_a_moved_cache_asks_for_cache(parts_store, image, tmp_path) -> None:
    """9j: the message said to make the cache with extract, when it only moved."""
    cache = tmp_path / "A.zarr"
    shutil.copytree(parts_store["cache"], cache)
    run = tmp_path / "run"
    train(cache, parts_store["codebook"], run, TINY)
    moved = cache.rename(tmp_path / "B.zarr")
    for args in (["evaluate", str(run), "--device", "cpu"], ["explain", str(run), str(image), "--out", str(tmp_path / "e")]):
        message = refusal(runner.invoke(app, args))
        assert "--cache" in message and "protoquant extract" not in message, message
    result = runner.invoke(app, ["evaluate", str(run), "--cache", str(moved), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 32  # the test split of the moved cache


def test_info_on_a_run_says_it_is_a_run(run_a) -> None:
    """4d'': `info RUN` suggested `extract --out RUN`."""
    result = runner.invoke(app, ["info", str(run_a)])
    text = str(result.exception) if isinstance(result.exception, ProtoquantError) else result.output
    assert "protoquant extract" not in text, text
    assert re.search(r"\b(is a|protoquant) run\b|\brun directory\b|\btrained\b", text, re.IGNORECASE), text
