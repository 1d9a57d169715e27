"""Genie-M: block-wise reconstruction with a learned weight step, AdaRound rounding and LSQ activation steps
(ALGORITHMS.md §8), over the top-level units of an nn.Sequential model (stem, blocks, head).

For each unit in turn, with X_fp its input in the float model, X_q its input in the quantized model (the
already-quantized units' output) and Y = unit(X_fp) the float output, minimise over batches of 32

    mean_{n,h,w} Σ_c (unit_q(X̃)_c − Y_c)² + λ Σ_layers Σ 1 − |2h(α) − 1|^β,       X̃ = X_q or X_fp, 50/50 per element

(QDrop at the block input; each activation quantizer also keeps 50% of its elements in float), with Adam on the
weight steps (1e−4), the activation steps (4e−5), both cosine-annealed to 0, and on α (1e−3); β falls from 20 to 2
after the first 20% of the iterations, which leave the regulariser off (boa.core.adaround.beta_at). Then the
rounding is hardened and the quantized unit's output on X_q feeds the next unit. BatchNorm stays in float, in eval
mode (not folded).
With iters = 0 this is RTN: the 2.4-norm grid, round to nearest, activation steps from the first batch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from boa.core.adaround import beta_at
from boa.core.checks import check_finite
from boa.core.errors import BoaError
from boa.vision.config import ReconstructConfig
from boa.vision.fake_quant import FrozenLayer, attach_learned, bit_plan, freeze, quant_layers, weight_quantizer
from boa.vision.quantizers import ActQuantizer


@dataclass
class ReconstructResult:
    model: nn.Sequential                          # the quantized model, frozen (plain weights, fixed steps)
    layers: dict[str, FrozenLayer]                # per quantized layer: codes, grid, input step
    unit_loss: list[dict] = field(default_factory=list)  # per unit: output error of RTN and after learning
    seconds: float = 0.0


def _batched(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def output_error(y_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over channels of the squared error, averaged over images and positions."""
    return (y_q - y).pow(2).sum(1).mean()


def _act_quantizers(unit: nn.Module) -> list[ActQuantizer]:
    return [m for m in unit.modules() if isinstance(m, ActQuantizer)]


def _initialise_act_steps(unit: nn.Module, x: torch.Tensor) -> None:
    """One forward on x; each activation quantizer takes its signedness and step from the tensor it first sees."""
    def init(quantizer: ActQuantizer, args: tuple) -> None:
        if not quantizer.ready:
            quantizer.initialise(args[0])

    handles = [q.register_forward_pre_hook(init) for q in _act_quantizers(unit)]
    try:
        with torch.no_grad():
            unit(x)
    finally:
        for handle in handles:
            handle.remove()


def _learn_unit(unit: nn.Module, x_q: torch.Tensor, x_fp: torch.Tensor, y: torch.Tensor,
                config: ReconstructConfig, bar) -> None:
    weights = [weight_quantizer(m) for _, m in quant_layers(unit)]
    acts = _act_quantizers(unit)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / config.iters))  # noqa: E731
    groups = [
        {"params": [w.scale for w in weights], "lr": config.lr_weight_step},
        {"params": [w.alpha for w in weights], "lr": config.lr_rounding},
        {"params": [a.step for a in acts], "lr": config.lr_act_step},
    ]
    optimiser = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, [cosine, lambda step: 1.0, cosine])
    for act in acts:
        act.drop = config.qdrop
    for it in range(config.iters):
        idx = torch.randint(len(x_q), (config.batch_size,))
        inputs = x_q[idx]
        if config.qdrop:
            inputs = torch.where(torch.rand_like(inputs) < config.qdrop, x_fp[idx], inputs)
        loss = output_error(unit(inputs), y[idx])
        beta = beta_at(it, config.iters)
        if beta is not None:
            loss = loss + config.round_weight * sum(w.regulariser(beta) for w in weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        bar.update()
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    for act in acts:
        act.drop = 0.0
    _set_hard(unit, True)


def _set_hard(unit: nn.Module, hard: bool) -> None:
    for _, layer in quant_layers(unit):
        weight_quantizer(layer).hard = hard


def reconstruct(model: nn.Sequential, images: torch.Tensor, config: ReconstructConfig | None = None,
                progress: bool = True) -> ReconstructResult:
    """A quantized copy of `model` (its top-level children are the units), learned on `images` (model inputs)."""
    config = config or ReconstructConfig()
    config.validate()
    if not isinstance(model, nn.Sequential):
        raise BoaError("Genie-M reconstructs the top-level units of an nn.Sequential (stem, blocks, head); "
                       f"got {type(model).__name__}")
    check_finite(model)
    start = time.perf_counter()
    model = model.eval()
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    layers = quant_layers(qmodel)
    if not layers:
        raise BoaError("the model has no Conv2d or Linear layers to quantize")
    for (_, layer), bits in zip(layers, bit_plan(len(layers), config.w_bits, config.a_bits, config.boundary_bits)):
        attach_learned(layer, bits)

    result = ReconstructResult(qmodel, {})
    learned_units = [i for i, unit in enumerate(qmodel) if quant_layers(unit)]
    bar = tqdm(total=len(learned_units) * config.iters, desc=f"Genie-M W{config.w_bits}A{config.a_bits}",
               unit="it", disable=not progress or config.iters == 0)
    x_fp = x_q = images
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        for i, (unit, qunit) in enumerate(zip(model, qmodel)):
            y = _batched(unit, x_fp)
            if i in learned_units:
                _initialise_act_steps(qunit, x_q[: config.init_images])
                _set_hard(qunit, True)  # the untrained hard rounding is round-to-nearest: RTN's error
                y_q = _batched(qunit, x_q)
                rtn = output_error(y_q, y).item()
                if config.iters:
                    _set_hard(qunit, False)
                    _learn_unit(qunit, x_q, x_fp, y, config, bar)
                    y_q = _batched(qunit, x_q)
                result.unit_loss.append({"unit": i, "rtn": rtn, "learned": output_error(y_q, y).item()})
            else:
                y_q = _batched(qunit, x_q)
            x_q, x_fp = y_q, y
    bar.close()
    for name, layer in layers:
        result.layers[name] = freeze(layer)
    result.seconds = time.perf_counter() - start
    return result
