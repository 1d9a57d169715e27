"""Mixed precision to a size budget: each layer's width (bits, group size) chosen so that the quantized layers average
`target_bits` bits a weight as boa saves them (PackedWeight.stored: codes, 16-bit scales where exact, zeros at b
bits, perm), at the least predicted loss.

1. measure (`measure_widths`): one pass over the unquantized model's blocks on the calibration windows. Each layer's
   input Hessian H is gathered once; the layer is solved at every candidate width by the run's method without its
   attention terms (`sensitivity_method`: GPTQ on the same grid settings; RTN as it is), recording its objective
   E(w) = tr(ΔW H ΔWᵀ) and its packed bytes. Objectives of different layers are not comparable (a layer's output
   error reaches the model's output through everything after it, and errors compound), so each layer's
   *sensitivity* is measured too, at the operating point: on a few windows (`probe_windows`), the model's
   next-token KL divergence from the unquantized model with every layer quantized at one width w₀ (the method's
   own), and the KL gained by restoring that one layer to its float weight, s = gain / E(w₀); the predicted loss at
   any width is s·E(w) (small errors: the KL is quadratic in the output error, so linear in its energy; measured
   on SmolLM2 from 2-bit g64 to 4-bit per channel within ~30%). Measured with every other layer quantized, s
   carries how errors compound, which sensitivities around the float model miss (planned from those, a SmolLM2
   W3 plan lost to uniform widths). One stream of probe activations per layer, advanced through each later block as
   the pass reaches it: every block is still read once (streamed models), at the cost of about L²/2 block forwards
   on the probe windows.
2. allocate (`allocate`): the multiple-choice knapsack  min Σ_u loss_u(w_u)  s.t.  Σ_u bytes_u(w_u) ≤ budget  over
   units u that take one width: by default the layers a server fuses (q/k/v, gate/up, an MoE block's experts;
   `serving_groups`), else each stored layer (a fused projection's parts are always one). Solved exactly by dynamic
   programming over the budget in units of at most budget / resolution bytes; each size is rounded up to whole
   units, so a plan never exceeds the budget, and is the optimum where the unit is one byte.

Layers are measured alone on unquantized inputs: the plan assumes their errors add up independently in the loss.
Nothing here runs a backward pass.
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
from boa.algorithms.base import is_int
from boa.config import QuantConfig
from boa.core.errors import BoaError
from boa.core.io import write_json
from boa.core.memory import return_freed_memory
from boa.core.packed import pack
from boa.core.ranks import Ranks
from boa.models.adapter import Adapter, adapter_for
from boa.models.weights import StreamedModel, loaded
from boa.pipeline.inputs import FORWARD_BATCH
from boa.pipeline.loop import _split_fused, _weights, capture_inputs, grids_as_saved, run_fingerprint
from boa.stats import GroupStatistics, run_block

# (bits, group_size), -1: per channel. 3- and 4-bit: on SmolLM2 at 3.34 bits a weight, offering 2-bit g64 as well
# planned 19 layers there and lost to uniform 3-bit g128 (their errors compound past what each layer's response
# predicts); without it the plan beat uniform on both corpora (README, "Mixed precision").
DEFAULT_WIDTHS = ((3, -1), (3, 128), (4, -1), (4, 128))
PROBE_WINDOWS = 2     # calibration windows the model's output KL is measured on, per layer (module docstring)
RESOLUTION = 100_000  # budget units of the knapsack (finer: closer to the exact optimum, more memory and time)
_VERSION = 4  # of what a measurement holds and how it is taken: part of its cache key


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
    return GPTQ.from_dict({**base.to_dict(), "dx_alpha": 0.0, "refine_iters": 0, "static_groups": base.fixed_groups})


@dataclass
class Measurement:
    """Per stored layer (full name; a fused projection's parts summed): its weights' count, per width its packed
    bytes and each run layer's objective tr(ΔW H ΔWᵀ); per run layer its measured response (objective, model KL)
    points, sorted by objective: the predicted loss at a width is the KL interpolated at that width's objective
    (without a response, the objective itself)."""

    numel: dict[str, int]
    nbytes: dict[str, dict[tuple[int, int], int]]
    objective: dict[str, dict[str, dict[tuple[int, int], float]]]  # stored layer -> run layer -> width -> objective
    response: dict[str, list[tuple[float, float]]]                   # run layer -> [(objective, KL)]

    def loss(self, name: str, width: tuple[int, int]) -> float:
        total = 0.0
        for part, by_width in self.objective[name].items():
            points = self.response.get(part)
            total += by_width[width] if points is None else _interpolate(points, by_width[width])
        return total

    def widths(self, name: str) -> list[tuple[int, int]]:
        return list(self.nbytes[name])

    def to_dict(self) -> dict:
        return {"response": self.response, "layers": {
            name: {"numel": self.numel[name], "bytes": {width_label(w): b for w, b in self.nbytes[name].items()},
                   "objective": {part: {width_label(w): v for w, v in by_width.items()}
                                 for part, by_width in self.objective[name].items()}}
            for name in self.numel}}

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        def widths(record):
            return {parse_widths(label)[0]: v for label, v in record.items()}

        layers = data["layers"]
        return cls({name: e["numel"] for name, e in layers.items()},
                   {name: widths(e["bytes"]) for name, e in layers.items()},
                   {name: {part: widths(o) for part, o in e["objective"].items()} for name, e in layers.items()},
                   {part: [tuple(p) for p in points] for part, points in data["response"].items()})


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve through `points` (sorted by x) at x, extended past the last by its last slope."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1 or (x1, y1) == points[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def _response(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Measured (objective, KL) points made a non-decreasing curve: a layer whose larger error measured a smaller KL
    (errors that happened to cancel others) is taken to cost what its smaller error did."""
    points = sorted(points)
    curve, top = [], -math.inf
    for x, y in points:
        top = max(top, y)
        curve.append((x, top))
    return curve


class _OutputProbe:
    """The model's next-token distribution on a few windows at the operating point (every layer quantized at the
    probe width: the `base` stream) and, for each layer, with that one layer restored to its float weight and with
    it at the narrowest width, everything else as at the operating point: two streams per layer, each advanced
    through every later block (quantized) as the pass reaches it, so that a streamed model's blocks are still read
    once. Beside them the float stream, whose distribution each other's KL divergence is taken from."""

    BASE, RESTORED, NARROW = "", "restored", "narrow"

    def __init__(self, weights, adapter: Adapter, windows: torch.Tensor):
        self.weights, self.adapter = weights, adapter
        captured = capture_inputs(weights, adapter, windows, torch.float32, False, "device", None)
        self.kwargs = [kw[0] for kw in captured.per_block]  # one batch of windows
        self.fp = captured.hidden[0].clone()
        captured.close()
        self.streams: dict[tuple[str, str], torch.Tensor] = {(self.BASE, self.BASE): self.fp}

    @torch.no_grad()
    def advance(self, block, index: int, probed: dict[str, torch.Tensor], narrow: dict[str, torch.Tensor]) -> None:
        """Through block `index`; probed / narrow: name in the block -> the layer's weight at the probe width / at
        the narrowest width."""
        def run(x):
            return run_block(block, [x], [self.kwargs[index]], torch.float32)[0]

        modules = dict(block.named_modules())
        prefix = f"{self.adapter.blocks_path}.{index}."
        self.fp = run(self.fp)
        unquantized = {name: modules[name].weight.data for name in probed}

        def set_weights(layer: str | None = None, weight: torch.Tensor | None = None):
            for name, Q in probed.items():
                modules[name].weight.data = (weight if name == layer else Q).to(unquantized[name].dtype)

        try:
            set_weights()
            base = self.streams[self.BASE, self.BASE]
            self.streams = {key: run(x) for key, x in self.streams.items()}
            for name, W in unquantized.items():
                for kind, weight in ((self.RESTORED, W), (self.NARROW, narrow[name])):
                    set_weights(name, weight)
                    self.streams[prefix + name, kind] = run(base)
            set_weights()
        finally:
            for name, W in unquantized.items():
                modules[name].weight.data = W

    @torch.no_grad()
    def kl(self) -> dict[tuple[str, str], float]:
        """Each stream's mean KL(unquantized ‖ quantized) of the next-token distribution, in nats per token."""
        model = self.weights.model
        head = model.get_output_embeddings()
        final = self.adapter.after_block_modules(model)
        if head is None:
            raise BoaError(f"this {model.config.model_type} model has no output head to measure its layers' effect "
                           "on; mixed precision needs a causal language model")
        with loaded(self.weights, [*final, head]):
            def log_probs(x):
                for module in final:
                    x = module(x)
                weight = head.weight
                return torch.log_softmax(head(x.to(weight.device, weight.dtype)).float(), dim=-1)

            reference = log_probs(self.fp)
            p = reference.exp()
            tokens = reference.shape[0] * reference.shape[1]
            return {key: float((p * (reference - log_probs(x))).sum() / tokens) for key, x in self.streams.items()}


def _stored_units(adapter: Adapter, prefix: str) -> dict[str, list[str]]:
    """{stored layer: the run's layers it is made of} within a block (a fused projection: its parts)."""
    units: dict[str, list[str]] = {}
    fused = adapter.fused_projections()
    for name in adapter.linear_names():
        path = name.rsplit(".", 1)[0]
        units.setdefault(prefix + (path if path in fused else name), []).append(prefix + name)
    return units


def run_units(model, adapter: Adapter | None = None) -> dict[str, list[str]]:
    """{stored layer: its run layers} over the whole model: what gets one width each."""
    adapter = adapter or adapter_for(model.config)
    units = {}
    for index in range(len(adapter.blocks(model))):
        units.update(_stored_units(adapter, f"{adapter.blocks_path}.{index}."))
    return units


def serving_groups(model, adapter: Adapter | None = None) -> list[list[str]]:
    """Stored layers that must share a width for servers that fuse them (vLLM: q/k/v in one qkv_proj, gate/up in one
    gate_up_proj, an MoE block's experts in one fused kernel), block by block; every other layer alone."""
    adapter = adapter or adapter_for(model.config)
    groups = []
    for index in range(len(adapter.blocks(model))):
        prefix = f"{adapter.blocks_path}.{index}."
        units = _stored_units(adapter, prefix)
        tied = [set(adapter.qkv), set(adapter.mlp_in)]
        if adapter.experts_path:
            tied[1] |= {n for n in adapter.linear_names() if n.startswith(adapter.experts_path + ".")}
        seen = set()
        for names in tied:
            group = [unit for unit, parts in units.items() if any(p[len(prefix):] in names for p in parts)]
            groups.append(group)
            seen.update(group)
        groups += [[unit] for unit in units if unit not in seen]
    return [g for g in groups if g]


def measure_widths(model, calib: torch.Tensor, method: Method, widths=DEFAULT_WIDTHS, *,
                   probe_windows: int = PROBE_WINDOWS, adapter: Adapter | None = None, hessian_dtype: str = "float32",
                   cache_dtype: str = "float32", device=None, offload: str = "auto", offload_dir=None,
                   cache: str | Path | None = None, progress: bool = True) -> Measurement:
    """Each layer's objective and packed bytes at each width, and its sensitivity measured on the first
    `probe_windows` calibration windows (0: none, every objective counts alike) (module docstring). The model is left
    as it was. cache: a folder where measurements are kept by what they depend on (the model's weights, the
    windows, the method, widths and probe), so that choosing for another budget measures nothing again."""
    proxy = sensitivity_method(method)
    widths = tuple(tuple(w) for w in widths)
    solvers = {w: proxy.with_width(*w) for w in widths}  # a width the method cannot take fails before any work
    probed = _probe_width(method, widths)
    narrowest = min(widths, key=lambda w: (w[0], -w[1] if w[1] != -1 else -math.inf))  # fewest bits, then groups
    weights = _weights(model, device)
    model = weights.model
    adapter = adapter or adapter_for(model.config)
    if getattr(model, "boa_transforms", ()):
        raise BoaError("mixed precision measures the model before its transforms, and this one was already transformed; "
                       "load it afresh")
    if not is_int(probe_windows) or not 0 <= probe_windows <= min(len(calib), FORWARD_BATCH):
        raise BoaError(f"probe_windows={probe_windows!r}: give 0 to {min(len(calib), FORWARD_BATCH)} of the "
                       f"{len(calib)} calibration windows")
    key_config = QuantConfig(proxy, hessian_dtype=hessian_dtype, true_sequential=False)
    path = None
    if cache is not None:
        key = hashlib.sha256((run_fingerprint(weights, key_config, calib) + repr((widths, probe_windows, _VERSION)))
                             .encode()).hexdigest()[:24]
        path = Path(cache) / f"{key}.json"
        if path.exists():
            return Measurement.from_dict(json.loads(path.read_text()))

    ranks = Ranks.current()
    _split_fused(weights, adapter)
    dtype = getattr(torch, hessian_dtype)
    inputs = probe = None
    measured = Measurement({}, {}, {}, {})
    try:
        inputs = capture_inputs(weights, adapter, ranks.share(calib), getattr(torch, cache_dtype), False, offload,
                                offload_dir)
        probe = _OutputProbe(weights, adapter, calib[:probe_windows]) if probe_windows else None
        statistics = GroupStatistics(model, adapter, Needs(hessian=True), dtype, ranks)
        names = adapter.linear_names()
        blocks = adapter.blocks(model)
        for index in tqdm(range(len(blocks)), desc="measuring widths", disable=not (progress and ranks.main),
                          unit="block"):
            block = blocks[index]
            weights.load(block)
            modules = dict(block.named_modules())
            prefix = f"{adapter.blocks_path}.{index}."
            with torch.no_grad():
                stats = statistics(block, names, inputs.hidden, inputs.kwargs)
                at_probe, at_narrowest = {}, {}
                for unit, parts in _stored_units(adapter, "").items():
                    name = prefix + unit
                    measured.numel[name] = sum(modules[p].weight.numel() for p in parts)
                    measured.nbytes[name] = dict.fromkeys(widths, 0)
                    measured.objective[name] = {prefix + p: {} for p in parts}
                    for part in parts:
                        W = modules[part].weight.detach()
                        for width, solver in solvers.items():
                            q = solver.solve(W.to(dtype), stats[part], qkv=part in adapter.qkv)
                            Q = q.dequantize()
                            measured.objective[name][prefix + part][width] = stats[part].loss(W, Q)
                            saved = grids_as_saved(q, solver, W.dtype)
                            measured.nbytes[name][width] += pack(saved).stored_nbytes()
                            if width == probed:
                                at_probe[part] = Q
                            if width == narrowest:
                                at_narrowest[part] = Q
                del stats
                if probe is not None:
                    probe.advance(block, index, at_probe, at_narrowest)
                inputs.advance(block, None)
            weights.release(block)
            return_freed_memory()
        if probe is not None:
            kl = probe.kl()
            base = kl[probe.BASE, probe.BASE]
            for by_part in measured.objective.values():
                for part, by_width in by_part.items():
                    measured.response[part] = _response([(0.0, kl[part, probe.RESTORED]), (by_width[probed], base),
                                                         (by_width[narrowest], kl[part, probe.NARROW])])
    finally:
        if inputs is not None:
            inputs.close()
        if not isinstance(weights, StreamedModel):  # a streamed model stays split, as it was opened
            adapter.join(model)
    if path is not None and ranks.main:
        write_json(path, measured.to_dict())
    return measured


def _probe_width(method: Method, widths) -> tuple[int, int]:
    """The width each layer's sensitivity is measured at: the method's own if offered, else the middle one."""
    own = (method.bits, method.group_size)
    return own if own in widths else sorted(widths)[len(widths) // 2]


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


def plan_widths(measured: Measurement, target_bits: float,
                groups: list[list[str]] | None = None) -> tuple[dict[str, tuple[int, int]], float]:
    """({stored layer: its width}, the average bits a weight that stores) for `target_bits` bits a weight over the
    measured layers; `groups`: layers that take one width together (default: each alone)."""
    if not isinstance(target_bits, (int, float)) or isinstance(target_bits, bool) or target_bits <= 0:
        raise BoaError(f"target_bits={target_bits!r} must be a positive number of bits a weight, e.g. 3.0")
    groups = groups if groups is not None else [[name] for name in measured.numel]
    total = sum(measured.numel.values())
    narrowest = 8 * sum(min(measured.nbytes[name].values()) for name in measured.numel) / total
    if target_bits < narrowest:
        raise BoaError(f"target_bits={target_bits} is below {narrowest:.4f} bits a weight, what the narrowest offered "
                       "widths store (scales and zeros included); raise it, or offer narrower widths (e.g. "
                       "--widths 2g64,3,3g128,4,4g128)")
    widths = [measured.widths(group[0]) for group in groups]
    options = {i: [(sum(measured.nbytes[n][w] for n in group), sum(measured.loss(n, w) for n in group))
                   for w in widths[i]] for i, group in enumerate(groups)}
    chosen = allocate(options, int(target_bits * total / 8))
    spent = sum(options[i][j][0] for i, j in chosen.items())
    return {name: widths[i][j] for i, j in chosen.items() for name in groups[i]}, 8 * spent / total


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
                    tied: bool = True, **measure_options) -> MixedPrecision:
    """`config` with a width per layer for `target_bits` bits a weight over the quantized layers, from
    measure_widths (its options: probe_windows, adapter, device, offload, cache, progress, ...). tied: the layers a
    server fuses share a width (serving_groups), so that the exports load in vLLM; else each layer has its own."""
    if config.transforms:
        raise BoaError("mixed precision with transforms (rotations, activation quantization) is not supported yet: "
                       "its widths are measured on the model before them; drop --target-bits or the transforms")
    measured = measure_widths(model, calib, config.method, widths, hessian_dtype=config.hessian_dtype,
                              cache_dtype=config.cache_dtype, **measure_options)
    skeleton = model.model if isinstance(model, StreamedModel) else model
    groups = serving_groups(skeleton, measure_options.get("adapter")) if tied else None
    chosen, bits = plan_widths(measured, target_bits, groups)
    units = run_units(skeleton, measure_options.get("adapter"))
    default = (config.method.bits, config.method.group_size)
    layers = {layer: width for unit, width in chosen.items() if width != default for layer in units[unit]}
    return MixedPrecision(dataclasses.replace(config, widths=layers), chosen, bits)
