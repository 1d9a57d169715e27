"""The cache folder and atomic writes: a file or folder appears whole or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$BOA_CACHE (default ~/.cache/boa), joined with parts, created if missing."""
    root = Path(os.environ.get("BOA_CACHE", Path.home() / ".cache" / "boa")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


TEMP_TAG = ".boa-tmp-"  # in the names of boa's temporaries, so stale ones (left by a kill) are known as boa's


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, mode: int) -> None:
    """mkdtemp / mkstemp create 0700 / 0600; what boa writes gets the permissions the user's umask gives."""
    os.chmod(path, mode & ~_umask())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _clear_stale(folder: Path, prefix: str) -> None:
    for stale in folder.glob(f"{prefix}*"):
        _remove(stale)


@contextlib.contextmanager
def atomic_dir(final: Path, last: str | None = None):
    """Yields a temporary folder to fill; it becomes `final` only if the block finishes.

    A new `final` appears whole (one rename). An existing folder (e.g. a mount point, which cannot be renamed over)
    is filled in place: its old entries are removed and the new files moved in one by one, `last` (the manifest that
    makes the folder valid) at the end. Temporaries a killed run left behind are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    in_place = final.is_dir()
    home = final if in_place else final.parent
    prefix = TEMP_TAG if in_place else f".{final.name}{TEMP_TAG}"
    _clear_stale(home, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=home))
    try:
        yield tmp
        _honour_umask(tmp, 0o777)
        if not in_place:
            os.replace(tmp, final)
            return
        if last is not None and (final / last).exists():
            (final / last).unlink()  # the old folder stops being valid before any of its files changes
        for old in final.iterdir():
            if old != tmp:
                _remove(old)
        for new in sorted(tmp.iterdir(), key=lambda p: p.name == last):
            os.replace(new, final / new.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yields a temporary path beside `final`; moves it over `final` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{TEMP_TAG}", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _honour_umask(Path(tmp), 0o666)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def hash_tensors(digest, tensors) -> None:
    """Feeds every tensor's name, shape, dtype and bytes to a hashlib digest (about a second per GB). tensors: a
    dict, or (name, tensor) pairs (read one at a time, so a model on disk is hashed in little memory)."""
    import torch

    for name, tensor in tensors.items() if isinstance(tensors, dict) else tensors:
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
