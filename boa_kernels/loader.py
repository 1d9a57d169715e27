"""Builds and caches the compiled extensions on first use (torch.utils.cpp_extension + ninja).

    cpp   csrc/cpu/*.cpp            ATen + at::parallel_for, -O3 -march=native, always where a C++ compiler exists
    cuda  csrc/cuda/*.cu + binding  only where torch sees a CUDA device and nvcc is found

Builds land in $BOA_CACHE/kernels (default ~/.cache/boa/kernels; the CPU build in a folder per CPU kind, since it
targets the CPU it is built on) and are rebuilt when a source changes. A build that
fails is reported in one line and the caller falls back to the next backend; the library never needs a compiler.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# fp-contract off: the kernels evaluate each product and difference separately, exactly as torch does, so that
# fp64 results equal the torch reference bit for bit. -fopenmp: at::parallel_for is a header template that runs
# serially unless the extension itself is compiled with OpenMP. -fno-math-errno (results unchanged) lets GCC call
# libmvec's vector exp/log inside `omp simd` loops (csrc/cpu/rounding.cpp).
CPU_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-fopenmp", "-fno-math-errno"]


def notice(message: str) -> None:
    print(f"boa_kernels: {message}", file=sys.stderr, flush=True)


def build_dir(name: str) -> Path:
    root = Path(os.environ.get("BOA_CACHE", Path.home() / ".cache" / "boa")).expanduser()
    path = root / "kernels" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(folder: Path):
    """Holds an exclusive lock on the build folder while torch builds or loads into it. torch's own lock there is a
    file that a killed process leaves behind, after which every later load waits forever; this lock (flock) dies
    with its process, so whoever holds it may clear a stale torch lock first."""
    with open(folder / "boa.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)  # torch's, left by a process killed while holding it
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cpu_signature() -> str:
    """A short hash of this CPU's instruction-set flags: -march=native builds go to a folder of their own per CPU
    kind, so a cache shared between machines (a home directory, an image) never serves a binary built for another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _sources(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in (CSRC / folder).iterdir() if p.suffix in suffixes)


@functools.cache
def load_cpu():
    """The C++ CPU extension module, or None (with a notice) where it cannot be built."""
    return _build_cpu("boa_cpu", "-march=native", f"cpu-{cpu_signature()}")


@functools.cache
def load_cpu_for(march: str):
    """The CPU extension compiled for another instruction set (`-march=x86-64-v3`: AVX2; `-march=x86-64`: the
    portable C++), so that a machine with AVX-512 can test the kernels' other paths; None where it cannot build."""
    tag = march.replace("-", "_")
    return _build_cpu(f"boa_cpu_{tag}", f"-march={march}", f"cpu-{tag}")


def _build_cpu(name: str, march: str, folder_name: str):
    if not CSRC.is_dir():
        notice(f"C++ sources not found at {CSRC} (install boa from its source tree for the CPU kernels); using torch")
        return None
    try:
        from torch.utils.cpp_extension import load

        folder = build_dir(folder_name)
        if not (folder / f"{name}.so").exists():
            notice("building the C++ CPU kernels (once, about a minute; cached in $BOA_CACHE/kernels)")
        flags = [march if f == "-march=native" else f for f in CPU_FLAGS]
        with build_lock(folder):
            return load(
                name=name, sources=_sources("cpu", (".cpp",)), extra_cflags=flags, extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC / "include")], build_directory=str(folder), verbose=False,
            )
    except Exception as err:  # a missing compiler or ninja must not stop quantization
        notice(f"could not build the C++ CPU kernels ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); using torch")
        return None


@functools.cache
def load_cuda():
    """The CUDA extension module, or None (with a notice) where it cannot be built."""
    try:
        import torch
        from torch.utils.cpp_extension import load

        if not torch.cuda.is_available():
            return None
        folder = build_dir("cuda")
        if not (folder / "boa_cuda.so").exists():
            notice("building the CUDA kernels (once, a few minutes; cached in $BOA_CACHE/kernels)")
        with build_lock(folder):
            return load(
                name="boa_cuda", sources=_sources("cuda", (".cu", ".cpp")),
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=["-O3", "-std=c++17"],
                extra_include_paths=[str(CSRC / "include")], build_directory=str(folder), verbose=False,
            )
    except Exception as err:
        notice(f"could not build the CUDA kernels ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); trying the next backend")
        return None
