"""Where a model's weights are while it is quantized, behind one interface the block loop uses:

    weights.load(block)       # the block's parameters on the compute device
    ...                       # quantize it
    weights.release(block)    # its memory there is free again

`ResidentModel`: a model already in memory; load/release move a part to the compute device and back (a model in
host memory quantized on a GPU one block at a time), or do nothing when it is there already.
`StreamedModel`: models larger than memory: a skeleton whose parameters live on the meta device (no storage), each
part read from the checkpoint's safetensors shards when loaded (in the run's dtype, checked finite) and dropped
again on release.

Buffers computed at construction (RoPE's inv_freq) are built for real; checkpoint keys with or without the base
model's prefix ("model." / "bert.") and a tied head stored once under the embedding's name are both found.
"""
from __future__ import annotations

import contextlib
import math
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.shards import ShardReader
from boa.models.adapter import Adapter


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get meta parameters: nothing is allocated or initialised (an 8B model's random init
    alone would take minutes and 32 GB). Buffers are left alone, so the computed ones are real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config, adapter: Adapter, dtype: torch.dtype) -> nn.Module:
    """The model's skeleton in eval mode: parameters on the meta device in `dtype`, real buffers."""
    with _parameters_on_meta():
        model = adapter.model_class.from_config(config, dtype=dtype)
    return model.eval()


def checkpoint_dtype(config, reader: ShardReader) -> torch.dtype:
    """The dtype the checkpoint stores its weights in: config.json's, else its first floating-point tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for key in reader.keys():
        tensor = reader.get(key)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


class StreamedModel:
    """A model skeleton plus the shards its weights are read from (see the module docstring)."""

    def __init__(self, model: nn.Module, reader: ShardReader, device: torch.device, dtype: torch.dtype,
                 adapter: Adapter | None = None):
        self.model, self.reader, self.device, self.dtype = model, reader, torch.device(device), dtype
        self.adapter = adapter  # its names for tensors stored under other names or inside others (split models)
        self._prefix = getattr(model, "base_model_prefix", "")
        self.on_load: list = []  # callables(module) run on each module just read (a transform fusing itself)
        for module in model.modules():  # the computed buffers (rotary inv_freq, position ids) stay on the device
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        self._index_skeleton()

    def _index_skeleton(self) -> None:
        # every name a parameter is known by (a tied head shares the embedding's parameter)
        self._skeleton = dict(self.model.named_parameters(remove_duplicate=False))
        shared: dict[int, list[str]] = {}
        for name, param in self._skeleton.items():
            shared.setdefault(id(param), []).append(name)
        self._aliases = {name: names for names in shared.values() for name in names}
        self._module_names = {id(m): name for name, m in self.model.named_modules()}

    @classmethod
    def open(cls, folder: str | Path, config, adapter: Adapter, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> "StreamedModel":
        """The model in `folder`, split as boa runs it (fused projections in parts, MoE experts one module each:
        Adapter.split), each part read from wherever the checkpoint keeps it."""
        reader = ShardReader(folder)
        dtype = dtype or checkpoint_dtype(config, reader)
        streamed = cls(empty_model(config, adapter, dtype), reader, device, dtype, adapter)
        if adapter.splits:
            adapter.split(streamed.model)  # on the meta device: nothing is read or allocated
            streamed._index_skeleton()
        streamed._check_complete()
        return streamed

    def join(self) -> None:
        """The skeleton's fused projections joined back (Adapter.join), as the model stores them."""
        self.adapter.join(self.model)
        self._index_skeleton()

    def _key(self, name: str) -> str | None:
        """The checkpoint's key for a state-dict name (with or without the base model's prefix, or under the
        family's own checkpoint name), or None."""
        keys = self.reader.weight_map
        names = [name] if self.adapter is None else list(dict.fromkeys([name, self.adapter.checkpoint_name(name)]))
        candidates = []
        for candidate in names:
            candidates.append(candidate)
            if self._prefix:
                candidates += [candidate.removeprefix(self._prefix + "."), f"{self._prefix}.{candidate}"]
        return next((k for k in candidates if k in keys), None)

    def _source(self, name: str) -> tuple[str, tuple] | None:
        """(key, index): the checkpoint tensor holding parameter `name` and where in it (() for all of it)."""
        for alias in [name, *self._aliases.get(name, [])]:
            key = self._key(alias)
            if key is not None:
                return key, ()
        inside = self.adapter.stored_slice(name) if self.adapter is not None else None
        if inside is not None:
            key = self._key(inside[0])
            if key is not None:
                return key, inside[1]
        return None

    def _read(self, name: str) -> torch.Tensor:
        source = self._source(name)
        if source is None:
            raise BoaError(f"{self.reader.folder} has no tensor for {name} (nor a tied one)")
        return self.reader.get(*source)

    def _check_complete(self) -> None:
        """Every parameter has a tensor in the shards with its shape: a wrong or partial checkpoint fails now."""
        for name, param in self.model.named_parameters():
            source = self._source(name)
            if source is None:
                if self._is_output_head(name):
                    continue  # a head that transformers would re-tie; only needed to evaluate, checked then
                raise BoaError(f"{self.reader.folder} has no tensor for {name}; the shards do not hold this model "
                               "(config.json and the weights disagree, or a shard was cut short)")
            key, index = source
            shape = tuple(torch.empty(self.reader.shape(key), device="meta")[index].shape)
            if shape != tuple(param.shape):
                where = f"{key}{list(index) if index else ''}"
                raise BoaError(f"{self.reader.folder}: {where} has shape {shape}, the model expects "
                               f"{tuple(param.shape)}; config.json does not describe these weights")

    def _is_output_head(self, name: str) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and name.startswith(self._module_names.get(id(head), "\0") + ".")

    def load(self, module: nn.Module) -> nn.Module:
        """Reads `module`'s parameters from the shards onto the device, in the run's dtype."""
        prefix = self._module_names[id(module)]
        for local, _ in list(module.named_parameters()):
            name = f"{prefix}.{local}" if prefix else local
            tensor = self._read(name)
            if tensor.is_floating_point():
                if not torch.isfinite(tensor).all():
                    raise BoaError(f"weight {name} holds NaN/Inf; quantizing it would spread the damage. Repair or "
                                   "re-export the model")
                tensor = tensor.to(self.dtype)
            owner, leaf = _split(module, local)
            owner._parameters[leaf] = nn.Parameter(tensor.to(self.device), requires_grad=False)
        for fuse in self.on_load:
            fuse(module)
        return module

    def release(self, module: nn.Module) -> None:
        """Drops `module`'s weights: back to the skeleton's own meta parameters (so tied ones are one again)."""
        prefix = self._module_names[id(module)]
        for local, _ in list(module.named_parameters()):
            owner, leaf = _split(module, local)
            owner._parameters[leaf] = self._skeleton[f"{prefix}.{local}" if prefix else local]

    def outside_blocks(self, blocks_path: str) -> list[nn.Module]:
        return outside_blocks(self.model, blocks_path)

    def state_items(self):
        """(name, tensor) in state-dict order, each read when asked for, in the run's dtype: what a fingerprint
        of the model hashes, with one tensor in memory at a time."""
        for name, param in self.model.named_parameters():
            if self._source(name) is None:
                continue
            yield name, self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One state-dict tensor from the shards, in the run's dtype."""
        tensor = self._read(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def _split(module: nn.Module, local: str) -> tuple[nn.Module, str]:
    owner_path, _, leaf = local.rpartition(".")
    return (attrgetter(owner_path)(module) if owner_path else module), leaf


def outside_blocks(model: nn.Module, blocks_path: str) -> list[nn.Module]:
    """The modules with parameters or buffers of their own that sit before or around the blocks (embeddings,
    positions, rotary embedding, norms), not the blocks and not the output head: what a forward up to the first
    block needs."""
    head = model.get_output_embeddings()
    skip = {id(attrgetter(blocks_path)(model))} | ({id(head)} if head is not None else set())
    found = []

    def visit(module):
        if id(module) in skip:
            return
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            found.append(module)
        for child in module.children():
            visit(child)

    visit(model)
    return found


@contextlib.contextmanager
def loaded(weights: ResidentModel | StreamedModel, modules):
    """`modules`' weights loaded (a streamed model reads them from its shards) inside the block, released after it
    (an error too)."""
    try:
        for module in modules:
            weights.load(module)
        yield
    finally:
        for module in modules:
            weights.release(module)


class ResidentModel:
    """A model in memory (see the module docstring); parts move to `device` while they are used when the model
    lives elsewhere."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.model = model
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def _moves(self) -> bool:
        return self.device != self.home

    def load(self, module: nn.Module) -> nn.Module:
        return module.to(self.device) if self._moves() else module

    def release(self, module: nn.Module) -> None:
        if self._moves():
            module.to(self.home)

    def outside_blocks(self, blocks_path: str) -> list[nn.Module]:
        return outside_blocks(self.model, blocks_path)

    def state_items(self):
        return self.model.state_dict().items()


def weights_bytes(name_or_path: str, dtype: torch.dtype | None) -> int | None:
    """The bytes a local safetensors model's weights take in `dtype` (None: as stored), from the shards' headers
    alone; None where there is no such folder (a hub id, pickle weights)."""
    from boa.models.loader import model_folder

    folder = Path(model_folder(name_or_path))
    if not folder.is_dir():
        return None
    try:
        reader = ShardReader(folder)
    except BoaError:
        return None
    total = 0
    for key in reader.keys():
        numel = math.prod(reader.shape(key))
        stored = reader.dtype(key)
        total += numel * (dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize)
    return total
