"""The block loop: quantize a model one decoder block at a time on calibration windows.

capture block 0's inputs once -> for each block: for each sequential group of layers ([q,k,v] -> [o] -> [gate,up]
-> [down]): run the block on the *quantized* path up to that group, gather each layer's statistics (input Hessian;
BoA: attention row factors; TurboBoA: dX terms against the FP path, which runs beside it on its own inputs), solve
the layers, write their dequantized weights back -> the block's outputs are the next block's inputs -> checkpoint
(codes + next inputs, atomically) so that an interrupted run resumes from the last finished block.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from boa.algorithms import needs_statistics, solve_layer
from boa.config import QuantConfig
from boa.errors import BoaError
from boa.io import atomic_file, hash_tensors, write_json
from boa.models.adapter import Adapter, adapter_for
from boa.models.loader import check_finite
from boa.quant.quantizer import QuantizedWeight
from boa.stats import AttentionRecorder, LayerStats, StopForward, attention_layer_stats, collect_statistics
from boa.stats.collect import run_block, run_fp_block
from boa_kernels import backend_for

log = logging.getLogger(__name__)

FORWARD_BATCH = 8  # calibration windows per block forward


@dataclass
class QuantResult:
    model: nn.Module
    config: QuantConfig
    layers: dict[str, QuantizedWeight] = field(default_factory=dict)  # full module name -> codes and grids
    losses: dict[str, float] = field(default_factory=dict)             # each layer's objective (LayerStats.loss)
    seconds: float = 0.0
    fingerprint: str = ""


def run_fingerprint(model: nn.Module, config: QuantConfig, calib: torch.Tensor | None) -> str:
    """Identifies (model weights, config, calibration windows), so a checkpoint or output folder is never mixed up.
    Hashes every tensor's bytes (about a second per GB)."""
    digest = hashlib.blake2b(config.fingerprint().encode(), digest_size=16)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    hash_tensors(digest, model.state_dict())
    if calib is not None:
        digest.update(calib.cpu().contiguous().numpy().data)
    return digest.hexdigest()


def _capture_block_inputs(model, first_block, calib, dtype):
    """Runs the model up to its first block on each batch of windows: (hidden states, that call's kwargs) per batch."""
    captured = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.append((hidden.detach().to(dtype), kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in calib.split(FORWARD_BATCH):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return [h for h, _ in captured], [kw for _, kw in captured]


class _Checkpoint:
    """Codes of finished blocks and the next block's inputs, written atomically into one folder."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.progress = self.folder / "progress.json"

    def next_block(self) -> int:
        """Where a resumed run starts: 0 if there is no usable checkpoint."""
        if not self.progress.exists():
            return 0
        state = json.loads(self.progress.read_text())
        if state["fingerprint"] != self.fingerprint:
            raise BoaError(
                f"the checkpoint in {self.folder} belongs to a different run (model, settings or calibration "
                "differ); drop --resume to start over, or delete that folder"
            )
        return state["next_block"]

    def save(self, index: int, layers: dict[str, QuantizedWeight], losses: dict, inputs: list[torch.Tensor],
             fp_inputs: list[torch.Tensor] | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, q in layers.items():
            tensors.update({f"{name}.codes": q.codes, f"{name}.scale": q.scale, f"{name}.zero": q.zero,
                            f"{name}.g_idx": q.g_idx})
        meta = {"losses": json.dumps(losses), "bits": json.dumps({n: q.bits for n, q in layers.items()})}
        with atomic_file(self.folder / f"block_{index:04d}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        with atomic_file(self.folder / "inputs.safetensors") as tmp:
            tensors = {f"batch_{i}": x.contiguous() for i, x in enumerate(inputs)}
            tensors.update({f"fp_batch_{i}": x.contiguous() for i, x in enumerate(fp_inputs or [])})
            save_file(tensors, str(tmp))
        write_json(self.progress, {"fingerprint": self.fingerprint, "next_block": index + 1})

    def load_block(self, index: int) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
        from safetensors import safe_open

        path = self.folder / f"block_{index:04d}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        bits = json.loads(meta["bits"])
        layers = {
            name: QuantizedWeight(tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.zero"],
                                  tensors[f"{name}.g_idx"], b)
            for name, b in bits.items()
        }
        return layers, json.loads(meta["losses"])

    def load_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The next block's inputs on the quantized path and (dX correction) on the FP path."""
        tensors = load_file(str(self.folder / "inputs.safetensors"))
        n = sum(1 for name in tensors if name.startswith("batch_"))
        fp = [tensors[f"fp_batch_{i}"] for i in range(n)] if "fp_batch_0" in tensors else None
        return [tensors[f"batch_{i}"] for i in range(n)], fp


def _write_back(layer: nn.Linear, q: QuantizedWeight) -> None:
    dtype = layer.weight.dtype
    q.scale, q.zero = q.scale.to(dtype), q.zero.to(dtype)
    layer.weight.data = q.dequantize().to(dtype).to(layer.weight.device)


class _GroupStatistics:
    """Gathers a group's LayerStats: input Hessians for every layer (plus dX terms when an FP block is given) and,
    for BoA's q/k/v group, the attention row factors."""

    def __init__(self, model, adapter: Adapter, config: QuantConfig):
        self.model, self.adapter, self.config = model, adapter, config
        self.dtype = getattr(torch, config.hessian_dtype)
        self._rotary = {}  # seqlen -> rotary matrices (or None without RoPE), the same for every block

    def _rotary_matrices(self, block, seqlen):
        if seqlen not in self._rotary:
            attention = dict(block.named_modules())[self.adapter.attention]
            self._rotary[seqlen] = self.adapter.rotary_matrices(self.model, attention, seqlen)
        return self._rotary[seqlen]

    def __call__(self, block, group, inputs, kwargs, fp=None) -> dict[str, LayerStats]:
        adapter = self.adapter
        recorder = None
        if self.config.attention_aware and adapter.v_proj in group:
            recorder = AttentionRecorder(values=True, dtype=self.dtype, stop=group[-1] in adapter.qkv)
        hessians = collect_statistics(block, group, inputs, kwargs, self.dtype, fp=fp, recorder=recorder,
                                      adapter=adapter)
        stats = {name: LayerStats(acc.H, D=acc.D) for name, acc in hessians.items()}
        if recorder is not None:
            shared = hessians[adapter.q_proj]
            if not (hessians[adapter.k_proj] is shared and hessians[adapter.v_proj] is shared):
                raise BoaError("BoA needs q_proj, k_proj and v_proj to read the same input; this model's adapter "
                               "does not fit that (use --method gptq)")
            rotary = self._rotary_matrices(block, recorder.seqlen)
            stats.update(attention_layer_stats(adapter, block, shared, recorder.finish(), rotary,
                                               self.config.v_row_factor))
        return stats


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    *,
    adapter: Adapter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done=None,
) -> QuantResult:
    """Quantizes `model` in place (its linear weights become their fake-quantized values) and returns the codes.

    calib: LongTensor (nsamples, seqlen) of token ids (see boa.data.calibration_windows); RTN needs none.
    checkpoint_dir: where each finished block is saved; with resume=True a run continues from there.
    on_block_done(index): called after each block's checkpoint (used by tests to interrupt a run).
    """
    start = time.perf_counter()
    adapter = adapter or adapter_for(model.config)
    check_finite(model)
    kernel_backend = backend_for(next(model.parameters()).device)  # a bad BOA_KERNELS fails now, not mid-run
    log.info("column pass kernels: %s", kernel_backend)
    if needs_statistics(config) and calib is None:
        raise BoaError(f"method {config.method!r} needs calibration windows: pass calib=boa.data.calibration_windows(...)")
    if calib is not None and (calib.dim() != 2 or calib.dtype != torch.long):
        raise BoaError("calib must be a LongTensor (nsamples, seqlen) of token ids")
    vocab = model.get_input_embeddings().num_embeddings
    if calib is not None and (calib.min() < 0 or calib.max() >= vocab):
        raise BoaError(
            f"calibration token ids span [{int(calib.min())}, {int(calib.max())}] but the model's vocabulary has "
            f"{vocab} entries; tokenize the calibration text with this model's tokenizer"
        )
    if resume and not checkpoint_dir:
        raise BoaError("resume=True needs the checkpoint_dir of the interrupted run (the CLI: --out with --resume)")
    fingerprint = run_fingerprint(model, config, calib if needs_statistics(config) else None)
    result = QuantResult(model, config, fingerprint=fingerprint)
    checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint) if checkpoint_dir else None
    first = checkpoint.next_block() if (checkpoint and resume) else 0

    blocks = adapter.blocks(model)
    cache_dtype = getattr(torch, config.cache_dtype)
    hessian_dtype = getattr(torch, config.hessian_dtype)
    with_dx = needs_statistics(config) and config.dx_alpha > 0
    inputs = kwargs = fp_inputs = None
    if needs_statistics(config):
        with torch.no_grad():
            inputs, kwargs = _capture_block_inputs(model, blocks[0], calib, cache_dtype)
        fp_inputs = [x.clone() for x in inputs] if with_dx else None
        if first > 0:
            inputs, fp_inputs = checkpoint.load_inputs()
    statistics = _GroupStatistics(model, adapter, config)

    groups = adapter.sequential_groups() if config.true_sequential else [adapter.linear_names()]
    bar = tqdm(range(len(blocks)), desc=f"{config.method} w{config.bits}", disable=not progress, unit="block")
    for index in bar:
        block = blocks[index]
        modules = dict(block.named_modules())
        prefix = f"{adapter.blocks_path}.{index}."
        if index < first:  # finished before the interruption: restore its codes
            layers, losses = checkpoint.load_block(index)
            for name, q in layers.items():
                _write_back(modules[name], q)
            result.layers.update({prefix + n: q for n, q in layers.items()})
            result.losses.update({prefix + n: v for n, v in losses.items()})
            continue
        block_layers, block_losses = {}, {}
        with torch.no_grad():
            # the FP path: this block before quantization, on the FP path's inputs (TurboBoA's dX reference)
            fp = run_fp_block(block, adapter, fp_inputs, kwargs, cache_dtype, config.attention_aware) if with_dx else None
            for group in groups:
                stats = statistics(block, group, inputs, kwargs, fp) if needs_statistics(config) else {}
                for name in group:
                    layer, layer_stats = modules[name], stats.get(name)
                    W = layer.weight.detach()
                    q = solve_layer(W.to(hessian_dtype if layer_stats else torch.float32), layer_stats, config,
                                    qkv=name in adapter.qkv, progress=name if progress else None)
                    _write_back(layer, q)
                    block_layers[name] = q
                    block_losses[name] = layer_stats.loss(W, layer.weight) if layer_stats else float("nan")
                    if layer_stats:
                        log.info("block %d %s loss %.6g", index, name, block_losses[name])
                        bar.set_postfix_str(f"{name.split('.')[-1]} loss {block_losses[name]:.4g}")
            if inputs is not None:
                inputs = run_block(block, inputs, kwargs, cache_dtype)
            if fp is not None:
                fp_inputs = fp.outputs
                del fp
        result.layers.update({prefix + n: q for n, q in block_layers.items()})
        result.losses.update({prefix + n: v for n, v in block_losses.items()})
        if checkpoint:
            checkpoint.save(index, block_layers, block_losses, inputs or [], fp_inputs)
        if on_block_done:
            on_block_done(index)
    result.seconds = time.perf_counter() - start
    return result
