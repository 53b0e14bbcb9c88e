"""pipeline/refits.py: paths solved side by side in worker processes are the paths solved here, number for
number; a worker's error and a worker's death each reach the caller as one clear error. Real processes."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from pipeline import refits
from pipeline.errors import ProtoquantError
from pipeline.refits import PathProblem, PathSolver, _serve_jobs, path_workers, solve_here
from pipeline.sparsity import PathSettings


def problem(seed: int, rows: int = 600, codes: int = 24, classes: int = 5) -> PathProblem:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    signal = torch.nn.functional.one_hot(labels % codes, codes).float()  # a code per class that predicts it
    presence = (0.6 * signal + 0.4 * torch.rand(rows, codes, generator=g)).clamp(0, 1)
    cut = rows * 3 // 4
    return PathProblem((presence[:cut], labels[:cut]), (presence[cut:], labels[cut:]), classes, PathSettings(points=6))


def assert_same_paths(a, b) -> None:
    assert len(a.points) == len(b.points) == 6 and a.n_val == b.n_val
    for p, q in zip(a.points, b.points):
        assert torch.equal(p.weight, q.weight)  # not close: the same numbers
        assert (p.penalty, p.val_top1, p.train_top1, p.val_loss, p.val_loss_se) == \
            (q.penalty, q.val_top1, q.train_top1, q.val_loss, q.val_loss_se)


def wide_problem(seed: int = 0, rows: int = 300, codes: int = 2100, classes: int = 6) -> PathProblem:
    """classes x codes above 10,000: the BLAS would split L-BFGS-B's dot products over its threads (and round
    differently) were a small solve not on one thread in every process."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    presence = torch.rand(rows, codes, generator=g)
    presence[torch.arange(rows), labels * (codes // classes)] += 0.3
    cut = rows * 3 // 4
    return PathProblem((presence[:cut], labels[:cut]), (presence[cut:], labels[cut:]), classes, PathSettings(points=6))


def test_workers_solve_the_same_paths_as_this_process(monkeypatch) -> None:
    torch.randn(500, 500) @ torch.randn(500, 500)  # this process's thread pool runs, as after stage B
    problems = [problem(0), problem(1, rows=1200), wide_problem()]
    here = [solve_here(p) for p in problems]
    assert here[2].points[-1].nonzero > 100  # many weights in play: rounding would show
    with PathSolver(3) as solver:
        solver.start()
        assert len(solver._started) == 2  # three processes side by side: this one and two workers
        jobs, there = queue.SimpleQueue(), {}
        for i in range(3):
            jobs.put(i)
        _serve_jobs(solver._started[0], jobs, problems, there, torch.get_num_threads())  # every problem through one worker
        assert sorted(there) == [0, 1, 2] and any(p.weight.count_nonzero() for p in there[0].points)
        for i, solved in enumerate(here):
            assert_same_paths(solved, there[i])
        # through the queue (here or in a worker, whoever is free), a problem too big for one thread solved
        # here after the others: every answer in its place
        problems[2] = problem(2)
        here[2] = solve_here(problems[2])
        monkeypatch.setattr(refits, "ONE_THREAD_WORK", problems[0].train[0].numel() * 5 + 1)
        assert [p.small for p in problems] == [True, False, True]
        for a, b in zip(here, solver.solve(problems)):
            assert_same_paths(a, b)
    assert solver._started == []


def test_a_pipeline_package_in_the_current_folder_does_not_replace_the_workers_code(tmp_path, monkeypatch) -> None:
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "refits.py").write_text("print('not protoquant')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", refits.ROOT)  # ours already on the path: only -P keeps the folder off it
    assert_a_worker_solves_as_here(problem(1))


def test_what_a_worker_prints_does_not_reach_the_pipe_but_reaches_stderr(monkeypatch, capfd) -> None:
    noisy = refits.WORKER.replace("from pipeline.refits import leave, serve", "print('a library says hello')\nfrom pipeline.refits import leave, serve")
    assert noisy != refits.WORKER
    monkeypatch.setattr(refits, "WORKER", noisy)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # a block-buffered stdout, flushed before the worker's quick exit
    assert_a_worker_solves_as_here(problem(1))
    assert "a library says hello" in capfd.readouterr().err


def test_the_workers_take_their_share_of_the_queue(monkeypatch) -> None:
    """This process waits, before its first solve, until a worker has answered: then some answers came from
    workers, and every answer is still in its place."""
    answered = threading.Event()
    original_from, original_here = refits._solved_from, refits.solve_here
    here_count = []

    def from_worker(header, arrays):
        answered.set()
        return original_from(header, arrays)

    def here_after_a_worker(problem):
        assert answered.wait(timeout=120)
        here_count.append(1)
        return original_here(problem)

    problems = [problem(seed) for seed in range(4)]
    expected = [original_here(p) for p in problems]
    monkeypatch.setattr(refits, "_solved_from", from_worker)
    monkeypatch.setattr(refits, "solve_here", here_after_a_worker)
    with PathSolver(2) as solver:
        for a, b in zip(expected, solver.solve(problems)):
            assert_same_paths(a, b)
    assert len(here_count) < len(problems)


def solved_by(worker, path_problem: PathProblem) -> "refits.SolvedPath":
    """The problem's path as that worker process answers it."""
    done = {}
    _serve_jobs(worker, one_job(), [path_problem], done, torch.get_num_threads())
    return done[0]


def assert_a_worker_solves_as_here(path_problem: PathProblem) -> None:
    with PathSolver(2) as solver:
        solver.start()
        there = solved_by(solver._started[0], path_problem)
    assert_same_paths(there, solve_here(path_problem))


def one_job() -> queue.SimpleQueue:
    jobs = queue.SimpleQueue()
    jobs.put(0)
    return jobs


def test_a_worker_error_is_the_callers_error_and_the_worker_serves_on() -> None:
    bad = problem(0)
    bad.train[0][3, 2] = float("nan")
    with PathSolver(2) as solver:
        solver.start()
        (worker,) = solver._started
        with pytest.raises(ProtoquantError, match="presence scores that are NaN"):
            _serve_jobs(worker, one_job(), [bad], {}, 1)
        assert_same_paths(solved_by(worker, problem(1)), solve_here(problem(1)))
        with pytest.raises(ProtoquantError, match="presence scores that are NaN"):
            solver.solve([problem(1), bad, problem(2)])  # here or there: the same error
    assert solver._started == []


def test_a_worker_that_dies_is_named_with_the_way_around_it() -> None:
    with PathSolver(2) as solver:
        solver.start()
        (worker,) = solver._started
        worker.kill()
        worker.wait()
        with pytest.raises(ProtoquantError, match=r"refit worker process stopped .*PROTOQUANT_REFIT_WORKERS=1"):
            _serve_jobs(worker, one_job(), [problem(0)], {}, 1)
    assert solver._started == []


def test_one_problem_or_one_worker_is_solved_here_without_a_process(monkeypatch) -> None:
    with PathSolver(4) as solver:
        assert_same_paths(solver.solve([problem(0)])[0], solve_here(problem(0)))
        assert solver._started == []
    monkeypatch.setenv("PROTOQUANT_REFIT_WORKERS", "1")
    assert path_workers(8) == 1
    monkeypatch.setenv("PROTOQUANT_REFIT_WORKERS", "3")
    assert path_workers(8) == 3 and path_workers(2) == 2
    monkeypatch.setenv("PROTOQUANT_REFIT_WORKERS", "many")  # not a number: the default
    default = path_workers(8)
    monkeypatch.delenv("PROTOQUANT_REFIT_WORKERS")
    assert path_workers(8) == default and 1 <= default <= min(8, torch.get_num_threads())
