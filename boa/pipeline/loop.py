"""The block loop: quantize a model one decoder block at a time on calibration windows.

capture block 0's inputs once (BlockInputs) -> for each block: for each sequential group of layers ([q,k,v] -> [o]
-> [gate,up] -> [down]): run the block on the *quantized* path up to that group and gather the statistics the
method needs (GroupStatistics: input Hessians; BoA: attention row factors; TurboBoA: dX terms against the FP path,
which runs beside it on its own inputs), solve each layer (method.solve), write its dequantized weight back -> the
block's outputs are the next block's inputs -> checkpoint (the block's codes and the next inputs, one atomic step)
so that an interrupted run resumes from the last finished block.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from boa.algorithms import Method
from boa.config import QuantConfig
from boa.core.checkpoint import Checkpoint
from boa.core.checks import check_finite
from boa.core.errors import BoaError
from boa.core.gguf_grids import GGUF_TYPES
from boa.core.io import hash_tensors
from boa.core.memory import return_freed_memory
from boa.core.output import check_output, checkpoint_folder, partial_folder
from boa.core.quantizer import QuantizedWeight
from boa.core.ranks import Ranks
from boa.export.boa_format import MANIFEST
from boa.models.adapter import Adapter, adapter_for
from boa.models.fused import join_codes
from boa.models.weights import ResidentModel, StreamedModel, loaded
from boa.nn import check_not_quantized
from boa.pipeline.inputs import BlockInputs
from boa.pipeline.offload import free_memory
from boa.stats import GroupStatistics, run_fp_block
from boa_kernels import backend_for

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "boa-blocks"
# TurboBoA's FP path keeps every layer input of a block's windows from its one forward when they take at most this
# share of the free memory (SmolLM2 at 32 × 512 tokens: 0.3 GB), else recomputes them group by group.
KEEP_FP_FRACTION = 0.25


@dataclass
class QuantResult:
    model: nn.Module
    config: QuantConfig
    layers: Mapping[str, QuantizedWeight] = field(default_factory=dict)  # full module name -> codes and grids
    losses: dict[str, float] = field(default_factory=dict)             # each layer's objective (LayerStats.loss)
    seconds: float = 0.0
    fingerprint: str = ""
    calibration: dict | None = None  # the windows used: nsamples, seqlen, sha256 (callers may add corpus, seed)
    weights: ResidentModel | StreamedModel | None = None  # where the unquantized tensors are read from to save
    expert_tokens: dict[str, int] = field(default_factory=dict)  # MoE: each expert layer's routed calibration tokens


def run_fingerprint(model: nn.Module | ResidentModel | StreamedModel, config: QuantConfig,
                    calib: torch.Tensor | None, processes: int = 1) -> str:
    """Identifies (model weights, config, calibration windows, and how many processes share the run when more than
    one: their sums round differently), so a checkpoint or output folder is never mixed up. Hashes every tensor's
    bytes, one tensor in memory at a time (about a second per GB)."""
    weights = model if isinstance(model, (ResidentModel, StreamedModel)) else ResidentModel(model)
    digest = hashlib.blake2b(config.fingerprint().encode(), digest_size=16)
    if processes > 1:
        digest.update(f"processes={processes}".encode())
    digest.update(json.dumps(weights.model.config.to_dict(), sort_keys=True, default=str).encode())
    hash_tensors(digest, weights.state_items())
    if calib is not None:
        digest.update(calib.cpu().contiguous().numpy().data)
    return digest.hexdigest()


def calibration_record(calib: torch.Tensor) -> dict:
    """What identifies a set of calibration windows."""
    return {"nsamples": calib.shape[0], "seqlen": calib.shape[1],
            "sha256": hashlib.sha256(calib.cpu().contiguous().numpy().data).hexdigest()}


def _check_gguf_blocks(model: nn.Module, adapter: Adapter, method: Method) -> None:
    """GGUF grids: every layer's rows split into the type's blocks (K types: 256 weights), or the run is refused
    before any work, naming the types that fit."""
    kind = method.spec.gguf_type
    if kind is None:
        return
    widths = {adapter.blocks(model)[0].get_submodule(n).in_features for n in adapter.linear_names()}
    bad = sorted(w for w in widths if w % kind.row_multiple)
    if bad:
        fit = [t.name for t in GGUF_TYPES.values() if all(w % t.row_multiple == 0 for w in widths)]
        raise BoaError(f"{kind.name} stores rows in blocks of {kind.row_multiple} weights, and this model has rows of "
                       f"{', '.join(map(str, bad))}; types that fit every layer: {', '.join(fit) or 'none'}")


def _check_calibration(model: nn.Module, method: Method, calib: torch.Tensor | None) -> None:
    if method.needs().hessian and calib is None:
        raise BoaError(f"method {method.name!r} needs calibration windows: pass calib=boa.data.calibration_windows(...)")
    if calib is None:
        return
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise BoaError("calib must be a LongTensor (nsamples, seqlen) of token ids")
    if calib.numel() == 0:
        raise BoaError(f"calib holds no tokens (shape {tuple(calib.shape)}); give at least one window, e.g. "
                       "boa.data.calibration_windows(tokenizer, nsamples=128, seqlen=512)")
    vocab = model.get_input_embeddings().num_embeddings
    if calib.min() < 0 or calib.max() >= vocab:
        raise BoaError(
            f"calibration token ids span [{int(calib.min())}, {int(calib.max())}] but the model's vocabulary has "
            f"{vocab} entries; tokenize the calibration text with this model's tokenizer"
        )


def grids_as_saved(q: QuantizedWeight, method: Method, dtype: torch.dtype) -> QuantizedWeight:
    """q with its grids in the model's dtype (in place), so that the packed model computes what the quantized one
    does — except GGUF grids, which stay the float16-exact float32 values the file holds."""
    if method.spec.gguf is None:
        q.scale, q.zero = q.scale.to(dtype), q.zero.to(dtype)  # (only GGUF grids have offsets)
    return q


def _write_back(layer: nn.Linear, q: QuantizedWeight, method: Method) -> None:
    """The layer's weight becomes its dequantized codes on the grids as saved (for GGUF grids: their float32
    dequantization in the model's dtype)."""
    dtype = layer.weight.dtype
    layer.weight.data = grids_as_saved(q, method, dtype).dequantize().to(dtype).to(layer.weight.device)


def _save_block(checkpoint: Checkpoint, index: int, layers: dict[str, QuantizedWeight], losses: dict,
                inputs: BlockInputs | None) -> None:
    tensors = {}
    for name, q in layers.items():
        tensors.update({f"{name}.{part}": t for part, t in q.tensors().items()})
    meta = {"losses": losses, "bits": {n: q.bits for n, q in layers.items()}}
    checkpoint.save(index, tensors, meta, carry=None if inputs is None else inputs.state())


def _load_block(checkpoint: Checkpoint, index: int) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    tensors, meta = checkpoint.load(index)
    layers = {name: QuantizedWeight.from_tensors({k[len(name) + 1:]: t for k, t in tensors.items()
                                                  if k.startswith(f"{name}.")}, bits)
              for name, bits in meta["bits"].items()}
    return layers, meta["losses"]


def saved_size(model: nn.Module, adapter: Adapter, config: QuantConfig) -> int:
    """About how many bytes boa.save writes: the unquantized tensors as they are, each quantized weight at bits/8
    bytes a weight plus its grids (allowing 10% for them)."""
    bits = {f"{adapter.blocks_path}.{i}.{name}.weight": config.method_for(f"{adapter.blocks_path}.{i}.{name}").bits
            for i in range(len(adapter.blocks(model))) for name in adapter.linear_names()}
    total = 0
    for name, tensor in model.named_parameters():  # tied weights once (also on the meta device, where every
        # tensor's data_ptr is 0)
        total += int(tensor.numel() * bits[name] / 8 * 1.1) if name in bits else tensor.numel() * tensor.element_size()
    return total


def _open_checkpoint(out, checkpoint_dir, resume: bool, restart: bool, fingerprint: str,
                     need_bytes: int, ranks: Ranks) -> Checkpoint | None:
    """The run's checkpoint: beside the output folder (checked first: nothing is worked on for a folder that cannot
    be written or lacks room), or in checkpoint_dir, or none. Rank 0 alone discards an earlier checkpoint."""
    if out is not None:
        check_output(out, MANIFEST, fingerprint, writer="boa quantize", need_bytes=need_bytes)
        checkpoint_dir = checkpoint_folder(out, resume, restart) if ranks.main else partial_folder(out)
    elif resume and not checkpoint_dir:
        raise BoaError("resume=True needs the output folder (out=) or checkpoint_dir of the interrupted run")
    ranks.barrier("the checkpoint folder")
    return Checkpoint(checkpoint_dir, fingerprint, CHECKPOINT_KIND, ranks) if checkpoint_dir else None


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _share_layer(q: QuantizedWeight | None, owner: int, ranks: Ranks, shape: tuple[int, int],
                 device: torch.device) -> QuantizedWeight:
    """The owner rank's solve of a (rows, cols) layer, on every rank."""
    meta = torch.zeros(5, dtype=torch.int64, device=device)  # groups, scale dtype, zero dtype, bits, has offsets
    if q is not None:
        meta.copy_(torch.tensor([q.scale.shape[1], _DTYPES.index(q.scale.dtype), _DTYPES.index(q.zero.dtype),
                                 q.bits, int(q.offset is not None)]))
    groups, scale_dtype, zero_dtype, bits, offsets = ranks.broadcast_(meta, owner, "a layer's grid shape").tolist()
    rows, cols = shape
    if q is None:
        grid = {"dtype": _DTYPES[scale_dtype], "device": device}
        q = QuantizedWeight(torch.empty(rows, cols, dtype=torch.uint8, device=device),
                            torch.empty(rows, groups, **grid),
                            torch.empty(rows, groups, dtype=_DTYPES[zero_dtype], device=device),
                            torch.empty(cols, dtype=torch.int32, device=device), bits,
                            torch.empty(rows, groups, **grid) if offsets else None)
    for tensor in q.tensors().values():
        ranks.broadcast_(tensor, owner, "a solved layer's codes")
    return q


def _solve_cost(layer: nn.Linear) -> float:
    """About what a layer's solve costs: its Hessian's factorisation and the column pass."""
    rows, cols = layer.weight.shape
    return float(cols) ** 3 + float(rows) * cols * cols


def quantize_block(block: nn.Module, method: Method, adapter: Adapter, groups: list[list[str]],
                   statistics: GroupStatistics | None, inputs: BlockInputs | None, hessian_dtype: torch.dtype,
                   progress: bool = True, bar=None, ranks: Ranks = Ranks.single(), method_for=None
                   ) -> tuple[dict[str, QuantizedWeight], dict[str, float], list | None]:
    """Quantizes one block in place, group by group: (codes per layer, loss per layer, the FP path's outputs when
    the dX correction runs). method_for(name): the method of a layer at its own width (mixed precision; default:
    `method` for every layer). With several ranks each layer of a group is solved on its owner rank (balanced by
    cost), all of them in parallel, then every rank receives every solve."""
    modules = dict(block.named_modules())
    layers, losses = {}, {}
    # the FP path: this block before quantization, on the FP path's inputs (TurboBoA's dX reference)
    fp = None
    if inputs is not None and inputs.fp is not None:
        free = free_memory(next(block.parameters()).device)
        fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, method.needs().attention,
                          out=inputs.fp.empty_like(), keep_budget=0 if free is None else int(KEEP_FP_FRACTION * free))
    for group in groups:
        stats = statistics(block, group, inputs.hidden, inputs.kwargs, fp) if statistics is not None else {}
        owners = ranks.owners({name: _solve_cost(modules[name]) for name in group})
        solved = {}
        for name in group:
            if owners[name] == ranks.rank:
                W = modules[name].weight.detach()
                solver = method_for(name) if method_for is not None else method
                solved[name] = solver.solve(W.to(hessian_dtype if stats.get(name) else torch.float32),
                                            stats.get(name), qkv=name in adapter.qkv,
                                            progress=name if progress else None)
        for name in group:
            layer, layer_stats = modules[name], stats.get(name)
            q = solved.get(name)
            if ranks.distributed:
                q = _share_layer(q, owners[name], ranks, tuple(layer.weight.shape), layer.weight.device)
            W = layer.weight.detach()  # the weights before: _write_back gives the layer new storage
            _write_back(layer, q, method)
            layers[name] = q
            losses[name] = layer_stats.loss(W, layer.weight) if layer_stats else float("nan")
            if layer_stats:
                log.info("%s loss %.6g", name, losses[name])
                if bar is not None:
                    bar.set_postfix_str(f"{name.split('.')[-1]} loss {losses[name]:.4g}")
        del stats, solved
        return_freed_memory()  # the group's statistics and solver temporaries
    return layers, losses, None if fp is None else fp.outputs


class CheckpointLayers(Mapping):
    """The codes of a streamed run, read from its checkpoint block by block when asked for (keeping every block's
    codes in memory would take a byte a weight: 8 GB for an 8B model), under the names the model stores them by
    (a fused projection's parts joined: Adapter.stored_linear_names)."""

    def __init__(self, checkpoint: Checkpoint, adapter: Adapter, n_blocks: int):
        self.checkpoint, self.adapter = checkpoint, adapter
        self._blocks = [[f"{adapter.blocks_path}.{i}.{n}" for n in adapter.stored_linear_names()]
                        for i in range(n_blocks)]
        self._block_of = {name: i for i, block in enumerate(self._blocks) for name in block}
        self._cached: tuple[int, dict] | None = None

    def __getitem__(self, name: str) -> QuantizedWeight:
        index = self._block_of[name]
        if self._cached is None or self._cached[0] != index:
            if not Checkpoint.owns(self.checkpoint.folder):
                raise BoaError(f"the codes of this streamed run were in {self.checkpoint.folder}, which is gone (the "
                               "result was saved, and saving removes it): load the saved folder with boa.load")
            layers, _ = _load_block(self.checkpoint, index)
            join_codes(layers, self.adapter, "")
            prefix = f"{self.adapter.blocks_path}.{index}."
            self._cached = (index, {prefix + n: q for n, q in layers.items()})
        return self._cached[1][name]

    def __iter__(self):
        return (name for block in self._blocks for name in block)

    def __len__(self) -> int:
        return len(self._block_of)


def default_device() -> torch.device:
    """A GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weights(model, device) -> ResidentModel | StreamedModel:
    if isinstance(model, StreamedModel):
        if device is not None and torch.device(device) != model.device:
            raise BoaError(f"this streamed model reads its weights onto {model.device}; open it with "
                           f"device={str(device)!r} (boa.models.stream_model(..., device=...)) instead")
        return model
    if not isinstance(model, nn.Module):
        raise BoaError(f"model must be a torch module or a boa.models.StreamedModel, not {type(model).__name__}")
    return ResidentModel(model, device if device is not None else default_device())


def capture_inputs(weights: ResidentModel | StreamedModel, adapter: Adapter, calib: torch.Tensor, dtype: torch.dtype,
                   with_fp: bool, offload: str, offload_dir, fp_windows: int = 0) -> BlockInputs:
    """The first block's inputs on the calibration windows (BlockInputs.capture), with what lies outside the blocks
    (embeddings) loaded for it."""
    with loaded(weights, weights.outside_blocks(adapter.blocks_path)):
        return BlockInputs.capture(weights.model, adapter.blocks(weights.model), calib, dtype, with_fp,
                                   offload=offload, offload_dir=offload_dir, fp_windows=fp_windows)


def _split_fused(weights: ResidentModel | StreamedModel, adapter: Adapter) -> None:
    """Fused projections (Phi-3's qkv_proj, gate_up_proj) and experts (MoE) split into their parts for the run
    (boa.models.fused, boa.models.experts)."""
    if adapter.splits and not isinstance(weights, StreamedModel):  # a streamed one is split when opened
        adapter.split(weights.model)


def _apply_transforms(config: QuantConfig, weights: ResidentModel | StreamedModel, adapter: Adapter) -> None:
    """The config's transforms on the model, once: the model keeps their run-time hooks (online rotations), and
    `boa_transforms` records them so that a second run on the same model is refused instead of rotating twice."""
    model = weights.model
    if getattr(model, "boa_transforms", ()):
        raise BoaError("this model was already transformed by an earlier boa.quantize run (it holds "
                       f"{[t.name for t in model.boa_transforms]}); quantize a freshly loaded model instead")
    if not config.transforms:
        return
    for transform in config.transforms:
        if isinstance(weights, StreamedModel):  # fused into each module as it is read from the shards
            weights.on_load.append(functools.partial(transform.fuse_loaded, model, adapter, raw=weights.tensor))
            transform.attach_for_calibration(model, adapter)
        else:
            transform.apply(model, adapter)
    model.boa_transforms = config.transforms


def quantize(
    model: nn.Module | StreamedModel,
    config: QuantConfig | Method,
    calib: torch.Tensor | None = None,
    *,
    adapter: Adapter | None = None,
    device: str | torch.device | None = None,
    offload: str = "auto",
    offload_dir: str | Path | None = None,
    out: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    on_block_done=None,
) -> QuantResult:
    """Quantizes `model` block by block and returns the codes.

    model: a model in memory (quantized in place: its linear weights become their fake-quantized values), or a
    StreamedModel (boa.models.stream_model: a skeleton whose blocks are read from the checkpoint's shards one at a
    time; its codes stay in the run's checkpoint until boa.save, so it needs `out` or `checkpoint_dir`).
    config: a QuantConfig, or just a method (boa.GPTQ(...), boa.TurboBoA(...), ...) with the default run settings.
    calib: LongTensor (nsamples, seqlen) of token ids (see boa.data.calibration_windows); RTN needs none.
    device: where each block is quantized (default: a GPU if there is one); a model in memory elsewhere has each
    block moved there while it is worked on, and back.
    offload: where the calibration activations are kept: "device", "cpu" (host memory, pinned for a GPU), "disk"
    (files under offload_dir, default $BOA_CACHE/activations), or "auto": the first of these they fit in.
    out: the folder the result will be saved to (boa.save): checked before any work, and its checkpoint OUT.partial
    keeps each finished block: resume=True continues from it, restart=True discards it, and without either an
    earlier run's finished blocks there are refused rather than thrown away.
    checkpoint_dir: a checkpoint folder without an output folder (what `out` picks itself).
    on_block_done(index): called after each block's checkpoint (used by tests to interrupt a run).

    Under torchrun (torch.distributed initialised) every process calls this with the same arguments: each takes its
    share of the windows, statistics are summed across processes, each layer is solved on one of them and shared,
    rank 0 writes the checkpoint's progress; every process returns the same result.
    """
    start = time.perf_counter()
    ranks = Ranks.current()
    config = config if isinstance(config, QuantConfig) else QuantConfig(config)
    config.validate()  # settings changed after construction are checked too
    method = config.method
    needs = method.needs()
    weights = _weights(model, device)
    streamed = isinstance(weights, StreamedModel)
    model = weights.model
    adapter = adapter or adapter_for(model.config)
    check_not_quantized(model)
    if not streamed:
        check_finite(model)  # a streamed model's blocks are checked as they are read
    elif out is None and checkpoint_dir is None:
        raise BoaError("a streamed model keeps its codes in the run's checkpoint until it is saved: pass out= (the "
                       "folder boa.save will write) or checkpoint_dir=")
    _split_fused(weights, adapter)
    _apply_transforms(config, weights, adapter)
    kernel_backend = backend_for(weights.device)  # a bad BOA_KERNELS fails now, not mid-run
    log.info("column pass kernels: %s", kernel_backend)
    _check_gguf_blocks(model, adapter, method)
    _check_calibration(model, method, calib)
    calib = calib if needs.hessian else None
    fingerprint = run_fingerprint(weights, config, calib, ranks.world)
    checkpoint = _open_checkpoint(out, checkpoint_dir, resume, restart, fingerprint,
                                  saved_size(model, adapter, config) if out is not None else 0, ranks)
    first = checkpoint.next_step() if (checkpoint and resume) else 0
    result = QuantResult(model, config, fingerprint=fingerprint,
                         calibration=None if calib is None else calibration_record(calib), weights=weights)

    blocks = adapter.blocks(model)
    hessian_dtype = getattr(torch, config.hessian_dtype)
    inputs = statistics = None
    if needs.hessian:
        inputs = capture_inputs(weights, adapter, ranks.share(calib), getattr(torch, config.cache_dtype), needs.dx,
                                offload, offload_dir, fp_windows=-(-needs.dx_windows // ranks.world))  # a share each
        if first > 0:
            inputs.restore(checkpoint.load_carry(), first)
        statistics = GroupStatistics(model, adapter, needs, hessian_dtype, ranks)

    groups = adapter.sequential_groups() if config.true_sequential else [adapter.linear_names()]
    progress = progress and ranks.main
    bar = tqdm(range(len(blocks)), desc=method.label, disable=not progress, unit="block")
    try:
        for index in bar:
            block = blocks[index]
            prefix = f"{adapter.blocks_path}.{index}."
            if index < first:  # finished before an interruption: its codes (a streamed run reads them later)
                layers, losses = _load_block(checkpoint, index)
                if not streamed:
                    modules = dict(block.named_modules())
                    for name, q in layers.items():
                        _write_back(modules[name], q, method)
            else:
                weights.load(block)
                with torch.no_grad():
                    layers, losses, fp_outputs = quantize_block(
                        block, method, adapter, groups, statistics, inputs, hessian_dtype, progress, bar, ranks,
                        method_for=lambda name: config.method_for(prefix + name))
                    if inputs is not None:
                        inputs.advance(block, fp_outputs)
                if statistics is not None:
                    result.expert_tokens.update({prefix + n: c for n, c in statistics.tokens.items()})
                    statistics.tokens.clear()
                weights.release(block)
                return_freed_memory()
                if checkpoint:
                    _save_block(checkpoint, index, layers, losses, inputs)
                if on_block_done:
                    on_block_done(index)
            if not streamed:
                result.layers.update({prefix + n: q for n, q in layers.items()})
            result.losses.update({prefix + n: v for n, v in losses.items()})
    finally:  # disk caches go now, not at exit
        if inputs is not None:
            inputs.close()
    for transform in config.transforms:  # run-time parts from their calibration state to inference's
        transform.finish(model, adapter)
    if streamed:  # fused projections stored as the model has them
        weights.join()
        result.layers = CheckpointLayers(checkpoint, adapter, len(blocks))
    else:
        adapter.join(model, result.layers)
    result.seconds = time.perf_counter() - start
    return result
