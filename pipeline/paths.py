"""The one rule for writing to an output path, and the owner lock that keeps a second writer out.

    refuse_url          object-store URLs are not supported: one line instead of a traceback
    check_output        may protoquant write to `out`? free (absent or an empty folder), ours, or refused
    remove_ours         delete `out` only when it is recognisably one of protoquant's own outputs
    default_protected   the folders no output may be or contain: the current directory and the home dir
    OwnerLock           `.<name>.lock` beside `out`, holding the writer's pid and host

The rule: protoquant never deletes or writes into a path it did not make. A file, a non-empty folder,
a Zarr store or an artefact of another format is refused with what it is and what to do; `--overwrite`
replaces only what `is_ours` recognises (for a cache: the format marker in its root zarr.json). An
output may never be, or contain, a protected path (deleting it would take that path along), and may not
lie inside a source it reads (the dataset). Stages pass their own `is_ours` and description, so caches,
runs and pages share this one rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

from pipeline.errors import ProtoquantError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://, gs://, https:// (Path() keeps one slash)


def refuse_url(path: str | Path, what: str) -> None:
    """Object stores are not supported: say so in one line (a URL would otherwise become an odd local path)."""
    if _URL.match(str(path)):
        raise ProtoquantError(f"{what} {path} is a URL; protoquant reads and writes local paths only "
                              "(a local or shared file system): copy the store to a local path")


def default_protected() -> list[Path]:
    """The current directory and the home directory: no output may be one of them or contain them."""
    return [Path.cwd(), Path.home()]


def describe_path(path: Path) -> str:
    """What an existing path is, in words, for a refusal: a file, a Zarr array or group, or a folder."""
    if path.is_symlink():
        return "a symbolic link"
    if path.is_file() or not path.is_dir():
        return "a file"
    meta = path / "zarr.json"
    if meta.is_file():
        try:
            node = json.loads(meta.read_text()).get("node_type", "node")
        except (ValueError, OSError, AttributeError):
            return "a folder whose zarr.json is not valid Zarr metadata"
        return f"a Zarr {node} that protoquant did not make"
    return "a non-empty folder that protoquant did not make"


def _overlap(out: Path, protected: Iterable[Path], sources: Iterable[Path]) -> str | None:
    """Why `out` may not be written, when it is, contains or (for a source) lies inside a guarded path."""
    target = out.resolve()
    for path in protected:
        guarded = Path(path).resolve()
        if target == guarded or guarded.is_relative_to(target):
            return f"is or contains {guarded}"
    for path in sources:
        guarded = Path(path).resolve()
        if target == guarded or guarded.is_relative_to(target):
            return f"is or contains the input {guarded}"
        if target.is_relative_to(guarded):
            return f"lies inside the input {guarded}"
    return None


def check_output(out: str | Path, *, is_ours: Callable[[Path], bool], what: str, overwrite: bool,
                 option: str = "--out", protected: Iterable[Path] | None = None, sources: Iterable[Path] = (),
                 describe: Callable[[Path], str | None] | None = None) -> bool:
    """Decide whether `out` may be written: False when it is free (absent or an empty folder), True when
    it holds one of ours (the caller resumes or, with `overwrite`, replaces it); anything else is refused.

    `describe` may name a foreign path more precisely (e.g. "an older-format protoquant cache ..."); it
    returns None to fall back to `describe_path`.
    """
    refuse_url(out, option)
    out = Path(out)
    why = _overlap(out, default_protected() if protected is None else protected, sources)
    if why:
        raise ProtoquantError(f"{option} {out} {why}: writing {what} there could destroy it; choose a new path")
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return False
    if out.is_dir() and not out.is_symlink() and is_ours(out):
        return True
    found = (describe(out) if describe else None) or describe_path(out)
    hint = (f"--overwrite replaces only {what} made by protoquant" if overwrite
            else "protoquant never replaces what it did not make")
    raise ProtoquantError(f"{option} {out} is {found}, not {what}: choose another path ({hint}), "
                          "or move it away yourself")


def remove_ours(out: str | Path, is_ours: Callable[[Path], bool]) -> None:
    """Delete `out` (a folder) only when `is_ours` recognises it; refusing is a bug in the caller."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir() or not is_ours(out):
        raise ProtoquantError(f"internal: refused to delete {out}, which protoquant did not make")
    shutil.rmtree(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class OwnerLock:
    """An exclusive writer lock: `.<name>.lock` beside `out`, created atomically, holding pid and host.

    A lock left by a dead process on this host (SIGKILL, power loss) is stale and taken over; a live
    one, or one from another host (which cannot be checked from here), is refused with who holds it.
    Beside, not inside: creating a store clears its folder, and the lock must outlive that.
    """

    def __init__(self, out: str | Path, what: str):
        out = Path(out).resolve()
        self.path = out.parent / f".{out.name}.lock"
        self.what = what
        self.held = False

    def __enter__(self) -> "OwnerLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear_stale()
                continue
            except OSError as err:
                raise ProtoquantError(f"cannot create the lock {self.path} ({err.strerror}): is its folder writable?") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(owner, fh)
            self.held = True
            return
        raise ProtoquantError(f"another process keeps taking the lock {self.path}: {self.what} has another writer")

    def _refuse_or_clear_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError, OSError):
            raise ProtoquantError(f"{self.path} is not a protoquant lock (unreadable owner): if no protoquant "
                                  f"process writes {self.what}, delete {self.path}") from None
        if host == socket.gethostname() and (pid == os.getpid() or not _pid_alive(pid)):
            self.path.unlink(missing_ok=True)  # stale: its writer is gone (or was an earlier, failed call of ours)
            return
        raise ProtoquantError(f"{self.what} is being written by process {pid} on {host} (lock {self.path}): "
                              f"wait for it to finish; if that process is gone, delete {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def release_own_lock(out: str | Path) -> None:
    """Remove `out`'s lock when this process holds it (a lock taken in one function, released in another)."""
    path = OwnerLock(out, "").path
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
