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
from typing import Any

from homeiq_trainer.messages import RUN_ID_PATTERN, utcnow

_LOGGER = logging.getLogger(__name__)

LATEST = "latest"
METADATA_FILE = "training_run.json"
STAGING_PREFIX = ".staging-"
_RUN_ID = re.compile(RUN_ID_PATTERN)
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", METADATA_FILE)


class ArtifactError(Exception):
    """A run directory cannot be used; the message says why."""


def new_run_identifier(taken: Iterable[str], output_dir: Path, now: datetime | None = None) -> str:
    """`run_YYYYMMDD_HHMMSS` (UTC), with a suffix when that second is taken already."""
    base = (now or utcnow()).strftime("run_%Y%m%d_%H%M%S")
    used = set(taken)
    candidate, n = base, 1
    while candidate in used or (output_dir / candidate).exists():
        candidate = f"{base}_{n}"
        n += 1
    return candidate


def staging_dir(output_dir: Path, run_identifier: str) -> Path:
    """Where a run writes before it is complete; never promoted from there."""
    return output_dir / f"{STAGING_PREFIX}{run_identifier}"


def trainer_scratch_dir(save_dir: Path) -> Path:
    """Where the HF Trainer may write while training into `save_dir`; removed after every run."""
    return save_dir.parent / f".trainer-{save_dir.name}"


def write_metadata(run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write `training_run.json` atomically (temp file, fsync, rename)."""
    path = run_dir / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def is_complete(run_dir: Path) -> bool:
    """Whether a run directory holds a whole adapter and its metadata."""
    return run_dir.is_dir() and all((run_dir / name).is_file() for name in REQUIRED_FILES)


def finalize(staging: Path, output_dir: Path, run_identifier: str) -> Path:
    """Move a fully written staging directory to its final name."""
    if not is_complete(staging):
        raise ArtifactError(f"run {run_identifier} is incomplete; not keeping it")
    final = output_dir / run_identifier
    _fsync_dir(staging)
    os.replace(staging, final)
    _fsync_dir(output_dir)
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
    _fsync_dir(output_dir)
    return output_dir / LATEST


def latest_run(output_dir: Path) -> str | None:
    """The run identifier `latest` points to, if it points to a complete run inside the output dir."""
    link = output_dir / LATEST
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    if not _RUN_ID.match(name) or not is_complete(output_dir / name):
        return None
    return name


def resolve_run_dir(output_dir: Path, reference: str) -> Path:
    """A complete run directory inside the output dir for `latest` or a run identifier, nothing else."""
    if reference == LATEST:
        name = latest_run(output_dir)
        if name is None:
            raise ArtifactError("resume_from=latest, but no completed run is promoted yet")
    elif _RUN_ID.match(reference):
        name = reference
    else:
        raise ArtifactError(f"resume_from must be 'latest' or a run identifier, got {reference[:40]!r}")
    root = output_dir.resolve()
    run_dir = (output_dir / name).resolve()
    if run_dir.parent != root:
        raise ArtifactError(f"run {name} is not inside {output_dir}")
    if not is_complete(run_dir):
        raise ArtifactError(f"run {name} has no complete adapter in {output_dir}")
    return run_dir


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """`training_run.json` of a run, or an empty dict if it is unreadable."""
    try:
        data = json.loads((run_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def apply_retention(output_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` run directories (never `latest`'s) and stale staging dirs."""
    if not output_dir.is_dir():
        return []
    protected = latest_run(output_dir)
    runs = sorted(
        (p.name for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_ID.match(p.name)),
        key=_run_sort_key,
        reverse=True,
    )
    removed = [name for name in runs[keep:] if name != protected]
    for name in removed:
        shutil.rmtree(output_dir / name, ignore_errors=True)
        _LOGGER.info("Retention: removed run directory %s", name)
    return removed


def remove_stale_staging(output_dir: Path) -> None:
    """Remove what crashed runs left half-written."""
    if not output_dir.is_dir():
        return
    for pattern in (f"{STAGING_PREFIX}*", ".trainer-*"):
        for path in output_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    for path in output_dir.glob(f".{LATEST}.*.tmp"):
        path.unlink(missing_ok=True)


def _run_sort_key(name: str) -> tuple[str, int]:
    # "run_YYYYMMDD_HHMMSS" is 19 characters; a same-second suffix follows after "_".
    suffix = name[20:]
    return (name[:19], int(suffix) if suffix.isdigit() else 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
