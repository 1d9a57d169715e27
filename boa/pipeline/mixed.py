"""Mixed precision to a size budget: each layer's width (bits, group size) chosen so that the quantized layers average
`target_bits` bits a weight as boa saves them (codes, scales, zeros, perm: the packed layout's bytes), at the least
total loss.

1. measure (`measure_widths`): one pass over the unquantized model's blocks on the calibration windows; each layer's
   input Hessian H is gathered once, the layer is solved at every candidate width by the run's method without its
   attention terms (`sensitivity_method`: GPTQ on the same grid settings; RTN as it is), and its loss
   tr(ΔW H ΔWᵀ) and packed bytes are recorded. Layers are measured on unquantized inputs, all at once.
2. allocate (`allocate`): the multiple-choice knapsack  min Σ_u loss_u(w_u)  s.t.  Σ_u bytes_u(w_u) ≤ budget  over
   the stored layers u (a fused projection's parts share a width), solved exactly by dynamic programming over the
   budget in units of at most budget / resolution bytes; each size is rounded up to whole units, so a plan never
   exceeds the budget, and is the optimum where the unit is one byte.

The losses are each layer's output error on the calibration set: what GPTQ-type solvers minimise, summed across
layers as though their errors added up independently in the model's loss (the usual proxy; nothing here runs a
backward pass).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from boa.algorithms import GPTQ, Method, Needs
from boa.config import QuantConfig
from boa.core.errors import BoaError
from boa.core.io import write_json
from boa.core.memory import return_freed_memory
from boa.core.packed import pack
from boa.core.ranks import Ranks
from boa.models.adapter import Adapter, adapter_for
from boa.models.weights import StreamedModel
from boa.pipeline.loop import _split_fused, _weights, capture_inputs, run_fingerprint
from boa.stats import GroupStatistics

# (bits, group_size), -1: per channel. Around 3 bits: 2-bit in groups of 64 to 4-bit in groups of 128.
DEFAULT_WIDTHS = ((2, 64), (3, -1), (3, 128), (4, -1), (4, 128))
RESOLUTION = 100_000  # budget units of the knapsack (finer: closer to the exact optimum, more memory and time)


def parse_widths(text: str) -> tuple[tuple[int, int], ...]:
    """"2g64,3,3g128,4" → ((2, 64), (3, -1), (3, 128), (4, -1))."""
    widths = []
    for item in text.split(","):
        bits, _, group = item.strip().lower().partition("g")
        try:
            widths.append((int(bits), int(group) if group else -1))
        except ValueError:
            raise BoaError(f"width {item!r} is not BITS or BITSgGROUP (e.g. 3, 4g128)") from None
    if len(set(widths)) != len(widths) or not widths:
        raise BoaError(f"widths {text!r}: give each width once, e.g. 2g64,3,3g128,4,4g128")
    return tuple(widths)


def width_label(width: tuple[int, int]) -> str:
    bits, group = width
    return f"{bits}" if group == -1 else f"{bits}g{group}"


def sensitivity_method(method: Method) -> Method:
    """What measures a layer at each width: the run's method if it reads no more than input Hessians (RTN, GPTQ),
    else GPTQ on its grid settings (BoA / TurboBoA; aespa: those of the method it starts from)."""
    base = getattr(method, "init", method)  # aespa: the method its rounding starts from
    needs = base.needs()
    if not needs.attention and not needs.dx:
        return base
    return GPTQ.from_dict({**base.to_dict(), "dx_alpha": 0.0, "refine_iters": 0})


@dataclass
class Measurement:
    """Per stored layer (full name; a fused projection's parts summed): its weights' count, and per width its loss
    and packed bytes."""

    numel: dict[str, int]
    loss: dict[str, dict[tuple[int, int], float]]
    nbytes: dict[str, dict[tuple[int, int], int]]

    def to_dict(self) -> dict:
        return {name: {"numel": self.numel[name],
                                  "widths": {width_label(w): [self.loss[name][w], self.nbytes[name][w]]
                                             for w in self.loss[name]}} for name in self.numel}

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        widths = {name: {parse_widths(label)[0]: v for label, v in entry["widths"].items()}
                  for name, entry in data.items()}
        return cls({name: entry["numel"] for name, entry in data.items()},
                   {name: {w: v[0] for w, v in ws.items()} for name, ws in widths.items()},
                   {name: {w: v[1] for w, v in ws.items()} for name, ws in widths.items()})


def _stored_units(adapter: Adapter, prefix: str) -> dict[str, list[str]]:
    """{stored layer: the run's layers it is made of} within a block (a fused projection: its parts)."""
    units: dict[str, list[str]] = {}
    fused = adapter.fused_projections()
    for name in adapter.linear_names():
        path = name.rsplit(".", 1)[0]
        units.setdefault(prefix + (path if path in fused else name), []).append(prefix + name)
    return units


def run_units(model, adapter: Adapter | None = None) -> dict[str, list[str]]:
    """{stored layer: its run layers} over the whole model: the units that get one width each."""
    adapter = adapter or adapter_for(model.config)
    units = {}
    for index in range(len(adapter.blocks(model))):
        units.update(_stored_units(adapter, f"{adapter.blocks_path}.{index}."))
    return units


def measure_widths(model, calib: torch.Tensor, method: Method, widths=DEFAULT_WIDTHS, *,
                   adapter: Adapter | None = None, hessian_dtype: str = "float32", cache_dtype: str = "float32",
                   device=None, offload: str = "auto", offload_dir=None, cache: str | Path | None = None,
                   progress: bool = True) -> Measurement:
    """Each layer's loss and packed bytes at each width (module docstring). The model is left as it was. cache: a
    folder where measurements are kept by what they depend on (the model's weights, the windows, the method and
    widths), so that choosing for another budget measures nothing again."""
    proxy = sensitivity_method(method)
    widths = tuple(tuple(w) for w in widths)
    solvers = {w: proxy.with_width(*w) for w in widths}  # a width the method cannot take fails before any work
    weights = _weights(model, device)
    model = weights.model
    adapter = adapter or adapter_for(model.config)
    if getattr(model, "boa_transforms", ()):
        raise BoaError("mixed precision measures the model before its transforms, and this one was already transformed; "
                       "load it afresh")
    key_config = QuantConfig(proxy, hessian_dtype=hessian_dtype, true_sequential=False)
    path = None
    if cache is not None:
        key = hashlib.sha256((run_fingerprint(weights, key_config, calib) + repr(widths)).encode()).hexdigest()[:24]
        path = Path(cache) / f"{key}.json"
        if path.exists():
            return Measurement.from_dict(json.loads(path.read_text()))

    ranks = Ranks.current()
    _split_fused(weights, adapter)
    dtype = getattr(torch, hessian_dtype)
    inputs = capture_inputs(weights, adapter, ranks.share(calib), getattr(torch, cache_dtype), False, offload,
                            offload_dir)
    statistics = GroupStatistics(model, adapter, Needs(hessian=True), dtype, ranks)
    names = adapter.linear_names()
    blocks = adapter.blocks(model)
    measured = Measurement({}, {}, {})
    try:
        for index in tqdm(range(len(blocks)), desc="measuring widths", disable=not (progress and ranks.main),
                          unit="block"):
            block = blocks[index]
            weights.load(block)
            modules = dict(block.named_modules())
            with torch.no_grad():
                stats = statistics(block, names, inputs.hidden, inputs.kwargs)
                for unit, parts in _stored_units(adapter, "").items():
                    name = f"{adapter.blocks_path}.{index}.{unit}"
                    measured.numel[name] = sum(modules[p].weight.numel() for p in parts)
                    measured.loss[name], measured.nbytes[name] = {}, {}
                    for width, solver in solvers.items():
                        loss = nbytes = 0
                        for part in parts:
                            W = modules[part].weight.detach()
                            q = solver.solve(W.to(dtype), stats[part], qkv=part in adapter.qkv)
                            loss += stats[part].loss(W, q.dequantize())
                            nbytes += pack(q).nbytes()
                        measured.loss[name][width], measured.nbytes[name][width] = loss, nbytes
                del stats
                inputs.advance(block, None)
            weights.release(block)
            return_freed_memory()
    finally:
        inputs.close()
        if not isinstance(weights, StreamedModel):  # a streamed model stays split, as it was opened
            adapter.join(model)
    if path is not None and ranks.main:
        write_json(path, measured.to_dict())
    return measured


def allocate(options: Mapping[str, list[tuple[int, float]]], budget: int,
             resolution: int = RESOLUTION) -> dict[str, int]:
    """{unit: index of its chosen option} minimising Σ loss with Σ bytes ≤ budget; options: {unit: [(bytes, loss)]}.
    Exact where budget ≤ resolution (one-byte units); else sizes are rounded up to units of ⌈budget / resolution⌉
    bytes (never over the budget, at most one unit a layer short of the optimum)."""
    names = list(options)
    step = max(1, math.ceil(budget / resolution))
    capacity = budget // step
    smallest = sum(min(b for b, _ in options[n]) for n in names)
    if smallest > budget:
        raise BoaError(f"the budget of {budget} bytes is below {smallest}, what the narrowest widths take; raise "
                       "--target-bits or offer narrower widths (--widths)")
    best = np.full(capacity + 1, np.inf)  # best[c]: the least loss of the units so far in exactly c units of bytes
    best[0] = 0.0
    choice = np.zeros((len(names), capacity + 1), dtype=np.int16)
    for i, name in enumerate(names):
        new = np.full(capacity + 1, np.inf)
        for j, (nbytes, loss) in enumerate(options[name]):
            if not math.isfinite(loss):
                raise BoaError(f"{name}: its loss at option {j} is {loss}; the measurement failed")
            cost = math.ceil(nbytes / step)
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[:capacity + 1 - cost] + loss
            better = candidate < new
            new[better] = candidate[better]
            choice[i, better] = j
        best = new
    if not np.isfinite(best).any():
        raise BoaError(f"no choice of widths fits {budget} bytes once sizes are rounded to {step}-byte units; raise "
                       "--target-bits a little")
    spent = int(np.argmin(best))
    picked = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(choice[i, spent])
        picked[names[i]] = j
        spent -= math.ceil(options[names[i]][j][0] / step)
    return {name: picked[name] for name in names}


def plan_widths(measured: Measurement, target_bits: float) -> tuple[dict[str, tuple[int, int]], float]:
    """({stored layer: its width}, the average bits a weight that stores) for `target_bits` bits a weight over the
    measured layers."""
    if not isinstance(target_bits, (int, float)) or isinstance(target_bits, bool) or target_bits <= 0:
        raise BoaError(f"target_bits={target_bits!r} must be a positive number of bits a weight, e.g. 3.0")
    total = sum(measured.numel.values())
    widths = {name: list(measured.loss[name]) for name in measured.numel}
    options = {name: [(measured.nbytes[name][w], measured.loss[name][w]) for w in widths[name]] for name in widths}
    chosen = allocate(options, int(target_bits * total / 8))
    spent = sum(options[name][j][0] for name, j in chosen.items())
    return {name: widths[name][j] for name, j in chosen.items()}, 8 * spent / total


@dataclass
class MixedPrecision:
    config: QuantConfig                     # the run's config, with each layer's width (QuantConfig.widths)
    chosen: dict[str, tuple[int, int]]      # stored layer -> (bits, group_size)
    bits: float                             # average bits a weight the choice stores (scales and zeros included)

    def summary(self) -> dict[str, int]:
        """{width label: how many stored layers have it}, narrowest first."""
        counts = Counter(self.chosen.values())
        return {width_label(w): counts[w] for w in sorted(counts)}


def mixed_precision(model, calib: torch.Tensor, config: QuantConfig, target_bits: float, widths=DEFAULT_WIDTHS,
                    **measure_options) -> MixedPrecision:
    """`config` with a width per layer for `target_bits` bits a weight over the quantized layers, from
    measure_widths (its options: adapter, device, offload, cache, progress, ...)."""
    if config.transforms:
        raise BoaError("mixed precision with transforms (rotations, activation quantization) is not supported yet: "
                       "its widths are measured on the model before them; drop --target-bits or the transforms")
    measured = measure_widths(model, calib, config.method, widths, hessian_dtype=config.hessian_dtype,
                              cache_dtype=config.cache_dtype, **measure_options)
    chosen, bits = plan_widths(measured, target_bits)
    units = run_units(model.model if isinstance(model, StreamedModel) else model, measure_options.get("adapter"))
    default = (config.method.bits, config.method.group_size)
    layers = {layer: width for unit, width in chosen.items() if width != default for layer in units[unit]}
    return MixedPrecision(dataclasses.replace(config, widths=layers), chosen, bits)
