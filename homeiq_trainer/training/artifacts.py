"""Run directories, `training_run.json`, the `latest` symlink and retention."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from homeiq_trainer.messages import RUN_ID_PATTERN, RunMetadata, ServedAdapter, json_safe, utcnow

_LOGGER = logging.getLogger(__name__)

LATEST = "latest"
CURRENT_FILE = "current.json"
METADATA_FILE = "training_run.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGING_PREFIX = ".staging-"
_RUN_ID = re.compile(RUN_ID_PATTERN)
REQUIRED_FILES = ("adapter_config.json", ADAPTER_WEIGHTS, METADATA_FILE)
# Bytes per element of the safetensors dtypes peft writes.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class ArtifactError(Exception):
    """A run directory cannot be used; the message says why."""


def new_run_identifier(taken: Iterable[str], output_dir: Path, now: datetime | None = None) -> str:
    """`run_YYYYMMDD_HHMMSS` (UTC), with a suffix when that second is taken already.

    Never sorting below a run that exists: after the clock was set back (a Raspberry Pi without a
    battery-backed clock, before NTP answers) the new run takes the newest one's time and the next
    suffix, as retention keeps the newest by identifier and would delete the new run first.
    """
    used = set(taken)
    if output_dir.is_dir():
        used.update(path.name for path in output_dir.iterdir())
    base = (now or utcnow()).strftime("run_%Y%m%d_%H%M%S")
    candidate, n = base, 1
    newest = max((name for name in used if _RUN_ID.match(name)), key=_run_sort_key, default=None)
    if newest is not None and _run_sort_key(newest) > (base, 0):
        base, n = newest[:19], _run_sort_key(newest)[1] + 1
        candidate = f"{base}_{n}"
    while candidate in used:
        candidate = f"{base}_{n}"
        n += 1
    return candidate


def staging_dir(output_dir: Path, run_identifier: str) -> Path:
    """Where a run writes before it is complete; never promoted from there."""
    return output_dir / f"{STAGING_PREFIX}{run_identifier}"


def trainer_scratch_dir(save_dir: Path) -> Path:
    """Where the HF Trainer may write while training into `save_dir`; removed after every run."""
    return save_dir.parent / f".trainer-{save_dir.name}"


def write_metadata(run_dir: Path, metadata: RunMetadata) -> Path:
    """Write `training_run.json` atomically (temp file, fsync, rename); non-finite numbers become null."""
    return _write_json(run_dir / METADATA_FILE, metadata)


_Record = TypeVar("_Record", bound=BaseModel)


def _write_json(path: Path, record: BaseModel) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        data = json_safe(record.model_dump(mode="json"))
        json.dump(data, handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


def check_safetensors(path: Path) -> None:
    """Raise `ArtifactError` unless the file's header parses and its tensors fill the file exactly."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len <= 0 or 8 + header_len > size:
            raise ArtifactError(f"{path.name} has no valid header ({size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise ArtifactError(f"{path.name} has an unreadable header") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name} has a header that is no table of tensors")
    tensors = [value for key, value in header.items() if key != "__metadata__"]
    end = 0
    for tensor in tensors:
        try:
            start, stop = (int(offset) for offset in tensor["data_offsets"])
            count = 1
            for dim in tensor["shape"]:
                count *= int(dim)
            width = _DTYPE_BYTES.get(tensor["dtype"], 1)
        except (KeyError, TypeError, ValueError):  # valid JSON, but not what safetensors writes
            raise ArtifactError(f"{path.name} has a tensor without a valid dtype, shape or offsets") from None
        if stop - start != count * width:
            raise ArtifactError(f"{path.name}: a tensor's size does not match its shape")
        end = max(end, stop)
    if not tensors or end != size - 8 - header_len:
        raise ArtifactError(f"{path.name} is truncated or padded: {size} bytes, header says {8 + header_len + end}")


def is_complete(run_dir: Path) -> bool:
    """Whether a run directory holds a whole adapter and its metadata."""
    return run_dir.is_dir() and all((run_dir / name).is_file() for name in REQUIRED_FILES)


def finalize(staging: Path, output_dir: Path, run_identifier: str) -> Path:
    """Check, fsync every file and directory of, then rename a fully written staging directory.

    After a power cut the run directory is either absent or whole: nothing is renamed before it is
    on disk.
    """
    if not is_complete(staging):
        raise ArtifactError(f"run {run_identifier} is incomplete; not keeping it")
    check_safetensors(staging / ADAPTER_WEIGHTS)
    directories = [staging]
    for path in sorted(staging.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            _fsync(path)
    for directory in reversed(directories):
        _fsync(directory)
    final = output_dir / run_identifier
    os.replace(staging, final)
    _fsync(output_dir)
    return final


def promote(output_dir: Path, run_identifier: str) -> Path:
    """Point `<output_dir>/latest` at a run: a new symlink renamed over the old one, so never absent."""
    target = output_dir / run_identifier
    if not is_complete(target):
        raise ArtifactError(f"refusing to promote incomplete run {run_identifier}")
    tmp_link = output_dir / f".{LATEST}.{os.getpid()}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    # Relative, so the output dir can be moved or mounted elsewhere (the add-on's /share).
    os.symlink(run_identifier, tmp_link)
    os.replace(tmp_link, output_dir / LATEST)
    _fsync(output_dir)
    return output_dir / LATEST


def write_current(output_dir: Path, record: ServedAdapter | None) -> None:
    """Replace `current.json` (what `latest` serves, for readers that cannot follow symlinks) atomically."""
    path = output_dir / CURRENT_FILE
    if record is None:
        path.unlink(missing_ok=True)
        _fsync(output_dir)
        return
    _write_json(path, record)


def _read_json(path: Path, model: type[_Record]) -> _Record:
    """The file read by `model`; the model's defaults (every field unknown) when absent or unreadable."""
    try:
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return model()


def read_current(output_dir: Path) -> ServedAdapter:
    """`current.json`; every field None when it is absent or unreadable."""
    return _read_json(output_dir / CURRENT_FILE, ServedAdapter)


def latest_run(output_dir: Path) -> str | None:
    """The run identifier `latest` points to, if it points to a complete run inside the output dir."""
    link = output_dir / LATEST
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    if not _RUN_ID.match(name) or not is_complete(output_dir / name):
        return None
    return name


def resolve_run_dir(output_dir: Path, reference: str, given_as: str = "resume_from") -> Path:
    """A complete run directory inside the output dir for `latest` or a run identifier, nothing else.

    `given_as` names the option the reference came in, for the error.
    """
    if reference == LATEST:
        name = latest_run(output_dir)
        if name is None:
            raise ArtifactError(f"{given_as}=latest, but no adapter is served yet from {output_dir}")
    elif _RUN_ID.match(reference):
        name = reference
    else:
        raise ArtifactError(f"{given_as} must be 'latest' or a run identifier, got {reference[:40]!r}")
    root = output_dir.resolve()
    run_dir = (output_dir / name).resolve()
    if run_dir.parent != root:
        raise ArtifactError(f"run {name} is not inside {output_dir}")
    if not is_complete(run_dir):
        raise ArtifactError(f"run {name} has no complete adapter in {output_dir}")
    return run_dir


def adapter_base_model(run_dir: Path) -> str | None:
    """The base model peft's `adapter_config.json` of a run names, or None where it names none or cannot be read."""
    try:
        config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def read_metadata(run_dir: Path) -> RunMetadata:
    """`training_run.json` of a run; every field None when it is absent or unreadable."""
    return _read_json(run_dir / METADATA_FILE, RunMetadata)


def apply_retention(output_dir: Path, keep: int, protected: Iterable[str] = ()) -> list[str]:
    """Delete all but the newest `keep` run directories; never `latest`'s nor any `protected` one."""
    kept = {*protected, latest_run(output_dir)}
    removed = [name for name in run_directories(output_dir)[keep:] if name not in kept]
    for name in removed:
        shutil.rmtree(output_dir / name, ignore_errors=True)
        _LOGGER.info("Retention: removed run directory %s", name)
    return removed


def run_directories(output_dir: Path) -> list[str]:
    """The names of the run directories in `output_dir`, newest first."""
    if not output_dir.is_dir():
        return []
    return sorted(
        (p.name for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_ID.match(p.name)),
        key=_run_sort_key,
        reverse=True,
    )


def remove_stale_staging(output_dir: Path) -> None:
    """Remove what crashed runs left half-written."""
    if not output_dir.is_dir():
        return
    for pattern in (f"{STAGING_PREFIX}*", ".trainer-*"):
        for path in output_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    for pattern in (f".{LATEST}.*.tmp", f".{CURRENT_FILE}.*.tmp"):
        for path in output_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _run_sort_key(name: str) -> tuple[str, int]:
    # "run_YYYYMMDD_HHMMSS" is 19 characters; a same-second suffix follows after "_".
    suffix = name[20:]
    return (name[:19], int(suffix) if suffix.isdigit() else 0)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
