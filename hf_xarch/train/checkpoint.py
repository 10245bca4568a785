"""Atomic, verifiable training checkpoints on top of ``Accelerator.save_state``.

A checkpoint is written into ``.tmp-checkpoint-XXXXXXXX`` and renamed to ``checkpoint-XXXXXXXX`` only when complete
(a rename within one file system is atomic), with a manifest of every file's size and SHA-256 written last. A
folder whose manifest is missing or disagrees with its files - a run killed mid-write, a truncated copy - is
skipped with a warning and the next older one is used. Accelerate stores the model, optimizer, gradient scaler,
registered objects (our LR scheduler) and every process's RNG states; ``trainer_state.json`` holds the step and the
data position.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every folder named like a checkpoint, newest first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            return f"{name} is missing"
        if file_path.stat().st_size != expected["size"]:
            return f"{name} has {file_path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(file_path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under `folder`; incomplete or corrupt ones are skipped with a warning."""
    for _, path in list_checkpoints(folder):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def save_checkpoint(accelerator, folder: str | Path, step: int, trainer_state: dict, keep_last: int | None) -> Path:
    """Write the full training state for `step` atomically; then delete all but the newest `keep_last`.

    Called on every process (each saves its own RNG state); only the main process writes the manifest, renames
    and prunes, between barriers so no process reads a half-made folder."""
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    temporary = folder / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if temporary.exists():  # left over from a run killed mid-write
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        files = {}
        for file_path in sorted(p for p in temporary.rglob("*") if p.is_file()):
            name = file_path.relative_to(temporary).as_posix()
            files[name] = {"size": file_path.stat().st_size, "sha256": _sha256(file_path)}
            with open(file_path, "rb") as handle:
                os.fsync(handle.fileno())
        manifest = temporary / MANIFEST
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=1))
        with open(manifest, "rb") as handle:
            os.fsync(handle.fileno())
        if final.exists():  # a re-run of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_dir(folder)
        if keep_last:
            for _, old in list_checkpoints(folder)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states from `path` and return its trainer state."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER_STATE).read_text())
