"""Training under torchrun: two CPU ranks (gloo) must compute what one process computes.

Why the comparison holds exactly (up to float summation order): in RAM, rank r of 2 takes every
second row of the epoch's permutation, so its batch s of B rows and the other rank's batch s are
together the single process's batch s of 2B rows, split into equal halves. Every loss is a mean
over the batch, so the average of the two ranks' gradients is the single process's gradient. A
rank that stepped on its own gradient (no all-reduce) would train on half the data and drift.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.distributed import Distributed
from tests.conftest import one_thread
from tests.test_train import FAST

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average_on_rank(rank: int, port: int, out: str) -> None:
    """One gloo rank: known gradients per rank, averaged by the project's collective, saved for the parent."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dense = torch.nn.Parameter(torch.zeros(3))
        dense.grad = torch.tensor([rank + 1.0, 10.0 * (rank + 1), -float(rank)])  # rank 0: (1, 10, 0); rank 1: (2, 20, -1)
        untouched = torch.nn.Parameter(torch.zeros(2))  # no gradient: must stay without one
        Distributed(rank=rank, world=2).average_gradients([dense, untouched])
        torch.save({"dense": dense.grad.clone(), "untouched": untouched.grad}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_average_gradients_gives_every_rank_the_mean(tmp_path) -> None:
    mp.spawn(_average_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:  # the mean (1.5, 15, -0.5), not the sum (3, 30, -1) nor a rank's own
        assert torch.equal(result["dense"], torch.tensor([1.5, 15.0, -0.5]))
        assert result["untouched"] is None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("projection_dim", [0, 24], ids=["raw", "projected"])
def test_two_ranks_train_what_one_process_trains_on_the_same_global_batches(parts_store, tmp_path, projection_dim) -> None:
    """2 ranks x --batch-size 8 under torchrun = 1 process x 16, phase by phase; rank 0 alone writes the run.

    Both end at stage B (--no-ground --sparsity none; the single process on one thread, as each rank): the push
    and the path refit after it are no distributed work, and on this tiny,
    nearly separable set its weakest penalty wins, where the objective is so flat along the large weights
    that presence differing by float rounding makes L-BFGS-B stop a few percent apart."""
    from pipeline.cache import Cache
    from pipeline.data import usable_rows
    from stages.evaluate import evaluate
    from stages.train import train

    n_train = len(usable_rows(Cache(parts_store["cache"]).split("train"))) - 20  # 20 validation rows
    assert n_train % 2 == 0  # equal shares, so no row is dropped to keep the ranks in step
    single = tmp_path / "single"
    with one_thread():
        train(parts_store["cache"], parts_store["codebook"], single,
              replace(FAST, batch_size=16, sparsity="none", ground=False, projection_dim=projection_dim))

    ddp = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "cli.py",
               "train", str(parts_store["cache"]), "-c", str(parts_store["codebook"]), "--out", str(ddp),
               "--epochs", str(FAST.epochs), "--probe-epochs", str(FAST.probe_epochs),
               "--codebook-epochs", str(FAST.codebook_epochs), "--batch-size", "8", "--probe-lr", str(FAST.probe_lr),
               "--val-fraction", str(FAST.val_fraction), "--sparsity", "none", "--no-ground", "--projection-dim", str(projection_dim),
               "--device", "cpu", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # printed by rank 0 only
    config = json.loads((ddp / "config.json").read_text())
    assert config["data"]["world_size"] == 2 and config["data"]["path"] == "ram"

    for name in ("probe.safetensors", "head.safetensors"):
        ours, reference = _tensors(ddp / name), _tensors(single / name)
        assert ours.keys() == reference.keys()
        for key in reference:
            assert torch.allclose(ours[key].float(), reference[key].float(), atol=2e-5, rtol=1e-4), (name, key)
    ddp_log = [json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (single / "log.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in ddp_log] == [r["val_top1"] for r in single_log]  # validation summed over ranks
    assert evaluate(ddp, device="cpu").top1 >= 0.75  # chance is 0.25
