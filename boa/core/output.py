"""Output folders, for every format boa writes: what may be replaced, and the `.partial` checkpoint beside them.

A run writing OUT keeps its checkpoint in OUT.partial while it works; the finished folder replaces OUT atomically
(boa.core.io.atomic_dir) and the checkpoint is then removed. Every format writes through `writing_output`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from boa.core.checkpoint import PROGRESS, Checkpoint
from boa.core.errors import BoaError
from boa.core.io import TEMP_TAG, atomic_dir


def read_manifest(folder, manifest: str) -> dict | None:
    """The JSON manifest `manifest` in `folder`, or None when there is none."""
    path = Path(folder) / manifest
    return json.loads(path.read_text()) if path.exists() else None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, need_bytes: int) -> None:
    """OUT (or, while it does not exist, the folder that will hold it and OUT.partial) can be written, and has room."""
    for path in (folder, folder.parent) if folder.exists() else (folder.parent,):
        existing = _nearest_existing(path.absolute())
        if not existing.is_dir():
            raise BoaError(f"output path {folder} lies under {existing}, which is a file; choose another --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise BoaError(f"cannot write to {existing} (no permission, or a read-only filesystem); choose another "
                           "--out")
    if need_bytes:
        free = shutil.disk_usage(_nearest_existing(folder.absolute())).free
        if free < need_bytes:
            raise BoaError(f"{folder} needs about {need_bytes / 2**30:.2f} GiB free, its filesystem has "
                           f"{free / 2**30:.2f} GiB; free some space or choose another --out")


def check_output(folder, manifest: str, fingerprint: str | None = None, writer: str = "boa",
                 need_bytes: int = 0) -> None:
    """Before any work: an output folder may be new, empty, or hold an earlier output of the same kind (the file
    `manifest`, and when `fingerprint` is given, this very run's) or an interrupted write of boa's; anything else is
    not boa's to replace. It must be writable and, with need_bytes, have that much room. `writer` names the command
    that writes such folders, for the message."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BoaError(f"output path {folder} is a file, not a folder; choose another --out")
    _check_writable(folder, need_bytes)
    if not folder.exists():
        return
    entries = list(folder.iterdir())
    if not entries or any(e.name.startswith(TEMP_TAG) for e in entries):  # empty, or boa's write was interrupted
        return
    found = read_manifest(folder, manifest)
    if found is None:
        raise BoaError(f"output folder {folder} is not empty and was not written by `{writer}`; "
                       "choose another --out or delete it first")
    if fingerprint is not None and found.get("fingerprint") != fingerprint:
        raise BoaError(f"output folder {folder} already holds a different model; choose another --out or delete it "
                       "first")


def partial_folder(out) -> Path:
    """Where a run writing `out` keeps its checkpoint."""
    return Path(f"{out}.partial")


def checkpoint_folder(out, resume: bool, restart: bool = False) -> Path:
    """The checkpoint folder of a run writing `out`. An earlier one is continued with `resume`, discarded with
    `restart`, and otherwise refused when it holds finished work (nothing is thrown away unasked); a folder of that
    name that boa did not write is never touched."""
    if resume and restart:
        raise BoaError("resume and restart contradict each other: --resume continues the checkpoint, --restart "
                       "discards it; give one")
    partial = partial_folder(out)
    if not partial.exists():
        return partial
    if not Checkpoint.owns(partial):
        raise BoaError(f"{partial} exists and was not written by boa (it would hold this run's checkpoint); move it "
                       "away or choose another --out")
    if resume:
        return partial
    done = Checkpoint.steps_done(partial)
    if done != 0 and not restart:
        what = f"{done} finished steps" if done is not None else "its progress record is damaged"
        raise BoaError(f"{partial} holds the checkpoint of an interrupted run ({what}); rerun with --resume to "
                       "continue it, or --restart to discard it")
    _remove_checkpoint(partial)
    return partial


def _remove_checkpoint(partial: Path) -> None:
    """Its progress record goes first: a kill during the removal then leaves no record naming steps whose files are
    gone (a later --resume would find that checkpoint damaged), only files that count as nothing finished."""
    (partial / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(partial)


def finish_output(out) -> None:
    """After `out` was written: its checkpoint has served its purpose (anything else of that name stays)."""
    partial = partial_folder(out)
    if partial.exists() and Checkpoint.owns(partial):
        _remove_checkpoint(partial)


@contextlib.contextmanager
def writing_output(folder, manifest: str, content: dict, *, fingerprint: str | None = None, writer: str = "boa",
                   checkpoint: bool = False):
    """Checks `folder` (check_output), yields a temporary folder beside it to fill, writes the JSON manifest
    `manifest` holding `content` into it last, and puts it in place of `folder` atomically. checkpoint: the run that
    produced it kept a checkpoint in folder.partial, which is removed once the folder is in place."""
    check_output(folder, manifest, fingerprint, writer)
    with atomic_dir(folder, last=manifest) as tmp:
        yield tmp
        (tmp / manifest).write_text(json.dumps(content, indent=2) + "\n")
    if checkpoint:
        finish_output(folder)
