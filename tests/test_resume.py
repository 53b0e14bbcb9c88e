"""`train --resume` after a SIGKILL in stage B and after a stop exactly at a phase boundary.

Every resumed run must end with the head of one uninterrupted run of the same command. Every part of
it runs on one thread, as the killed subprocess does (OMP_NUM_THREADS=1): on other thread counts two
uninterrupted runs differ by float rounding, which the projection's start (the patches' principal
directions, some of them nearly tied on these random-init features) turns into other heads. The
tolerance (1e-5) is the fault probe's (8b).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.model import load_head, load_probe
from stages.train import train
from tests.conftest import one_thread
from tests.test_train import FAST

REPO = Path(__file__).resolve().parents[1]
# Stage B long enough that the kill, sent within a poll (10 ms) of epoch 3's log line, lands well inside it.
SETTINGS = replace(FAST, epochs=40)
KILL_AFTER_HEAD_EPOCH = 3
SHORT = replace(FAST, epochs=4)  # for stops at a phase boundary, where stage B's length does not matter


def partial_dir(run: Path) -> Path:
    """Where train writes RUN before its final rename (and what --resume continues)."""
    return run.parent / f".{run.name}.partial"


def cli_args(store: dict, run: Path) -> list[str]:
    """`protoquant train` options equal to SETTINGS (the others are the library's defaults)."""
    return ["train", str(store["cache"]), "-c", str(store["codebook"]), "--out", str(run),
            "--epochs", str(SETTINGS.epochs), "--probe-epochs", str(SETTINGS.probe_epochs),
            "--codebook-epochs", str(SETTINGS.codebook_epochs), "--batch-size", str(SETTINGS.batch_size),
            "--probe-lr", str(SETTINGS.probe_lr), "--val-fraction", str(SETTINGS.val_fraction), "--device", "cpu"]


def uninterrupted(store: dict, tmp_path_factory, settings) -> Path:
    run = tmp_path_factory.mktemp("resume") / "uninterrupted"
    with one_thread():
        train(store["cache"], store["codebook"], run, settings)
    return run


@pytest.fixture(scope="module")
def reference(parts_store, tmp_path_factory) -> Path:
    """One uninterrupted run of SETTINGS."""
    return uninterrupted(parts_store, tmp_path_factory, SETTINGS)


@pytest.fixture(scope="module")
def short_reference(parts_store, tmp_path_factory) -> Path:
    """One uninterrupted run of SHORT."""
    return uninterrupted(parts_store, tmp_path_factory, SHORT)


def assert_same_weights(run: Path, reference: Path) -> None:
    head, _, _ = load_head(run / "head.safetensors")
    expected, _, _ = load_head(reference / "head.safetensors")
    probe, _, _ = load_probe(run / "probe.safetensors")
    expected_probe, _, _ = load_probe(reference / "probe.safetensors")
    for ours, theirs in ((head, expected), (probe, expected_probe)):
        theirs_state = theirs.state_dict()
        for name, tensor in ours.state_dict().items():
            assert torch.allclose(tensor.float(), theirs_state[name].float(), atol=1e-5), name


def read_log(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is replaced whole, atomically)
        return []


def kill_in_stage_b(command: list[str], log: Path, after_epoch: int, timeout: float = 180) -> subprocess.Popen:
    """Start command, SIGKILL it as soon as log shows head epoch `after_epoch`; return the reaped process."""
    process = subprocess.Popen(["nice", "-n", "10", *command], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if any(r["phase"] == "head" and r["epoch"] >= after_epoch for r in read_log(log)):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        process.wait(timeout=60)
    return process


def test_sigkill_in_stage_b_then_resume_gives_the_uninterrupted_head(parts_store, reference, tmp_path) -> None:
    run = tmp_path / "run"
    killed = kill_in_stage_b([sys.executable, "cli.py", *cli_args(parts_store, run)],
                             partial_dir(run) / "log.jsonl", KILL_AFTER_HEAD_EPOCH)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-2000:]  # it was killed, it did not finish
    killed.stderr.close()
    assert not run.exists()  # a killed run never appears at RUN
    assert (partial_dir(run) / "checkpoint.safetensors").is_file()
    before_kill = read_log(partial_dir(run) / "log.jsonl")
    stopped_at = max(r["epoch"] for r in before_kill if r["phase"] == "head")
    assert KILL_AFTER_HEAD_EPOCH <= stopped_at < SETTINGS.epochs

    with one_thread():
        result = CliRunner().invoke(app, [*cli_args(parts_store, run), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["resumed"] is True
    assert not partial_dir(run).exists()
    assert_same_weights(run, reference)
    log = read_log(run / "log.jsonl")
    assert log[:len(before_kill)] == before_kill  # carried over from the checkpoint (timings too), not redone
    assert [(r["phase"], r["epoch"]) for r in log] == [(r["phase"], r["epoch"]) for r in read_log(reference / "log.jsonl")]
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == \
        json.loads((reference / "metrics.json").read_text())["best_epoch"]


@pytest.mark.parametrize("last_phase, last_epoch, next_phase", [
    ("probe", SHORT.probe_epochs, "codebook"),        # the probe has just finished
    ("codebook", SHORT.codebook_epochs, "head"),      # stage A has just finished
])
def test_stop_at_a_phase_boundary_then_resume_starts_the_next_phase(parts_store, short_reference, tmp_path, last_phase,
                                                                    last_epoch, next_phase) -> None:
    def stop_after_the_phase(record: dict) -> None:
        if (record["phase"], record["epoch"]) == (last_phase, last_epoch):
            raise KeyboardInterrupt  # as Ctrl-C right after the phase's last checkpoint

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), one_thread():
        train(parts_store["cache"], parts_store["codebook"], run, SHORT, on_epoch=stop_after_the_phase)
    assert not run.exists() and (partial_dir(run) / "checkpoint.safetensors").is_file()

    resumed = []
    with one_thread():
        result = train(parts_store["cache"], parts_store["codebook"], run, SHORT, resume=True, on_epoch=resumed.append)
    assert result.resumed
    assert (resumed[0]["phase"], resumed[0]["epoch"]) == (next_phase, 1)  # nothing redone, nothing skipped
    assert_same_weights(run, short_reference)
    assert len(read_log(run / "log.jsonl")) == SHORT.probe_epochs + SHORT.codebook_epochs + SHORT.epochs
