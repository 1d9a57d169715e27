"""Safetensors checkpoints of any size, one tensor at a time: `ShardReader` reads a model folder's tensors by name
(one model.safetensors, or shards listed in model.safetensors.index.json), `ShardWriter` writes them into shards of
at most `max_shard_bytes` with the Hugging Face index convention, holding one tensor in memory at a time.

    model.safetensors                                 one shard
    model-00001-of-00003.safetensors, ...             several, and
    model.safetensors.index.json                      {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, padded with spaces to a multiple of 8), then the data.
The writer appends each tensor's bytes to a data file as it comes and writes the header in front once the shard is
complete (a streamed copy), so a shard of any size costs one tensor of memory.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from boa.core.errors import BoaError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # 5 GB, the Hugging Face default

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}

_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


def parse_size(text: str | int) -> int:
    """Bytes from 5GB, 500MB, 2GiB or a plain number."""
    if isinstance(text, int):
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    value = text.strip().lower()
    for unit, factor in units.items():
        if value.endswith(unit):
            try:
                return int(float(value[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(value)
    except ValueError:
        raise BoaError(f"shard size {text!r}: give bytes or a size like 5GB, 500MB, 2GiB") from None


class ShardReader:
    """The tensors of a safetensors model folder, by name. Every shard the index names is checked up front, so a
    missing or unreadable one fails before any work."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise BoaError(f"{index} is damaged ({err}); copy the model folder again") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise BoaError(f"{self.folder} has neither {SINGLE} nor {INDEX}; copy the model's weight files into it")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise BoaError(f"{self.folder} is missing shard(s) {', '.join(missing)} named in {INDEX}; copy or "
                           "download the model folder again")
        self._files = {}
        self.weight_map: dict[str, str] = {}
        for name in files:
            try:
                handle = safe_open(str(self.folder / name), "pt")
            except (SafetensorError, OSError) as err:
                raise BoaError(f"{self.folder / name} is damaged or truncated ({' '.join(str(err).split())}); "
                               "copy or download the model folder again") from None
            self._files[name] = handle
            for key in handle.keys():
                self.weight_map[key] = name
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if self.weight_map.get(k) != f]
            if absent:
                raise BoaError(f"{INDEX} names tensors its shards do not hold ({', '.join(absent[:3])}); the folder "
                               "is damaged: copy or download it again")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[Path]:
        return [self.folder / f for f in self._files]

    def get(self, name: str, index: tuple = ()) -> torch.Tensor:
        """The tensor (or only tensor[index], read alone) in memory of its own: a tensor read through a file kept
        open stays a view of the file's mapping, whose pages then count as this process's memory (all of a 16 GB
        checkpoint once each tensor was read)."""
        if name not in self.weight_map:
            raise BoaError(f"{self.folder} holds no tensor {name!r}; the checkpoint does not match config.json")
        with safe_open(str(self.folder / self.weight_map[name]), "pt") as f:
            return (f.get_slice(name)[index] if index else f.get_tensor(name)).clone()

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (nothing is read)."""
        return tuple(self._files[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from the header."""
        return _FROM_CODE[self._files[self.weight_map[name]].get_slice(name).get_dtype()]

    def metadata(self) -> dict[str, str]:
        """The first shard's __metadata__ (boa writes the same into every shard)."""
        return next(iter(self._files.values())).metadata() or {}


class ShardWriter:
    """Writes tensors into `folder` as shards of at most max_shard_bytes (a larger tensor gets a shard of its own),
    each with `metadata` in its header; `finish()` names them as transformers does and writes the index when there
    are several. Use inside an atomically written folder: a failure leaves only temporary files there."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise BoaError(f"max shard size {max_shard_bytes} bytes: give a positive size (e.g. 5GB)")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self._shards: list[tuple[Path, dict]] = []  # finished: (file, weight names)
        self._entries: dict[str, dict] = {}
        self._data = None
        self._size = 0
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPES:
            raise BoaError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        if name in self._entries or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        if self._data is not None and self._size + data.nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self._shards)}.data", "wb")
            self._entries, self._size = {}, 0
        self._entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._size, self._size + data.nbytes]}
        self._data.write(data)
        self._size += data.nbytes
        self.total_size += data.nbytes

    def _close_shard(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.folder / f".shard-{len(self._shards)}.safetensors"
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        data_path.unlink()
        self._shards.append((path, dict(self._entries)))
        self._data = None

    def finish(self) -> list[str]:
        """Closes the last shard and names the files; returns their names."""
        if self._data is not None or not self._shards:
            if self._data is None:  # no tensor at all: one empty shard
                self._data = open(self.folder / f".shard-{len(self._shards)}.data", "wb")
                self._entries, self._size = {}, 0
            self._close_shard()
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, entries), name in zip(self._shards, names):
            os.replace(path, self.folder / name)
            weight_map.update({key: name for key in entries})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size, **self.metadata}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder written by ShardWriter (or transformers): the index's, else the one file."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / SINGLE]
