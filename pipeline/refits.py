"""Several sparse refits side by side: the sweep's heads of one seed, each path solved in its own process.

A small path solve runs on one thread, torch's and the BLAS's (sparsity._threads_for: thousands of tiny
products), so a machine with several cores can solve several heads' paths at once. Threads cannot: scipy's
L-BFGS-B holds the GIL between torch's products (measured about 1.1x slower than one after the other). So
this process and fresh worker processes (`python -P -c WORKER`, one thread for torch, OpenMP and the BLAS)
take the paths from one queue. Not multiprocessing: its fork copies a running torch thread pool (a hang
without care), and its spawn and forkserver import the caller's __main__ again, so a script without a main
guard would start its own work twice. A worker runs exactly what `regularization_path` runs here, with this
process's torch thread count for the path's first products (the solves take one thread, as here): the same
numbers. Big solves use every core already; they run here, after the small ones.

The pipe carries one JSON line, then the arrays' raw bytes (their dtypes and shapes are in the line), each
way. No pickle. A worker's own stdout goes to stderr, so nothing a library prints can break the pipe.

    path_workers   how many processes solve side by side, this one included (PROTOQUANT_REFIT_WORKERS, else
                   one per core this process may use, at most one per 2 GB of free RAM)
    PathSolver     solves a list of paths -> a SolvedPath each; a context that owns its workers
"""

from __future__ import annotations

import ctypes
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

from pipeline.errors import ProtoquantError
from pipeline.sparsity import ONE_THREAD_WORK, PathPoint, PathSettings, regularization_path

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WORKER_RAM = 2 * 10**9  # a worker holds torch and scipy (0.56 GB measured) and its problem's presence
ROOT = str(Path(__file__).resolve().parents[1])  # where this `pipeline` package lies: the workers import the same
WORKER = ("import os, sys\n"
          "pipe = os.dup(1)\n"  # the answers' pipe; from here on fd 1 (print, C libraries, imports) is stderr
          "os.dup2(2, 1)\n"
          f"sys.path.insert(0, {ROOT!r}) if {ROOT!r} not in sys.path else None\n"
          "from pipeline.refits import leave, serve\n"
          "serve(pipe)\n"
          "leave()\n")


@dataclass(frozen=True)
class PathProblem:
    """One head's refit: presence (N, K) and labels of its training and validation rows."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    settings: PathSettings

    @property
    def small(self) -> bool:
        """Whether its solve runs on one thread (sparsity._threads_for), so that it can run beside others."""
        return self.train[0].numel() * self.num_classes < ONE_THREAD_WORK


@dataclass(frozen=True)
class SolvedPath:
    points: list[PathPoint]
    seconds: float   # the solve alone
    n_val: int       # validation images its points were scored on


def path_workers(problems: int) -> int:
    """Processes that solve `problems` small paths side by side, this one included: PROTOQUANT_REFIT_WORKERS
    when set (1: every solve in this process), else one per core this process may use (its CPU affinity and
    torch's thread count) and at most one per WORKER_RAM of free memory; never more than the problems."""
    from pipeline.data import available_memory

    try:
        wanted = int(os.environ.get("PROTOQUANT_REFIT_WORKERS", "0"))
    except ValueError:
        wanted = 0
    if wanted <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        wanted = min(cores, torch.get_num_threads(), 1 + available_memory() // WORKER_RAM)
    return max(1, min(problems, wanted))


def solve_here(problem: PathProblem) -> SolvedPath:
    """The problem's path, solved in this process."""
    started = time.perf_counter()
    points = regularization_path(problem.train, problem.val, problem.num_classes, problem.settings)
    return SolvedPath(points, time.perf_counter() - started, int(problem.val[1].numel()))


class PathSolver:
    """Solves paths: this process and `workers - 1` worker processes take the small ones from one queue
    (tiny ones are done here before a worker has started); big ones are solved here after them. The workers
    start on the first call that needs them and stop when the context ends."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._started: list[subprocess.Popen] = []

    def __enter__(self) -> "PathSolver":
        return self

    def __exit__(self, *exc) -> None:
        self._stop(kill=exc[0] is not None)

    def start(self) -> None:
        """Start the workers now rather than at the first solve (the tests talk to one directly). The sweep
        does not: started before its pushes, they slowed them more than their start-up cost (RESULTS.md)."""
        self._start(self.workers - 1)

    def solve(self, problems: list[PathProblem]) -> list[SolvedPath]:
        """Each problem's path, in order: the same points `solve_here` gives one by one."""
        small = [i for i, p in enumerate(problems) if p.small] if self.workers > 1 else []
        if len(small) < 2:
            return [solve_here(problem) for problem in problems]
        self._start(min(self.workers, len(small)) - 1)
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in small:
            jobs.put(i)
        done: dict[int, SolvedPath] = {}
        threads = torch.get_num_threads()  # here, outside any _threads_for: what a path starts with in this process
        talkers = ThreadPoolExecutor(len(self._started), thread_name_prefix="protoquant-refit")
        try:
            futures = [talkers.submit(_serve_jobs, worker, jobs, problems, done, threads) for worker in self._started]
            while (i := _next(jobs)) is not None:
                done[i] = solve_here(problems[i])
            for future in futures:
                future.result()
            for i, problem in enumerate(problems):
                if i not in done:  # a big one: every core is free for it now
                    done[i] = solve_here(problem)
            return [done[i] for i in range(len(problems))]
        except BaseException:
            self._stop(kill=True)  # Ctrl-C or an error: do not wait for the other solves
            raise
        finally:
            talkers.shutdown(wait=True, cancel_futures=True)

    def _start(self, count: int) -> None:
        while len(self._started) < count:
            # -P: not the current folder first on sys.path (a pipeline/ there would run instead of ours)
            self._started.append(subprocess.Popen([sys.executable, "-P", "-c", WORKER], stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, env={**os.environ, **ONE_THREAD}))

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


def _serve_jobs(worker: subprocess.Popen, jobs: queue.SimpleQueue, problems: list[PathProblem],
                done: dict[int, SolvedPath], threads: int) -> None:
    """One worker's share: problems from the queue, sent and answered one at a time, until it is empty."""
    while (i := _next(jobs)) is not None:
        problem = problems[i]
        try:
            _send(worker.stdin, {"num_classes": problem.num_classes, "settings": asdict(problem.settings),
                                 "threads": threads}, [*problem.train, *problem.val])
            header, arrays = _receive(worker.stdout)
        except (OSError, ValueError):
            header = None
        if header is None:
            try:
                code = worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise ProtoquantError(f"a refit worker process stopped (exit code {code}; out of memory?): run again with "
                                  "PROTOQUANT_REFIT_WORKERS=1 to solve the refits one by one in this process")
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
        stream.write(a.tobytes() if a.size == 0 else memoryview(a).cast("B"))
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
        if a.size and stream.readinto(memoryview(a).cast("B")) != a.nbytes:
            raise ValueError("the refit pipe ended inside an array")
        arrays.append(a)
    return header, arrays


def _solved_message(solved: SolvedPath) -> tuple[dict, list[np.ndarray]]:
    scores = [{f.name: getattr(p, f.name) for f in fields(p) if f.name != "weight"} for p in solved.points]
    return {"seconds": solved.seconds, "n_val": solved.n_val, "points": scores}, [p.weight.numpy() for p in solved.points]


def _solved_from(header: dict, weights: list[np.ndarray]) -> SolvedPath:
    points = [PathPoint(weight=torch.from_numpy(w), **scores) for scores, w in zip(header["points"], weights)]
    return SolvedPath(points, header["seconds"], header["n_val"])


def serve(pipe: int) -> None:
    """A worker's loop (WORKER): a problem in from stdin, its solved path out on the file descriptor `pipe`,
    until the input ends or the parent is gone. Ctrl-C is for the parent (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, os.fdopen(pipe, "wb")
    try:
        while True:
            header, arrays = _receive(source)
            if header is None:
                return
            _send(sink, *_answer(header, arrays))
    except (OSError, ValueError):  # the parent is gone (killed, or it stopped the workers): nothing to tell anyone
        return


def leave() -> None:
    """A worker's end, once serve() returns (every answer is flushed by then): what was printed goes out,
    Python's streams and C's stdio (on stderr), and the process exits at once, without the interpreter's
    teardown (0.7 s with torch loaded, which the sweep would wait for)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001  (no C library to reach on this platform: nothing buffered there either)
        pass
    os._exit(0)


def _answer(header: dict, arrays: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    try:
        torch.set_num_threads(header["threads"])  # as the parent: the path's first products run outside _threads_for
        problem = PathProblem((torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1])),
                              (torch.from_numpy(arrays[2]), torch.from_numpy(arrays[3])),
                              header["num_classes"], PathSettings(**header["settings"]))
        return _solved_message(solve_here(problem))
    except Exception as err:  # noqa: BLE001  (the parent raises it, with its message)
        return {"error": str(err) if isinstance(err, ProtoquantError) else f"the refit failed: {err!r}"}, []
