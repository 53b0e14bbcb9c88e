"""Run directories: open, check, write, finish.

A run (`train` and `prune` write one) is a folder holding config.json (with the run format marker),
head.safetensors, probe.safetensors, metrics.json and log.jsonl. It is written into `.RUN.partial`
beside RUN (which also holds the checkpoint `--resume` continues from) and renamed onto RUN in one
step, so RUN is never half written. `--overwrite` replaces only a folder that is a protoquant run;
anything else at RUN is refused, never deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from pipeline.errors import ProtoquantError
from pipeline.io import read_json
from pipeline.paths import OwnerLock, check_output, release_own_lock, remove_ours

RUN_FORMAT = "protoquant-run"
RUN_VERSION = 1
RUN_FILES = ("config.json", "head.safetensors")
CHECKPOINT = "checkpoint.safetensors"


def work_dir_for(out: Path) -> Path:
    """The temporary directory beside RUN where a run is written (and resumed from) before the rename."""
    return out.parent / f".{out.name}.partial"


def is_run_dir(path: Path) -> bool:
    """A folder protoquant wrote as a run: its config.json names the run format (or, before the marker, a command)."""
    config = path / "config.json"
    if not path.is_dir() or not all((path / name).is_file() for name in RUN_FILES):
        return False
    try:
        value = read_json(config, "")
    except ProtoquantError:
        return False
    return value.get("format") == RUN_FORMAT or value.get("command") in ("train", "prune")


def check_run_out(out: Path, *, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse an --out that exists and is not a run protoquant may replace (pipeline.paths holds the rule),
    or that is, holds or lies inside one of the command's inputs (`sources`: the cache, the codebook, the run)."""
    if check_output(out, is_ours=is_run_dir, what="a run", overwrite=overwrite, sources=sources) and not overwrite:
        raise ProtoquantError(f"--out {out} already exists: choose another path, or pass --overwrite to replace it")


def _absent_or_empty(path: Path) -> bool:
    """Nothing to lose there: no such path, or an empty folder (a user's `mkdir` before the run)."""
    if path.is_symlink():
        return False
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


@dataclass(frozen=True)
class RunDir:
    """Where a run is being written, and what was found there."""

    work: Path
    resuming: bool
    discarded_checkpoint: bool  # a stopped run was there and was thrown away (no --resume)


def prepare_run_dir(out: Path, *, overwrite: bool, resume: bool, sources: Iterable[Path] = ()) -> RunDir:
    """Check RUN may be written, take its writer lock (`.RUN.lock`, released by finish_run_dir) and set up
    its work dir (resumed, or fresh). A second command writing the same RUN is refused, naming the first."""
    out = Path(out)
    check_run_out(out, overwrite=overwrite, sources=sources)
    OwnerLock(out, f"run {out}").acquire()
    work = work_dir_for(out)
    had_checkpoint = (work / CHECKPOINT).is_file()
    if resume and had_checkpoint:
        return RunDir(work, resuming=True, discarded_checkpoint=False)
    if resume:
        raise ProtoquantError(f"--resume: no stopped run to continue for {out} (no {work}/{CHECKPOINT}); "
                              "start it without --resume")
    if work.is_symlink() or work.is_file():
        raise ProtoquantError(f"{work} is in the way of the run's work folder and is not a folder: move it away")
    if work.exists():
        shutil.rmtree(work)  # named by us (.RUN.partial): only a stopped run lives there
    work.mkdir(parents=True)
    return RunDir(work, resuming=False, discarded_checkpoint=had_checkpoint)


def finish_run_dir(work: Path, out: Path) -> None:
    """Move the finished work dir onto RUN in one rename (an old run at RUN, with --overwrite, is removed after)."""
    (work / CHECKPOINT).unlink(missing_ok=True)
    try:
        _move_into_place(work, out)
    finally:
        release_own_lock(out)


def _move_into_place(work: Path, out: Path) -> None:
    if _absent_or_empty(out) and out.exists():
        out.rmdir()
    if out.exists():
        if not is_run_dir(out):  # checked at the start too; something else may have appeared since
            raise ProtoquantError(f"--out {out} appeared while the run was written and is not a run: the finished "
                                  f"run is kept in {work}; move it yourself")
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(work, out)
        remove_ours(trash, is_run_dir)
        return
    os.replace(work, out)


def run_config(fields: dict) -> dict:
    """A run's config.json content: the format marker first, then `fields`."""
    return {"format": RUN_FORMAT, "format_version": RUN_VERSION} | fields


def digest(values) -> str:
    """A short SHA-256 of an array's or tensor's bytes (codes as float32, rows as int64 by the caller)."""
    if torch.is_tensor(values):
        values = values.detach().float().cpu().contiguous().numpy()
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]


def train_run_config(cache, codebook_path, codebook_meta: dict, codes: torch.Tensor, settings, val_rows,
                     data: dict, extra: dict | None = None) -> dict:
    """The config.json of a trained run (train and sweep write the same one, so `train --config RUN` replays
    either): settings, the cache, the codebook and its codes' hash, the validation rows, the data path."""
    import platform
    from dataclasses import asdict
    from datetime import datetime, timezone
    from importlib.metadata import version

    return run_config({
        "command": "train",
        "settings": asdict(settings),
        "cache": {"path": str(cache.path.resolve()), "fingerprint": cache.fingerprint, "classes": cache.classes,
                  "grid": list(cache.grid), "dim": cache.dim, "provenance": cache.provenance},
        "codebook": {"path": str(Path(codebook_path).resolve()), "meta": codebook_meta, "codes_sha256": digest(codes)},
        "validation": {"split": "train", "fraction": settings.val_fraction, "seed": settings.seed,
                       "rows": int(len(val_rows)), "rows_sha256": digest(np.asarray(val_rows, dtype=np.int64))},
        "data": data,
        **(extra or {}),
        # timm's installed version read without importing timm (2 s of every train command)
        "versions": {"torch": torch.__version__.split("+")[0], "timm": version("timm"), "numpy": np.__version__,
                     "python": platform.python_version()},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


# --- reading a run -----------------------------------------------------------------------------------------

@dataclass
class Run:
    """A finished run directory: its config, the ProtoQuant head and how to rebuild the probe."""

    path: Path
    config: dict
    head: nn.Module
    classes: list[str]

    @property
    def cache_fingerprint(self) -> str:
        return self.config["cache"]["fingerprint"]

    @property
    def cache_path(self) -> str:
        return self.config["cache"]["path"]

    def reference_head(self, *, weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """The frozen reference classifier the run was trained through (linear probe or backbone head)."""
        from pipeline.model import backbone_head, load_probe

        if self.config["settings"].get("use_backbone_head"):
            return backbone_head(self.config["cache"]["provenance"], len(self.classes), weights=weights, device=device)
        probe, _, _ = load_probe(self.path / "probe.safetensors")
        return probe.to(device)


_CONFIG_SHAPE = {"settings": dict, "cache": dict}
_CACHE_SHAPE = {"path": str, "fingerprint": str, "provenance": dict}


def _check_config(config: dict, path: Path) -> None:
    """A config.json that is JSON but not a run's (edited, or another tool's) is one line, not a KeyError later."""
    where = path / "config.json"
    for key, kind in _CONFIG_SHAPE.items():
        if not isinstance(config.get(key), kind):
            raise ProtoquantError(f"{where} has no valid {key!r} entry: it is not a protoquant run's config "
                                  "(rerun `protoquant train` to rebuild the run)")
    for key, kind in _CACHE_SHAPE.items():
        if not isinstance(config["cache"].get(key), kind):
            raise ProtoquantError(f"{where}: cache.{key} is missing or not a {kind.__name__}: the config is damaged "
                                  "(rerun `protoquant train` to rebuild the run)")


def open_run(path: str | Path) -> Run:
    """Read RUN/config.json and RUN/head.safetensors; a clear error when RUN is not a finished run."""
    from pipeline.model import load_head

    path = Path(path)
    if not path.is_dir():
        partial = work_dir_for(path)
        if path.exists():
            raise ProtoquantError(f"run {path} is a file, not a run directory: pass the folder `protoquant train` wrote")
        hint = (f"; a stopped run is in {partial}: continue it with `protoquant train ... --out {path} --resume`"
                if (partial / CHECKPOINT).is_file() else "; make one with `protoquant train CACHE --codebook CODEBOOK --out RUN`")
        raise ProtoquantError(f"run {path} does not exist{hint}")
    config = read_json(path / "config.json", f"{path} is not a protoquant run (make one with `protoquant train`)")
    _check_config(config, path)
    head, classes, _ = load_head(path / "head.safetensors")
    return Run(path=path, config=config, head=head.eval(), classes=classes)


def check_run_matches_cache(run: Run, cache) -> None:
    """Refuse a cache other than the run's (fingerprint) or one of another feature dimension."""
    if cache.dim != run.head.feature_dim:
        raise ProtoquantError(f"run {run.path} works on {run.head.feature_dim}-dimensional features but cache "
                              f"{cache.path} holds {cache.dim}-dimensional ones: use the cache the run was trained on")
    if run.cache_fingerprint != cache.fingerprint:
        raise ProtoquantError(f"run {run.path} was trained on the cache with fingerprint {run.cache_fingerprint[:12]}..., "
                              f"but {cache.path} has {cache.fingerprint[:12]}...: pass --cache with the cache it was "
                              "trained on (recorded in its config.json)")


def open_run_and_cache(run_path: str | Path, cache_path: str | Path | None):
    """(Run, Cache): the cache is the one recorded in the run unless given; refused when they do not match."""
    from pipeline.cache import Cache

    run = open_run(run_path)
    if cache_path is None and not Path(run.cache_path).exists():
        raise ProtoquantError(f"run {run.path} was trained on the cache {run.cache_path}, which is not there any more: "
                              "pass --cache with its new path")
    cache = Cache(cache_path or run.cache_path)
    check_run_matches_cache(run, cache)
    return run, cache
