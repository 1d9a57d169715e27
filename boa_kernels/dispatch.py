"""Which backend runs an op: CUDA > Triton on a GPU, C++ on a CPU, torch everywhere else.

`BOA_KERNELS=torch|cpp|triton|cuda` puts one backend first. A backend that cannot run here (no device, no compiler,
no triton) is reported once in one line and the next one is used; torch always runs. Triton runs on CPU tensors only
under `TRITON_INTERPRET=1` (how the tests check it without a GPU).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from boa_kernels.loader import load_cpu, load_cuda, notice

BACKENDS = ("cuda", "triton", "cpp", "torch")
ENV = "BOA_KERNELS"


class BackendError(ValueError):
    """BOA_KERNELS names no backend."""


def requested() -> str | None:
    name = os.environ.get(ENV, "").strip().lower()
    if name and name not in BACKENDS:
        raise BackendError(f"{ENV}={name!r} is not a kernel backend; use one of {', '.join(BACKENDS)} (or unset it)")
    return name or None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run ops on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return "the C++ kernels run on CPU tensors only"
        return None if load_cpu() is not None else "the C++ extension did not build"
    if backend == "cuda":
        if device.type != "cuda":
            return "no CUDA tensors"
        return None if load_cuda() is not None else "the CUDA extension did not build"
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not triton_interpreted():
        return "triton needs a GPU, or TRITON_INTERPRET=1 on a CPU"
    return None


@functools.cache
def _report(backend: str, reason: str) -> None:
    notice(f"{ENV}={backend} cannot run here ({reason}); using the next backend")


def backend_for(device: torch.device | str, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs an op on `device`, among those the op `implemented` (torch always is)."""
    device = torch.device(device)
    order = ["cuda", "triton", "torch"] if device.type == "cuda" else ["cpp", "torch"]
    forced = requested()
    if forced:
        order = [forced] + [b for b in order if b != forced]
    for backend in order:
        if backend not in implemented and backend != "torch":
            continue
        reason = _why_not(backend, device)
        if reason is None:
            return backend
        if backend == forced:
            _report(backend, reason)
    return "torch"
