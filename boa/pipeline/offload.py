"""Where the calibration activations live between blocks: on the compute device, in host memory or on disk
(`ActivationCache`), and `choose_offload`, which picks the nearest of those they fit in ("auto")."""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from boa.core.errors import BoaError
from boa.core.io import TEMP_TAG, atomic_file, cache_dir

OFFLOADS = ("auto", "device", "cpu", "disk")
# The share of free memory the activations may take: the block, its FP copy and the statistics need the rest.
HEADROOM = 0.8


def host_free_memory() -> int | None:
    """Bytes of host memory a new allocation can take without swapping (Linux's MemAvailable; elsewhere the free
    physical pages where the system reports them), or None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take (a GPU's free memory; host memory for a CPU), or None where it
    cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_free_memory()


def choose_offload(requested: str, device: torch.device, nbytes: int) -> str:
    """Where `nbytes` of activations go: `requested`, or for "auto" the compute device if they fit there, else host
    memory, else disk. On a CPU device, host memory is the device."""
    if requested not in OFFLOADS:
        raise BoaError(f"offload={requested!r}: use one of {', '.join(OFFLOADS)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda" and nbytes <= HEADROOM * free_memory(device):
        return "device"
    free = host_free_memory()
    if free is None or nbytes <= HEADROOM * free:  # unknown: host memory, as a plain run would use
        return "device" if device.type == "cpu" else "cpu"
    return "disk"


def _own_folder(parent: Path | None, need_bytes: int) -> Path:
    """A new folder for one cache's files under `parent` (default: the boa cache), checked before any work."""
    try:
        parent = Path(parent) if parent is not None else cache_dir("activations")
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"activations{TEMP_TAG}", dir=parent))
    except OSError as err:
        raise BoaError(f"cannot write the activations to {parent} ({err.strerror or err}); choose another "
                       "--offload-dir") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        shutil.rmtree(folder)
        raise BoaError(f"the activations need about {need_bytes / 2**30:.2f} GiB in {parent}, its filesystem has "
                       f"{free / 2**30:.2f} GiB free; free some space or choose another --offload-dir")
    return folder


class ActivationCache:
    """One tensor per calibration batch, in order, kept on the compute device ("device"), in host memory ("cpu",
    pinned for a CUDA device so that copies back are asynchronous) or on disk ("disk": one safetensors file per
    batch in a folder of its own under `folder`, default the boa cache; `need_bytes` of room there is checked now).

    `cache[i]` and iteration give each tensor on the device in the dtype it was stored in; iteration fetches the
    next batch before handing out the current one. close() (or leaving a `with` block) frees the tensors and deletes
    the files; files still there when the process ends normally are deleted then."""

    def __init__(self, placement: str, device: torch.device, folder: str | Path | None = None,
                 need_bytes: int = 0):
        if placement not in OFFLOADS[1:]:
            raise BoaError(f"activation cache placement {placement!r}: use one of {', '.join(OFFLOADS[1:])}")
        self.placement = placement
        self.device = torch.device(device)
        self.parent = folder
        self._items: list = []  # tensors, or for "disk" the paths of their files
        self.folder = None
        self._remove_files = None
        if placement == "disk":
            self.folder = _own_folder(folder, need_bytes)
            self._remove_files = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def empty_like(self) -> ActivationCache:
        """An empty cache placed like this one (on disk: a folder of its own beside this one's)."""
        return ActivationCache(self.placement, self.device, self.parent)

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.placement == "device":
            self._items.append(x.to(self.device))
        elif self.placement == "cpu":
            if self.device.type == "cuda":
                self._items.append(torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x))
            else:
                self._items.append(x.to("cpu"))
        else:
            path = self.folder / f"{len(self._items):05d}.safetensors"
            with atomic_file(path) as tmp:  # a crash leaves no half-written file under the final name
                save_file({"x": x.to("cpu").contiguous()}, str(tmp))
            self._items.append(path)

    def stored(self, i: int) -> torch.Tensor:
        """Batch i where it is kept (read into host memory, for "disk"): for a checkpoint, which needs no trip
        through the device."""
        item = self._items[i]
        return load_file(item)["x"] if self.placement == "disk" else item

    def _fetch(self, i: int) -> torch.Tensor:
        # from pinned memory the copy is asynchronous: the host goes on queueing work while it runs
        return self.stored(i).to(self.device, non_blocking=self.placement == "cpu")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._fetch(i)

    def __iter__(self):
        ahead = self._fetch(0) if self._items else None
        for i in range(len(self._items)):
            current, ahead = ahead, self._fetch(i + 1) if i + 1 < len(self._items) else None
            yield current

    def close(self) -> None:
        self._items.clear()
        if self._remove_files is not None:
            self._remove_files()

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
