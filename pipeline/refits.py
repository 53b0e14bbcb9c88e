"""Several sparse refits side by side: the sweep's heads of one seed, each path solved in its own process.

A small path solve runs on one thread (sparsity._threads_for: thousands of tiny products), so a machine
with several cores can solve several heads' paths at once. Threads cannot: scipy's L-BFGS-B holds the GIL
between torch's products (measured 1.11-1.14x slower than one after the other). So each worker is a fresh
`python -m pipeline.refits` with one thread for torch, OpenMP and the BLAS under scipy, and this process
solves with one BLAS thread while they run (with a BLAS pool per process, two processes on two cores
solved 4.5x slower than one alone; the tiny vector operations of L-BFGS-B never use a second thread). Not multiprocessing: its
fork copies a running torch thread pool (measured 2.8x slower, or a hang), and its spawn and forkserver
import the caller's __main__ again, so a script without a main guard would start its own work twice.
A worker runs exactly what `regularization_path` runs here, with this process's torch threads (the solves
themselves take one, as here): the same numbers.
Big solves use every core already; they run here, one after the other.

The pipe carries one JSON line, then the arrays' raw bytes (their dtypes and shapes are in the line), each
way. No pickle.

    is_small       whether a path solve runs on one thread, and so in a worker
    path_workers   how many processes solve side by side, this one included (PROTOQUANT_REFIT_WORKERS, else
                   one per thread torch may use)
    PathSolver     solves a list of paths -> a SolvedPath each; a context that owns its workers
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.errors import ProtoquantError
from pipeline.sparsity import ONE_THREAD_WORK, PathPoint, PathSettings, regularization_path

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class PathProblem:
    """One head's refit: presence (N, K) and labels of its training and validation rows."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    settings: PathSettings

    @property
    def small(self) -> bool:
        return is_small(*self.train[0].shape, self.num_classes)


def is_small(rows: int, codes: int, classes: int) -> bool:
    """Whether a path on rows x codes presence runs on one thread (sparsity._threads_for), so that it can run
    beside others."""
    return rows * codes * classes < ONE_THREAD_WORK


@dataclass(frozen=True)
class SolvedPath:
    points: list[PathPoint]
    seconds: float   # the solve alone
    n_val: int       # validation images its points were scored on


def path_workers(problems: int) -> int:
    """Processes that solve `problems` small paths side by side, this one included: PROTOQUANT_REFIT_WORKERS
    when set (1: every solve in this process), else one per thread torch may use here, never more than the
    problems."""
    try:
        wanted = int(os.environ.get("PROTOQUANT_REFIT_WORKERS", "0"))
    except ValueError:
        wanted = 0
    return max(1, min(problems, wanted if wanted > 0 else torch.get_num_threads()))


def solve(problem: PathProblem) -> SolvedPath:
    """The problem's path, solved here."""
    started = time.perf_counter()
    points = regularization_path(problem.train, problem.val, problem.num_classes, problem.settings)
    return SolvedPath(points, time.perf_counter() - started, int(problem.val[1].numel()))


class PathSolver:
    """Solves paths: this process and `workers - 1` worker processes take the small ones from one queue
    (tiny ones are done here before a worker has started); big ones are solved here after them. The workers
    start on the first call that needs them (or `start`) and stop when the context ends."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._started: list[subprocess.Popen] = []

    def __enter__(self) -> "PathSolver":
        return self

    def __exit__(self, *exc) -> None:
        self._stop(kill=exc[0] is not None)

    def start(self) -> None:
        """Start the workers now (each imports torch for a second or two) rather than at the first solve:
        the caller has other work to do meanwhile."""
        self._start(self.workers - 1)

    def solve(self, problems: list[PathProblem]) -> list[SolvedPath]:
        """Each problem's path, in order: the same points `solve` gives one by one."""
        small = [i for i, p in enumerate(problems) if p.small] if self.workers > 1 else []
        if len(small) < 2:
            return [solve(problem) for problem in problems]
        self._start(min(self.workers, len(small)) - 1)
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in small:
            jobs.put(i)
        done: dict[int, SolvedPath] = {}
        talkers = ThreadPoolExecutor(len(self._started), thread_name_prefix="protoquant-refit")
        try:
            futures = [talkers.submit(self._serve, worker, jobs, problems, done) for worker in self._started]
            with threadpool_limits(limits=1, user_api="blas"):  # its threads would wait for cores the workers use
                while (i := _next(jobs)) is not None:
                    done[i] = solve(problems[i])
                for future in futures:
                    future.result()
            for i, problem in enumerate(problems):
                if i not in done:  # a big one: every core is free for it now
                    done[i] = solve(problem)
            return [done[i] for i in range(len(problems))]
        except BaseException:
            self._stop(kill=True)  # Ctrl-C or an error: do not wait for the other solves
            raise
        finally:
            talkers.shutdown(wait=True, cancel_futures=True)

    def _start(self, count: int) -> None:
        env = {**os.environ, **ONE_THREAD,
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        while len(self._started) < count:
            self._started.append(subprocess.Popen([sys.executable, "-m", "pipeline.refits"], stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, env=env))

    def _stop(self, *, kill: bool) -> None:
        for worker in self._started:
            try:
                worker.kill() if kill else worker.stdin.close()  # a worker ends at the end of its input
            except OSError:
                pass  # it has ended already
        for worker in self._started:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            for pipe in (worker.stdin, worker.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self._started = []

    @staticmethod
    def _serve(worker: subprocess.Popen, jobs: queue.SimpleQueue, problems: list[PathProblem],
               done: dict[int, SolvedPath]) -> None:
        """One worker's share: problems from the queue, sent and answered one at a time, until it is empty."""
        while (i := _next(jobs)) is not None:
            problem = problems[i]
            try:
                _send(worker.stdin, {"num_classes": problem.num_classes, "settings": asdict(problem.settings),
                                     "threads": torch.get_num_threads()},
                      [problem.train[0], problem.train[1], problem.val[0], problem.val[1]])
                header, arrays = _receive(worker.stdout)
            except (OSError, ValueError):
                header = None
            if header is None:
                raise ProtoquantError(f"a refit worker process stopped (exit code {worker.poll()}; out of memory?): run "
                                      "again with PROTOQUANT_REFIT_WORKERS=1 to solve the refits one by one in this process")
            if "error" in header:
                raise ProtoquantError(header["error"])
            done[i] = _solved_from(header, arrays)


def _next(jobs: queue.SimpleQueue) -> int | None:
    try:
        return jobs.get_nowait()
    except queue.Empty:
        return None


# --- the pipe: a JSON line, then raw arrays ------------------------------------------------------------

def _send(stream: BinaryIO, header: dict, arrays: list) -> None:
    arrays = [np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a) for a in arrays]
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    stream.write(json.dumps(header).encode() + b"\n")
    for a in arrays:
        stream.write(memoryview(a).cast("B"))
    stream.flush()


def _receive(stream: BinaryIO) -> tuple[dict | None, list[np.ndarray]]:
    """(header, arrays), or (None, []) at the end of the stream."""
    line = stream.readline()
    if not line:
        return None, []
    header = json.loads(line)
    arrays = []
    for dtype, shape in header.pop("arrays"):
        a = np.empty(shape, dtype=np.dtype(dtype))
        view = memoryview(a).cast("B")
        if stream.readinto(view) != len(view):
            raise ValueError("the refit pipe ended inside an array")
        arrays.append(a)
    return header, arrays


def _solved_message(solved: SolvedPath) -> tuple[dict, list[np.ndarray]]:
    scores = [{f.name: getattr(p, f.name) for f in fields(p) if f.name != "weight"} for p in solved.points]
    return {"seconds": solved.seconds, "n_val": solved.n_val, "points": scores}, [p.weight.numpy() for p in solved.points]


def _solved_from(header: dict, weights: list[np.ndarray]) -> SolvedPath:
    points = [PathPoint(weight=torch.from_numpy(w), **scores) for scores, w in zip(header["points"], weights)]
    return SolvedPath(points, header["seconds"], header["n_val"])


def serve() -> None:
    """A worker's loop: a problem in, its solved path out, until the input ends. Ctrl-C is for the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header, arrays = _receive(source)
        if header is None:
            return
        try:
            torch.set_num_threads(header["threads"])  # as the parent: the path's first products run outside _threads_for
            problem = PathProblem((torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1])),
                                  (torch.from_numpy(arrays[2]), torch.from_numpy(arrays[3])),
                                  header["num_classes"], PathSettings(**header["settings"]))
            message, out = _solved_message(solve(problem))
        except Exception as err:  # noqa: BLE001  (the parent raises it, with its message)
            message, out = {"error": str(err) if isinstance(err, ProtoquantError) else f"the refit failed: {err!r}"}, []
        _send(sink, message, out)


if __name__ == "__main__":
    serve()
