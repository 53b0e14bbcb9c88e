"""Files protoquant writes and reads back: one atomic writer, JSON, logs and the safetensors artefact format.

    write_bytes_atomic / write_text_atomic   temp file beside the target, fsync, os.replace: a reader
                                             never sees half a file and a crash keeps the old version
    write_json / read_json                   strict JSON (NaN written as null); one-line errors on read
    write_log / iter_log                     a run's per-epoch log, one JSON object per line
    write_artifact / read_artifact           tensors + JSON fields in one safetensors file (no pickles):
                                             codebooks, heads, probes, groundings, checkpoints
    check_artifact_out                       an artefact's --out may replace only an artefact of its kind
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from pipeline.errors import ProtoquantError

ARTIFACT_FORMAT = "protoquant"
ARTIFACT_VERSION = 1
# The command that rebuilds each kind of artefact, quoted in format and fingerprint errors.
REBUILD_COMMANDS = {
    "codebook": "protoquant codebook {cache} -k K --out CODEBOOK",
    "head": "protoquant train {cache} --codebook CODEBOOK --out RUN",
    "probe": "protoquant train {cache} --codebook CODEBOOK --out RUN",
    "checkpoint": "protoquant train {cache} --codebook CODEBOOK --out RUN",
    "grounding": "protoquant gallery RUN --out DIR",
}


# --- the one atomic writer -------------------------------------------------------------------------------

def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


# --- JSON --------------------------------------------------------------------------------------------------

def _json_safe(value):
    """`value` with every NaN or infinity replaced by None: strict JSON has no such numbers, null says "none"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: str | Path, value) -> None:
    """Write strict JSON atomically (non-finite numbers become null)."""
    write_text_atomic(path, json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object; missing, unreadable, corrupt or non-object files give one line ending in `what`."""
    path = Path(path)
    if path.is_dir():
        raise ProtoquantError(f"{path} is a directory, not a JSON file: {what}")
    if not path.is_file():
        raise ProtoquantError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtoquantError(f"{path} is not readable JSON ({type(err).__name__}: {err}): {what}") from None
    if not isinstance(value, dict):
        raise ProtoquantError(f"{path} holds a JSON {type(value).__name__}, not an object: {what}")
    return value


def write_log(path: str | Path, records: list[dict]) -> None:
    """A per-epoch log: one JSON object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))


def iter_log(path: str | Path) -> Iterator[dict]:
    """Records of a log.jsonl; a corrupt line is one clear error naming the file and line."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            raise ProtoquantError(f"{path} line {number} is not JSON: the log is damaged; rerun the command "
                                  "that wrote it") from None


# --- safetensors artefacts -------------------------------------------------------------------------------

def write_artifact(path: str | Path, tensors: dict[str, torch.Tensor], *, kind: str, fields: dict) -> None:
    """Write tensors and JSON-encoded fields (header metadata, str -> str) to a safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": ARTIFACT_FORMAT, "kind": kind, "format_version": str(ARTIFACT_VERSION)}
    metadata |= {name: json.dumps(value, allow_nan=False) for name, value in fields.items()}
    tmp = _temp_beside(path)
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_artifact(path: Path, kind: str) -> bool:
    """`path` is a protoquant artefact of `kind` (read from the header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False
    return metadata.get("format") == ARTIFACT_FORMAT and metadata.get("kind") == kind


def check_artifact_out(path: str | Path, *, kind: str, inside_forbidden: list[Path] = (), option: str = "--out") -> None:
    """Refuse an output file that is a folder, lies inside an input (a cache, DATA), or exists and is not a
    protoquant `kind` (which it may replace: rebuilding a codebook in place is the common case)."""
    path = Path(path)
    target = path.resolve()
    for guarded in inside_forbidden:
        guarded = Path(guarded).resolve()
        if target == guarded or target.is_relative_to(guarded):
            raise ProtoquantError(f"{option} {path} lies inside {guarded}, an input of this command: write the {kind} "
                                  "somewhere else")
    if path.is_dir():
        raise ProtoquantError(f"{option} {path} is a directory: give the {kind} file to write, e.g. {path}/{kind}.safetensors")
    if path.is_symlink() or (path.exists() and not is_artifact(path, kind)):
        raise ProtoquantError(f"{option} {path} exists and is not a protoquant {kind}: choose another path "
                              f"(protoquant replaces only a {kind} it wrote)")


def read_artifact(path: str | Path, *, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by write_artifact -> (tensors on the CPU, decoded fields).

    Raises ProtoquantError naming the file when it is missing, not safetensors (a pickle renamed
    `.safetensors` included), not protoquant's, of another kind, or of a newer format version.
    """
    path = Path(path)
    rebuild = REBUILD_COMMANDS.get(kind, "the protoquant command that makes it").format(cache="CACHE")
    if path.is_dir():
        raise ProtoquantError(f"{kind} file {path} is a directory: pass the .safetensors file itself")
    if not path.is_file():
        raise ProtoquantError(f"{kind} file {path} does not exist: check the path, or make it with `{rebuild}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ProtoquantError(f"{path} is not a safetensors file ({err}): pass a {kind} written by protoquant, "
                              f"e.g. by `{rebuild}`") from None
    if metadata.get("format") != ARTIFACT_FORMAT:
        raise ProtoquantError(f"{path} is a safetensors file but not a protoquant {kind} (no protoquant "
                              f"metadata): pass a {kind} written by `{rebuild}`")
    if metadata.get("kind") != kind:
        raise ProtoquantError(f"{path} is a protoquant {metadata.get('kind')}, not a {kind}: pass a {kind} "
                              f"written by `{rebuild}`")
    try:
        version = int(metadata.get("format_version", "0"))
        reserved = {"format", "kind", "format_version"}
        fields = {name: json.loads(value) for name, value in metadata.items() if name not in reserved}
    except (ValueError, json.JSONDecodeError):
        raise ProtoquantError(f"{path} has damaged protoquant metadata: rebuild it with `{rebuild}`") from None
    if version > ARTIFACT_VERSION:
        raise ProtoquantError(f"{path} has format version {version}, newer than this protoquant reads "
                              f"({ARTIFACT_VERSION}): upgrade protoquant")
    return tensors, fields
