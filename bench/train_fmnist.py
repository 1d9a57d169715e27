"""Train the Fashion-MNIST ResNet that the vision quantization work uses as its small full-precision model.

    python bench/train_fmnist.py [--epochs 5] [--seed 0] [--force]

CPU only, a few minutes on 2 cores: SGD (Nesterov momentum 0.9, weight decay 5e-4) with a one-cycle learning rate
peaking at 0.1, batches of 128, random 28-px crops of the 2-px zero-padded image and horizontal flips. The weights go
to boa's cache (where boa.vision.load_vision_model("fmnist-resnet") reads them) and the run's epochs, seconds
and test accuracy to bench/results/fmnist_resnet_train.json. If the weights are already cached, the script only
evaluates them, unless --force.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from boa.core.io import atomic_file, write_json
from boa.vision.images import fashion_mnist
from boa.vision.models import build_vision_model, fmnist_weights_path, load_vision_model

RESULTS = Path(__file__).resolve().parent / "results" / "fmnist_resnet_train.json"
PAD = 2


def prepare(split: str, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images (N, 1, 28, 28) and labels."""
    images, labels = fashion_mnist(split)
    return spec.normalise(images[:, None].float() / 255), labels


def augment(x: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Per image: a random 28x28 crop of the image padded by PAD pixels of background, then a coin-flip mirror."""
    n, _, h, w = x.shape
    padded = F.pad(x, [PAD] * 4, value=background)
    dy, dx = (torch.randint(0, 2 * PAD + 1, (2, n, 1), generator=generator))
    rows = (dy + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (n, 1, w)
    crops = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / len(images)


def train(epochs: int, seed: int, batch_size: int, lr: float):
    torch.manual_seed(seed)
    model, spec = build_vision_model("fmnist-resnet")
    x_train, y_train = prepare("train", spec)
    background = -spec.mean[0] / spec.std[0]  # a black pixel, normalised
    steps = epochs * (len(x_train) // batch_size)  # the last partial batch of each epoch is dropped
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    start, epoch_seconds = time.perf_counter(), []
    with tqdm(total=steps, desc="train fmnist-resnet", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            for i in range(len(x_train) // batch_size):
                idx = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(model(augment(x_train[idx], generator, background)), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                if i % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            epoch_seconds.append(round(time.perf_counter() - start - sum(epoch_seconds), 1))
    return model.eval(), spec, time.perf_counter() - start, epoch_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--force", action="store_true", help="retrain even if the weights are cached")
    args = parser.parse_args()

    path = fmnist_weights_path()
    if path.exists() and not args.force:
        model, spec = load_vision_model("fmnist-resnet")
        acc = accuracy(model, *prepare("test", spec))
        print(f"{path} exists (--force retrains): test accuracy {acc:.4f}")
        return

    model, spec, seconds, epoch_seconds = train(args.epochs, args.seed, args.batch_size, args.lr)
    acc = accuracy(model, *prepare("test", spec))
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(RESULTS, {
        "model": "fmnist-resnet", "epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size,
        "peak_lr": args.lr, "train_seconds": round(seconds, 1), "test_accuracy": acc,
        "epoch_seconds": epoch_seconds,  # an epoch far slower than the others: the 2 cores were shared
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    })
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs in {seconds:.0f} s; weights: {path}; results: {RESULTS}")


if __name__ == "__main__":
    main()
