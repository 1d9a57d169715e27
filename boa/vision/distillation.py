"""Genie-D: synthetic images distilled from a network's own BatchNorm statistics (ALGORITHMS.md §8).

Per batch, a fresh generator G and per-image latents z ~ N(0, I) are trained together so that x = G(z), fed to
the frozen network (eval mode), makes every BN layer's input batch statistics match its running ones:

    L = Σ_BN ‖μ_B − running_mean‖² / C + ‖σ_B − √(running_var + 1e−6)‖² / C            (σ_B unbiased over N, H, W)
      + ‖mean_HW(x)‖² / N + ‖std_HW(x) − 1‖² / N                        (each image's channels: mean 0, std 1)

Strided convolutions see a randomly shifted input while distilling ("swing convolution": reflect-pad 1, crop at
a random offset in {0, 1, 2}²), so the images do not learn the stride's aliasing pattern.
Defaults are the public code's: 4000 iterations per batch of 128, Adam on z (lr 0.1, ReduceLROnPlateau patience
100 down to 1e-4, stepped on every iteration's loss) and on G (lr 0.01, ×0.95 every 100 iterations).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from boa.core.checkpoint import Checkpoint
from boa.core.errors import BoaError
from boa.core.io import hash_tensors
from boa.vision.config import DistillConfig

STD_EPS = 1e-6
CHECKPOINT_KIND = "genie-d"


@dataclass
class DistillResult:
    images: torch.Tensor                                   # (n_images, C, H, W), in the model's input space
    first_loss: list[float] = field(default_factory=list)  # per batch: the loss of the untrained generator
    last_loss: list[float] = field(default_factory=list)   # per batch: the last iteration's loss
    seconds: float = 0.0


class Generator(nn.Module):
    """Linear 256 → 128·(H/4)·(W/4), BN, ×2, conv 128→64, BN, LeakyReLU, ×2, conv 64→C, tanh, BN (no affine)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int = 256):
        super().__init__()
        if image_size % 4:
            raise BoaError(f"Genie's generator upsamples twice by 2: image size {image_size} must be a multiple of 4")
        self.base = image_size // 4
        self.project = nn.Linear(latent_dim, 128 * self.base**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), 128, self.base, self.base))


class BNStatistics:
    """Forward hooks on every BatchNorm2d of a model: the BN term of L for the last forward."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise BoaError("Genie-D needs BatchNorm2d layers to distil from; this model has none")
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, bn: nn.BatchNorm2d, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
        target_std = torch.sqrt(bn.running_var + STD_EPS)
        self.terms.append(((mean - bn.running_mean).pow(2).mean() + (var.sqrt() - target_std).pow(2).mean()))

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def input_prior(x: torch.Tensor) -> torch.Tensor:
    """Each image's channels towards mean 0 and std 1."""
    var, mean = torch.var_mean(x, dim=(2, 3), unbiased=True)
    return (mean.pow(2).sum() + (var.sqrt() - 1).pow(2).sum()) / len(x)


@contextlib.contextmanager
def swing_convolution(model: nn.Module, generator: torch.Generator):
    """While active, every strided conv sees its input reflect-padded by 1 and cropped back at a random offset."""

    def swing(conv: nn.Conv2d, args: tuple) -> tuple:
        x = args[0]
        dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return (padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]], *args[1:])

    handles = [m.register_forward_pre_hook(swing) for m in model.modules()
               if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; the model's own flags are restored."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def distill_batch(model: nn.Module, stats: BNStatistics, channels: int, image_size: int, size: int,
                   config: DistillConfig, bar) -> tuple[torch.Tensor, float, float]:
    """One batch: a fresh generator and latents trained together; (images, first loss, last loss)."""
    generator = Generator(channels, image_size, config.latent_dim)
    z = nn.Parameter(torch.randn(size, config.latent_dim))
    opt_z = torch.optim.Adam([z], lr=config.lr_latent)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=100, min_lr=1e-4)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    first = None
    for it in range(config.iters):
        x = generator(z)
        model(x)
        loss = stats.pop() + input_prior(x)
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_z.step()
        opt_g.step()
        plateau.step(loss.item())
        if (it + 1) % 100 == 0:
            decay.step()
        first = loss.item() if first is None else first
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        return generator(z), first, loss.item()


def fingerprint(model: nn.Module, channels: int, image_size: int, config: DistillConfig) -> str:
    """What a distillation depends on: its settings, the image shape and the model's weights and BN statistics."""
    digest = hashlib.blake2b(json.dumps([asdict(config), channels, image_size]).encode(), digest_size=16)
    hash_tensors(digest, model.state_dict())
    return digest.hexdigest()


def distill(model: nn.Module, channels: int, image_size: int, config: DistillConfig | None = None,
            progress: bool = True, checkpoint_dir=None) -> DistillResult:
    """Genie-D images for `model` (inputs (N, channels, image_size, image_size)), seeded by config.seed.

    With checkpoint_dir, each finished batch is a step of a boa.core.checkpoint.Checkpoint there (its images and
    the random states that follow it), so a later call with the same model and settings resumes at the next batch
    and ends with the images an uninterrupted run makes; another run's checkpoint there is a BoaError."""
    config = config or DistillConfig()
    if config.iters < 1 or config.n_images < 1 or config.batch_size < 2:
        raise BoaError("Genie-D needs iters ≥ 1, n_images ≥ 1 and batch_size ≥ 2 (BatchNorm statistics need a batch)")
    start = time.perf_counter()
    checkpoint, done = None, 0
    if checkpoint_dir is not None:
        checkpoint = Checkpoint(checkpoint_dir, fingerprint(model, channels, image_size, config), CHECKPOINT_KIND)
        done = checkpoint.next_step()
    result = DistillResult(torch.empty(0))
    batches = []
    with torch.random.fork_rng(), _frozen(model):
        torch.manual_seed(config.seed)
        shifts = torch.Generator().manual_seed(config.seed + 1)
        stats = BNStatistics(model)
        swing = swing_convolution(model, shifts) if config.swing else contextlib.nullcontext()
        sizes = [min(config.batch_size, config.n_images - b0) for b0 in range(0, config.n_images, config.batch_size)]
        bar = tqdm(total=len(sizes) * config.iters, desc="Genie-D", unit="it", disable=not progress)
        try:
            with swing:
                for k, size in enumerate(sizes):
                    if k < done:  # finished before: continue from the random states this batch left
                        saved, meta = checkpoint.load(k)
                        images, (first, last) = saved["images"], meta["losses"]
                        torch.set_rng_state(saved["rng"])
                        shifts.set_state(saved["shifts_rng"])
                        bar.update(config.iters)
                    else:
                        images, first, last = distill_batch(model, stats, channels, image_size, size, config, bar)
                        if checkpoint is not None:
                            checkpoint.save(k, {"images": images, "rng": torch.get_rng_state(),
                                                "shifts_rng": shifts.get_state()}, meta={"losses": [first, last]})
                    batches.append(images)
                    result.first_loss.append(first)
                    result.last_loss.append(last)
        finally:
            stats.remove()
            bar.close()
    result.images = torch.cat(batches)
    result.seconds = time.perf_counter() - start
    return result
